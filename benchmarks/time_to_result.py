"""Where the time of a tuning goes: phase timings of real jobs, side by side, each in a fresh process.

Two jobs on the digits CNN (PyTorch): ``first-pass``, the demo, whose first config passes, and
``fallback``, the same CNN with activation outliers, where conv2 and fc1 must stay fp32, and
(on request) ``search``, that fallback job searching on for fewer fp32 ops (``timeout: 30``). Each
runs with 1 and 2 workers, every run in a process of its own (imports, compiler warm-up and Ray
start-up counted as a user sees them). The table gives the wall time of ``tune()``, the share of
it spent in finalize, and every phase of ``TuneResult.timings`` (trial phases are worker-seconds
summed over trials).

    python benchmarks/time_to_result.py [--workers 1 2] [--jobs first-pass fallback]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = ("first-pass", "fallback", "search")


def child(job: str, workers: int, workspace: Path) -> None:
    """One tuning in this process; its wall time and phases as JSON on the last line."""
    import lpot_ray
    from lpot_ray.history import History
    from lpot_ray.demo import demo_config
    from lpot_ray.demo.torch_digits import train_digits_cnn, with_activation_outliers

    model, calibration, evaluation = train_digits_cnn(width=16 if job == "fallback" else 64)
    config = demo_config(workspace, workers)
    if job != "first-pass":
        model = with_activation_outliers(model, calibration)
        config["tuning"]["accuracy_criterion"] = {"absolute": 0.02}
    if job == "search":
        config["tuning"]["exit_policy"]["timeout"] = 30
    started = time.perf_counter()
    result = lpot_ray.tune(model, config, q_dataloader=calibration, eval_dataloader=evaluation)
    wall = time.perf_counter() - started
    workers = collections.Counter(trial.worker for trial in History(workspace / "history.db").trials())
    print(json.dumps({"wall": wall, "timings": result.timings, "trials": result.n_trials, "passed": result.passed,
                      "fp32_ops": list(result.fp32_ops), "workers": dict(sorted(workers.items()))}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=["first-pass", "fallback"])
    parser.add_argument("--child", nargs=3, metavar=("JOB", "WORKERS", "WORKSPACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]))
        return

    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for job in args.jobs:
            for workers in args.workers:
                workspace = Path(root) / f"{job}-{workers}"
                output = subprocess.run([sys.executable, __file__, "--child", job, str(workers), str(workspace)],
                                        capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
                if output.returncode != 0:
                    sys.exit(f"{job} with {workers} workers failed:\n{output.stderr[-3000:]}")
                runs[(job, workers)] = json.loads(output.stdout.strip().splitlines()[-1])

    columns = list(runs)
    phases = list(dict.fromkeys(phase for run in runs.values() for phase in run["timings"]))
    print(f"{'':<22}" + "".join(f"{f'{job} x{workers}':>20}" for job, workers in columns))
    rows = [("tune() wall s", lambda run: f"{run['wall']:.2f}"),
            ("finalize share", lambda run: f"{run['timings'].get('finalize', 0.0) / run['wall']:.0%}"),
            ("trials", lambda run: str(run["trials"])),
            ("ops left fp32", lambda run: ",".join(run["fp32_ops"]) or "none"),
            ("trials per worker", lambda run: " ".join(f"{name}:{count}" for name, count in run["workers"].items()))]
    rows += [(("  " * phase.count(".")) + phase.rsplit(".", 1)[-1], lambda run, phase=phase: f"{run['timings'].get(phase, 0.0):.2f}")
             for phase in phases]
    for label, cell in rows:
        print(f"{label:<22}" + "".join(f"{cell(runs[column]):>20}" for column in columns))


if __name__ == "__main__":
    main()
