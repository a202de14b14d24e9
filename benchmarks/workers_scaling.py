"""End-to-end wall time of a tuning with 1 worker (in-process, sequential) vs 2 Ray workers.

Each measurement is a fresh Python process, as a user would run it: imports, Ray start-up,
export, baseline, trials and the final compile all count. Two jobs on the digits CNN:

- demo:     the demo's job (the first int8 config passes);
- fallback: the same CNN with two activation outliers under a strict criterion, so the basic
            strategy needs one-op fallback, accumulated fallback and pruning (10 trials);
- heavy:    the fallback job with an evaluation set 60 times larger (about 2 s per trial), long
            enough for a Ray worker's start-up (several seconds on 2 cores) to pay back.

Runs alternate between 1 and 2 workers so both see the same machine load. Usage:

    python benchmarks/workers_scaling.py [--repeat 2] [--jobs demo fallback heavy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

JOB = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    import lpot_ray
    from lpot_ray.demo import demo_config, trained_torch_model
    from lpot_ray.demo.torch_digits import with_activation_outliers
    from pathlib import Path

    job, workers, workspace = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    model, calibration, evaluation = trained_torch_model(workspace.parent / "model")
    conf = demo_config(workspace, workers)
    if job == "heavy":
        import torch.utils.data as data
        evaluation = data.DataLoader(data.ConcatDataset([evaluation.dataset] * 60), batch_size=64)
    if job in ("fallback", "heavy"):
        model = with_activation_outliers(model, calibration)
        conf["tuning"]["accuracy_criterion"] = {"absolute": 0.02}
        conf["quantization"]["recipes"] = False  # a fallback job: equalization would spare it the fallback
        conf["tuning"]["exit_policy"] = {"timeout": 600, "max_trials": 40}
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    print(json.dumps({
        "wall_s": time.perf_counter() - started, "trials": result.n_trials, "passed": result.passed,
        "fp32_ops": list(result.fp32_ops), "accuracy": result.accuracy, "baseline": result.baseline,
        "latency_ratio": result.objectives.get("latency_ratio"),
        "int8_ms": result.objectives.get("latency_ms"), "fp32_ms": result.objectives.get("fp32_latency_ms"),
    }))
    """
)


JOBS = ("demo", "fallback", "heavy")


def measure(job: str, workers: int, root: str, run: int) -> dict:
    workspace = os.path.join(root, f"{job}-{workers}-{run}")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    done = subprocess.run([sys.executable, "-c", JOB, job, str(workers), workspace],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{job} with {workers} workers failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        measure("demo", 1, root, -1)  # trains and caches the model; warms the inductor cache
        rows = []
        for job in args.jobs:
            for run in range(args.repeat):
                for workers in (1, 2):
                    rows.append((job, workers, measure(job, workers, root, run)))
    print(f"{'job':9} {'workers':>7} {'wall s':>7} {'trials':>6} {'fp32 ops':18} {'acc fp32/int8':>14} "
          f"{'fp32 ms':>8} {'int8 ms':>8} {'fp32/int8':>9}")
    for job, workers, row in rows:
        print(f"{job:9} {workers:>7} {row['wall_s']:>7.1f} {row['trials']:>6} {','.join(row['fp32_ops']) or '-':18} "
              f"{row['baseline']:.3f}/{row['accuracy']:.3f}  {row['fp32_ms']:>8.2f} {row['int8_ms']:>8.2f} "
              f"{row['latency_ratio']:>8.2f}x")
    for job in args.jobs:
        one = [row["wall_s"] for name, workers, row in rows if name == job and workers == 1]
        two = [row["wall_s"] for name, workers, row in rows if name == job and workers == 2]
        print(f"{job}: wall time 1 worker / 2 workers = {sum(one) / sum(two):.2f}")


if __name__ == "__main__":
    main()
