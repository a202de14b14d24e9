"""Several tunings on shared workers (``tune_many``) against the same jobs one after the other.

Three simulated models (``simulated.py``: a fixed cost per trial, known op sensitivities) with
different criteria and strategies are tuned together on N workers, then one by one with the
same N workers each. Printed: each job's trials and wall time, the total wall time both ways,
and how fairly the pool shared the workers: over every dispatch, the largest difference in
running trials between two jobs that both had trials waiting (the pool keeps it at most one).

    python benchmarks/zoo.py [--workers 8] [--trial-seconds 0.5]
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
from lpot_ray import pool, zoo  # noqa: E402
from simulated import CALIBRATION, SimulatedModel, simulated_eval  # noqa: E402

JOBS = (("basic-strict", "basic", 0.012), ("bayesian-loose", "bayesian", 0.05), ("random", "random", 0.03))


def jobs(root: Path, workers: int, trial_seconds: float, max_trials: int) -> list[lpot_ray.ZooJob]:
    made = []
    for name, strategy, criterion in JOBS:
        conf = {
            "model": {"name": name, "framework": "simulated"},
            "tuning": {"strategy": {"name": strategy}, "accuracy_criterion": {"absolute": criterion},
                       "exit_policy": {"timeout": 3600, "max_trials": max_trials}, "workspace": {"path": str(root / name)}},
            "ray": {"workers": workers, "cpus_per_worker": 1},
        }
        made.append(lpot_ray.ZooJob(SimulatedModel(trial_seconds=trial_seconds), conf, name=name,
                                    q_dataloader=[CALIBRATION], eval_func=simulated_eval))
    return made


def unfairness(snapshots: list[dict[str, tuple[int, int]]]) -> int:
    """The largest running-count difference between jobs that both had trials waiting."""
    worst = 0
    for snapshot in snapshots:
        waiting = [running for running, queued in snapshot.values() if queued]
        if len(waiting) >= 2:
            worst = max(worst, max(waiting) - min(waiting))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trial-seconds", type=float, default=0.5)
    parser.add_argument("--max-trials", type=int, default=40)
    args = parser.parse_args()

    import ray

    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    pools = []
    opened = pool.WorkerPool.__init__

    def recorded(self, *pool_args, **kwargs):  # every pool the tunings open, wherever it is opened
        opened(self, *pool_args, **kwargs)
        pools.append(self)

    pool.WorkerPool.__init__ = recorded
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        together = lpot_ray.tune_many(jobs(Path(root) / "together", args.workers, args.trial_seconds, args.max_trials))
        together_wall = time.perf_counter() - started
        alone = []
        started = time.perf_counter()
        for job in jobs(Path(root) / "alone", args.workers, args.trial_seconds, args.max_trials):
            alone.append(lpot_ray.tune(job.model, job.conf, q_dataloader=job.q_dataloader, eval_func=job.eval_func))
        alone_wall = time.perf_counter() - started
    ray.shutdown()

    print(f"3 simulated jobs, {args.workers} workers, {args.trial_seconds:g} s per trial")
    print(zoo.results_table([name for name, _, _ in JOBS], together))
    print(f"\ntogether (tune_many): {together_wall:.1f} s; one after the other (tune): {alone_wall:.1f} s; "
          f"same choices: {[r.config == a.config for r, a in zip(together, alone, strict=True)]}")
    print(f"largest running-trial difference between two jobs both waiting: {unfairness(pools[0].snapshots)} "
          f"(over {len(pools[0].snapshots)} dispatches)")


if __name__ == "__main__":
    main()
