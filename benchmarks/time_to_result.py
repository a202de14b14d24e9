"""Where the time of a tuning goes: phase timings of real jobs, side by side, each in a fresh process.

Two jobs on the digits CNN (PyTorch): ``first-pass``, the demo, whose first config passes, and
``fallback``, the same CNN with activation outliers, where conv2 and fc1 must stay fp32, and
(on request) ``search``, that fallback job searching on for fewer fp32 ops (``timeout: 30``). Each
runs with 1 and 2 workers, every run in a process of its own (imports, compiler warm-up and Ray
start-up counted as a user sees them). The table gives the wall time of ``tune()``, the share of
it spent in finalize, and every phase of ``TuneResult.timings`` (trial phases are worker-seconds
summed over trials). ``--early-stopping on off`` runs each job both ways, to show what stopping
hopeless fallback trials saves (and that the choice is the same).

    python benchmarks/time_to_result.py [--workers 1 2] [--jobs first-pass fallback] [--early-stopping on off]
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


def child(job: str, workers: int, workspace: Path, early_stopping: bool) -> None:
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
        config["quantization"]["recipes"] = False  # a fallback job: equalization would spare it the fallback
    if job == "search":
        config["tuning"]["exit_policy"]["timeout"] = 30
    config["tuning"]["exit_policy"]["early_stopping"] = early_stopping
    started = time.perf_counter()
    result = lpot_ray.tune(model, config, q_dataloader=calibration, eval_dataloader=evaluation)
    wall = time.perf_counter() - started
    trials = History(workspace / "history.db").trials()
    workers = collections.Counter(trial.worker for trial in trials)
    stopped = [trial for trial in trials if trial.status == "stopped_early"]
    print(json.dumps({"wall": wall, "timings": result.timings, "trials": result.n_trials, "passed": result.passed,
                      "fp32_ops": list(result.fp32_ops), "workers": dict(sorted(workers.items())),
                      "stopped_early": len(stopped),
                      "batches_skipped": sum(len(evaluation) - trial.figures["stopped_early"]["batches"] for trial in stopped)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=["first-pass", "fallback"])
    parser.add_argument("--early-stopping", nargs="+", choices=("on", "off"), default=["on"])
    parser.add_argument("--child", nargs=4, metavar=("JOB", "WORKERS", "WORKSPACE", "EARLY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), Path(args.child[2]), args.child[3] == "on")
        return

    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for job in args.jobs:
            for workers in args.workers:
                for early in args.early_stopping:
                    workspace = Path(root) / f"{job}-{workers}-{early}"
                    output = subprocess.run([sys.executable, __file__, "--child", job, str(workers), str(workspace), early],
                                            capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
                    if output.returncode != 0:
                        sys.exit(f"{job} with {workers} workers failed:\n{output.stderr[-3000:]}")
                    runs[(job, workers, early)] = json.loads(output.stdout.strip().splitlines()[-1])

    columns = list(runs)
    phases = list(dict.fromkeys(phase for run in runs.values() for phase in run["timings"]))
    heading = lambda job, workers, early: f"{job} x{workers}" + ("" if len(args.early_stopping) == 1 else f" es:{early}")  # noqa: E731
    print(f"{'':<22}" + "".join(f"{heading(*column):>22}" for column in columns))
    rows = [("tune() wall s", lambda run: f"{run['wall']:.2f}"),
            ("finalize share", lambda run: f"{run['timings'].get('finalize', 0.0) / run['wall']:.0%}"),
            ("trials", lambda run: str(run["trials"])),
            ("stopped early", lambda run: f"{run['stopped_early']} ({run['batches_skipped']} batches skipped)"),
            ("ops left fp32", lambda run: ",".join(run["fp32_ops"]) or "none"),
            ("trials per worker", lambda run: " ".join(f"{name}:{count}" for name, count in run["workers"].items()))]
    rows += [(("  " * phase.count(".")) + phase.rsplit(".", 1)[-1], lambda run, phase=phase: f"{run['timings'].get(phase, 0.0):.2f}")
             for phase in phases]
    for label, cell in rows:
        print(f"{label:<22}" + "".join(f"{cell(runs[column]):>22}" for column in columns))


if __name__ == "__main__":
    main()
