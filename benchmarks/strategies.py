"""Each strategy's trials and wall time to the first passing and to the best config.

Part 1, the simulated 16-op model of ``simulated.py`` (four ops must stay fp32; every trial
costs ``--trial-seconds``), with 1, 2, 4, 8 and 16 workers on one Ray instance: how the search
and the parallel engine scale, independent of this machine's cores. Part 2 (``--real``): the
digits CNN with activation outliers (conv2 and fc1 must stay fp32), 1 and 2 workers.

    python benchmarks/strategies.py [--workers 1 2 4] [--strategies basic bayesian] [--real]

"Trials" counts evaluations finished by the moment the config was found; times are from the
call of ``tune()``, start-up of Ray workers included.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import lpot_ray  # noqa: E402
from lpot_ray.history import History  # noqa: E402
from simulated import CALIBRATION, SimulatedModel, simulated_eval  # noqa: E402

STRATEGIES = ("basic", "mse", "bayesian", "random", "exhaustive")


def run(model, strategy: str, workers: int, workspace: Path, max_trials: int, criterion: dict, **loaders) -> dict:
    conf = {
        "model": {"name": "bench", "framework": loaders.pop("framework")},
        "tuning": {"strategy": {"name": strategy}, "accuracy_criterion": criterion,
                   "exit_policy": {"timeout": 3600, "max_trials": max_trials}, "workspace": {"path": str(workspace)}},
        "ray": {"workers": workers, "cpus_per_worker": 1},
        "quantization": {"recipes": False},  # the fallback search itself is compared
    }
    if "eval_dataloader" in loaders:
        conf["evaluation"] = {"accuracy": {"metric": {"topk": 1}}}
    started = time.time()
    result = lpot_ray.tune(model, conf, **loaders)
    wall = time.time() - started
    finished = sorted(History(workspace / "history.db").trials(), key=lambda trial: trial.started + trial.duration)

    def found(predicate) -> tuple:
        for count, trial in enumerate(finished, start=1):
            if predicate(trial):
                return count, trial.started + trial.duration - started
        return None, None

    first = found(lambda trial: trial.passed)
    best = found(lambda trial: result.passed and trial.key == result.config.key)
    return {"first": first, "best": best, "trials": len(finished), "wall": wall,
            "fp32_ops": ",".join(result.fp32_ops) if result.passed else "no pass"}


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print(f"{'strategy':11} {'workers':>7} {'first pass':>17} {'best':>17} {'trials':>6} {'wall s':>7}  fp32 ops of best")
    for strategy, workers, row in rows:
        def cell(pair):
            count, seconds = pair
            return f"{count:>4} in {seconds:6.1f}s" if count else f"{'-':>14}"
        print(f"{strategy:11} {workers:>7} {cell(row['first']):>17} {cell(row['best']):>17} {row['trials']:>6} "
              f"{row['wall']:>7.1f}  {row['fp32_ops']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--trial-seconds", type=float, default=0.2)
    parser.add_argument("--max-trials", type=int, default=60)
    parser.add_argument("--real", action="store_true", help="also tune the digits CNN with 1 and 2 workers")
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    model = SimulatedModel(trial_seconds=args.trial_seconds)
    criterion = {"absolute": 0.012}
    with tempfile.TemporaryDirectory() as root:
        rows = []
        for strategy in args.strategies:
            for workers in args.workers:
                workspace = Path(root) / f"sim-{strategy}-{workers}"
                rows.append((strategy, workers, run(model, strategy, workers, workspace, args.max_trials, criterion,
                                                    framework="simulated", q_dataloader=CALIBRATION,
                                                    eval_func=simulated_eval)))
        print_table(f"simulated 16-op model, {args.trial_seconds:g} s per trial, max {args.max_trials} trials", rows)

        if args.real:
            from lpot_ray.demo.torch_digits import train_digits_cnn, with_activation_outliers

            cnn, calibration, evaluation = train_digits_cnn()
            cnn = with_activation_outliers(cnn, calibration)
            rows = []
            for strategy in [name for name in args.strategies if name != "exhaustive"]:
                for workers in (1, 2):
                    workspace = Path(root) / f"real-{strategy}-{workers}"
                    rows.append((strategy, workers, run(cnn, strategy, workers, workspace, 30, {"absolute": 0.02},
                                                        framework="pytorch", q_dataloader=calibration,
                                                        eval_dataloader=evaluation)))
            print_table("digits CNN with activation outliers, max 30 trials", rows)
    ray.shutdown()


if __name__ == "__main__":
    main()
