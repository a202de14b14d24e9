"""Warm workers: several tune() calls in one process, each starting its own Ray workers, against
the same calls inside one ``with lpot_ray.workers(n):`` block, side by side.

The job is the digits CNN with activation outliers under a criterion that needs fallback, so
that Ray workers are started and used; its evaluation (an eval_func on the real model) waits
``--eval-seconds`` more per trial, as a larger evaluation set would. Each mode runs in a fresh
process (imports and Ray's start-up counted as a user sees them); the table gives each tune()'s
wall time, the trials the Ray workers ran (alone or as a part of a split evaluation), the trials
whose evaluation was split across workers, and the total.

    python benchmarks/warm_workers.py [--tunings 3] [--workers 2] [--eval-seconds 0.5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(mode: str, tunings: int, workers: int, eval_seconds: float, root: Path) -> None:
    """The tunings in this process; per tuning its wall time and Ray-worker trials, as JSON."""
    import lpot_ray
    from lpot_ray.demo import demo_config
    from lpot_ray.demo.torch_digits import train_digits_cnn, with_activation_outliers
    from lpot_ray.history import History

    model, calibration, evaluation = train_digits_cnn()
    model = with_activation_outliers(model, calibration)

    def evaluate(candidate) -> float:
        import torch

        time.sleep(eval_seconds)
        with torch.no_grad():
            correct = sum(int((candidate(images).argmax(1) == labels).sum()) for images, labels in evaluation)
        return correct / len(evaluation.dataset)

    block = lpot_ray.workers(workers) if mode == "warm" else contextlib.nullcontext()
    runs = []
    started = time.perf_counter()
    with block:
        for index in range(tunings):
            config = demo_config(root / f"{mode}-{index}", workers)
            config["tuning"]["accuracy_criterion"] = {"absolute": 0.02}
            config["quantization"]["recipes"] = False  # a fallback job: equalization would spare it the fallback
            if mode == "warm":
                del config["ray"]  # the block's workers
            began = time.perf_counter()
            result = lpot_ray.tune(model, config, q_dataloader=calibration, eval_func=evaluate)
            trials = History(root / f"{mode}-{index}" / "history.db").trials()
            runs.append({"wall": time.perf_counter() - began, "passed": result.passed, "trials": len(trials),
                         "on_ray": sum(trial.worker != "driver" for trial in trials), "fp32_ops": list(result.fp32_ops),
                         "split": sum("shards" in trial.figures for trial in trials)})
    print(json.dumps({"runs": runs, "total": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tunings", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--eval-seconds", type=float, default=0.5)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.tunings, args.workers, args.eval_seconds, Path(args.child[1]))
        return
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for mode in ("cold", "warm"):
            done = subprocess.run([sys.executable, __file__, "--tunings", str(args.tunings), "--workers", str(args.workers),
                                   "--eval-seconds", str(args.eval_seconds), "--child", mode, root], capture_output=True, text=True,
                                  env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{args.tunings} tunings of the fallback job, {args.workers} workers, evaluation + {args.eval_seconds:g} s")
    print(f"{'':<12}{'cold: own workers each':>36}{'warm: one workers block':>36}")
    for index in range(args.tunings):
        cells = [f"{run['wall']:.2f} s, {run['on_ray']}/{run['trials']} on Ray, {run['split']} split"
                 for run in (results["cold"]["runs"][index], results["warm"]["runs"][index])]
        print(f"{f'tune() {index + 1}':<12}" + "".join(f"{cell:>36}" for cell in cells))
    print(f"{'total':<12}" + "".join(f"{results[mode]['total']:>34.2f} s" for mode in ("cold", "warm")))
    print(f"{'same choice':<12}{str(all(cold['fp32_ops'] == warm['fp32_ops'] for cold, warm in zip(results['cold']['runs'], results['warm']['runs']))):>36}")


if __name__ == "__main__":
    main()
