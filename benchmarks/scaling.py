"""How the tuning engine scales with workers: the simulated model with 1 to 32 workers.

The simulated adaptor of ``simulated.py`` costs a fixed ``--trial-seconds`` per trial (a sleep,
so one small machine can host many workers: each Ray worker asks for ``1`` logical CPU of a Ray
started with as many). The same job, ``--trials`` independent random-search proposals, runs with
each worker count; the table shows:

- wall:        the whole ``tune()`` call, Ray worker start-up included;
- ramp-up:     from the driver's first trial (it starts at once) until the last worker to join
               starts its first trial: Ray start-up and worker imports, not the engine;
- trial phase: from the first trial's start to the last trial's end;
- speedup:     trial phase with 1 worker / trial phase with N;
- efficiency:  with all N workers up (after the ramp-up): the ideal time for the trial time spent
               in that window (that time / N, plus the strategy's sequential critical path, which
               is nil for random search's independent proposals) / the window's length; the
               last, partly filled round counts against it;
- driver ms/trial: the driver process's CPU time per trial (proposing, recording, dispatching),
               which bounds how many workers one driver can keep busy.

    python benchmarks/scaling.py [--workers 1 2 4 8 16 32] [--trial-seconds 1] [--trials 128]
    python benchmarks/scaling.py --address ray://head:10001   # on a running cluster
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


def run(workers: int, trial_seconds: float, trials: int, workspace: Path) -> dict:
    conf = {
        "model": {"name": "simulated", "framework": "simulated"},
        "tuning": {"strategy": {"name": "random"}, "accuracy_criterion": {"absolute": 0.2},
                   "exit_policy": {"timeout": 36000, "max_trials": trials}, "workspace": {"path": str(workspace)}},
        "ray": {"workers": workers, "cpus_per_worker": 1},
    }
    model = SimulatedModel(trial_seconds=trial_seconds)
    cpu_started, started = time.process_time(), time.perf_counter()
    lpot_ray.tune(model, conf, q_dataloader=[CALIBRATION], eval_func=simulated_eval)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    done = History(workspace / "history.db").trials()
    first, last = min(trial.started for trial in done), max(trial.started + trial.duration for trial in done)
    all_up = max(min(trial.started for trial in done if trial.worker == worker) for worker in {trial.worker for trial in done})
    in_window = sum(max(0.0, trial.started + trial.duration - max(trial.started, all_up)) for trial in done)
    ideal = in_window / workers
    return {"wall": wall, "ramp": all_up - first, "phase": last - first, "trials": len(done),
            "driver_ms": 1000 * cpu / len(done), "efficiency": ideal / (last - all_up), "joined": len({t.worker for t in done})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--trial-seconds", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=128)
    parser.add_argument("--address", help="a running Ray cluster (default: a local Ray with max(workers) logical CPUs)")
    args = parser.parse_args()

    import ray

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False,
                 logging_level="ERROR")
    print(f"{args.trials} trials of {args.trial_seconds:g} s, random search; Ray: {ray.cluster_resources().get('CPU', 0):g} CPUs")
    print(f"{'workers':>7}{'joined':>8}{'wall s':>9}{'ramp-up s':>11}{'trial phase s':>15}{'speedup':>9}{'efficiency':>12}"
          f"{'driver ms/trial':>17}")
    single_phase = None
    with tempfile.TemporaryDirectory() as root:
        for workers in args.workers:
            row = run(workers, args.trial_seconds, args.trials, Path(root) / f"w{workers}")
            single_phase = single_phase or (row["phase"] * workers if workers != 1 else row["phase"])
            print(f"{workers:>7}{row['joined']:>8}{row['wall']:>9.1f}{row['ramp']:>11.1f}{row['phase']:>15.1f}"
                  f"{single_phase / row['phase']:>8.2f}x{row['efficiency']:>11.0%}{row['driver_ms']:>17.1f}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
