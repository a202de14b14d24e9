"""Accuracy-recovery recipes against fallback: outlier CNNs tuned with and without them, side by side.

Each job is the digits CNN (PyTorch) with activation outliers made by a function-preserving
per-channel rescale between two layers, as large models have them: ``two-pairs`` (a x1000
channel between conv1 and conv2 and another between conv2 and fc1, the fallback job of
``time_to_result.py``), ``one-pair`` (the conv1/conv2 one only) and ``mild`` (both at x30), and
the same digits CNN in Keras (``keras``, TensorFlow) and Gluon (``gluon``, MXNet) with a x1000
channel between their first two convolutions, where equalization is the only recipe. Each
is tuned with recipes (the default: the search tries cross-layer equalization and bias correction
before falling back) and with ``recipes: false``, each run in a process of its own, one worker,
``basic``, stopping at the first passing config, an absolute criterion of 0.02. The table gives
the wall time of ``tune()``, trials, the recipes chosen, the ops left fp32 and those the search's
fallback ops ended in bf16 as (where that ran faster), the accuracy of the compiled int8 model
against the fp32 baseline, the compiled fp32/int8 ``latency_ratio``, and the search and finalize
seconds.

    python benchmarks/recipes.py [--jobs two-pairs one-pair mild keras gluon] [--width 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = ("two-pairs", "one-pair", "mild", "keras", "gluon")
FRAMEWORKS = {"keras": "tensorflow", "gluon": "mxnet"}  # the other jobs: pytorch


def outliers(model, calibration, job: str):
    """The job's outlier CNN: the same function as ``model``, some activation channels huge."""
    import copy

    import torch

    from lpot_ray.demo.torch_digits import with_activation_outliers

    if job == "two-pairs":
        return with_activation_outliers(model, calibration)
    if job == "mild":
        return with_activation_outliers(model, calibration, scale=30.0)
    model = copy.deepcopy(model)
    with torch.no_grad():  # one channel of conv1 x1000, conv2's inputs from it / 1000
        images = torch.cat([batch for batch, _ in calibration])
        channel = int(torch.relu(model.conv1(images)).mean(dim=(0, 2, 3)).argmax())
        model.conv1.weight[channel] *= 1000.0
        model.conv1.bias[channel] *= 1000.0
        model.conv2.weight[:, channel] /= 1000.0
    return model


def outlier_job(job: str, width: int) -> tuple:
    """(model, calibration, evaluation) of the job, the model trained here."""
    if job == "keras":
        from lpot_ray.demo.keras_digits import train_digits_keras, with_activation_outliers

        model, calibration, evaluation = train_digits_keras(width=width)
        return with_activation_outliers(model, calibration), calibration, evaluation
    if job == "gluon":
        from lpot_ray.demo.gluon_digits import train_digits_gluon, with_activation_outliers

        model, calibration, evaluation = train_digits_gluon(width=width)
        return with_activation_outliers(model, calibration), calibration, evaluation
    from lpot_ray.demo.torch_digits import train_digits_cnn

    model, calibration, evaluation = train_digits_cnn(width=width)
    return outliers(model, calibration, job), calibration, evaluation


def child(job: str, recipes: bool, width: int, workspace: Path) -> None:
    """One tuning in this process; its figures as JSON on the last line."""
    import lpot_ray
    from lpot_ray.demo import demo_config

    model, calibration, evaluation = outlier_job(job, width)
    config = demo_config(workspace, 1, FRAMEWORKS.get(job, "pytorch"))
    config["tuning"]["accuracy_criterion"] = {"absolute": 0.02}
    if not recipes:
        config["quantization"]["recipes"] = False
    started = time.perf_counter()
    result = lpot_ray.tune(model, config, q_dataloader=calibration, eval_dataloader=evaluation)
    print(json.dumps({"wall": time.perf_counter() - started, "trials": result.n_trials, "passed": result.passed,
                      "recipes": list(result.config.recipes) if result.config else [],
                      "fp32_ops": list(result.fp32_ops), "bf16_ops": list(result.bf16_ops),
                      "accuracy": result.accuracy, "baseline": result.baseline, "timings": result.timings,
                      "latency_ratio": result.objectives.get("latency_ratio")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", choices=JOBS, default=list(JOBS))
    parser.add_argument("--width", type=int, default=64, help="the CNN's first conv's channels")
    parser.add_argument("--child", nargs=4, metavar=("JOB", "RECIPES", "WIDTH", "WORKSPACE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "on", int(args.child[2]), Path(args.child[3]))
        return

    runs = {}
    with tempfile.TemporaryDirectory() as root:
        for job in args.jobs:
            for recipes in ("on", "off"):
                workspace = Path(root) / f"{job}-{recipes}"
                output = subprocess.run([sys.executable, __file__, "--child", job, recipes, str(args.width), str(workspace)],
                                        capture_output=True, text=True, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
                if output.returncode != 0:
                    sys.exit(f"{job} with recipes {recipes} failed:\n{output.stderr[-3000:]}")
                runs[(job, recipes)] = json.loads(output.stdout.strip().splitlines()[-1])

    rows = [("tune() wall s", lambda run: f"{run['wall']:.1f}"),
            ("trials", lambda run: str(run["trials"])),
            ("recipes", lambda run: "+".join(name.split("_")[0] for name in run["recipes"]) or "none"),
            ("ops left fp32", lambda run: short(run["fp32_ops"]) if run["passed"] else "nothing passed"),
            ("ops in bf16", lambda run: short(run["bf16_ops"])),
            ("accuracy / fp32", lambda run: f"{run['accuracy'] or 0:.4f}/{run['baseline']:.4f}"),
            ("latency_ratio", lambda run: f"{run['latency_ratio'] or 0:.2f}x"),
            ("search s", lambda run: f"{run['timings'].get('search', 0.0):.1f}"),
            ("finalize s", lambda run: f"{run['timings'].get('finalize', 0.0):.1f}")]
    print(f"{'':<18}" + "".join(f"{f'{job} recipes {recipes}':>24}" for job, recipes in runs))
    for label, cell in rows:
        print(f"{label:<18}" + "".join(f"{cell(run):>24}" for run in runs.values()))


def short(ops: list[str]) -> str:
    """Op names without the Gluon block's prefix and suffix, so that a table cell holds them."""
    return ",".join(name.removeprefix("digitscnn_").removesuffix("_fwd") for name in ops) or "none"


if __name__ == "__main__":
    main()
