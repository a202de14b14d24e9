"""Workers on a busy machine: Ray's default worker niceness against lpot_ray's, side by side.

Ray adds 15 to the niceness of the worker processes it starts, so on a machine where another
job keeps the cores busy, a Ray worker gets a small share of a core and its trials crawl while
the driver's run at full speed. lpot_ray starts its private Ray with its workers at the
driver's priority. This runs the same job (the simulated model, each trial spending
``--trial-seconds`` of CPU time) next to a spinning process per core, once with Ray's
niceness (``RAY_worker_niceness=15``) and once with lpot_ray's, each in a fresh process, and
prints the wall time, the trials each worker ran and their median duration.

    python benchmarks/niceness.py [--workers 2] [--trials 40] [--trial-seconds 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"Ray's (15 added)": {"RAY_worker_niceness": "15"}, "lpot_ray's (driver's)": {}}


def child(workers: int, trials: int, trial_seconds: float, workspace: Path) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    import lpot_ray
    from lpot_ray.history import History
    from simulated import CALIBRATION, SimulatedModel, simulated_eval

    config = {"model": {"name": "simulated", "framework": "simulated"},
              "tuning": {"strategy": {"name": "random"}, "accuracy_criterion": {"absolute": 0.5},
                         "exit_policy": {"timeout": 600, "max_trials": trials}, "workspace": {"path": str(workspace)}},
              "ray": {"workers": workers}}
    started = time.perf_counter()
    lpot_ray.tune(SimulatedModel(trial_seconds=trial_seconds, busy=True), config, q_dataloader=CALIBRATION,
                  eval_func=simulated_eval)
    wall = time.perf_counter() - started
    durations: dict[str, list[float]] = {}
    for trial in History(workspace / "history.db").trials():
        durations.setdefault(trial.worker, []).append(trial.duration)
    print(json.dumps({"wall": wall, "durations": durations}))


@contextlib.contextmanager
def spinning(processes: int):
    """A busy loop per core at this process's priority: another job on the machine."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--trial-seconds", type=float, default=0.5)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), float(args.child[2]), Path(args.child[3]))
        return

    runs = {}
    with tempfile.TemporaryDirectory() as root, spinning(os.cpu_count() or 1):
        for label, env in SETTINGS.items():
            workspace = Path(root) / str(len(runs))
            command = [sys.executable, __file__, "--child", str(args.workers), str(args.trials), str(args.trial_seconds),
                       str(workspace)]
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **env})
            if done.returncode != 0:
                sys.exit(f"{label} failed:\n{done.stderr[-3000:]}")
            runs[label] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"{args.trials} trials of {args.trial_seconds} s CPU each, {args.workers} workers, "
          f"{os.cpu_count()} spinning processes beside them")
    print(f"{'worker niceness':<24}{'wall s':>8}  trials (median s) per worker")
    for label, run in runs.items():
        per_worker = "  ".join(f"{worker}: {len(times)} ({statistics.median(times):.2f})"
                               for worker, times in sorted(run["durations"].items()))
        print(f"{label:<24}{run['wall']:>8.1f}  {per_worker}")


if __name__ == "__main__":
    main()
