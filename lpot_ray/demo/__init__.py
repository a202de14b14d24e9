"""python -m lpot_ray.demo: a real CNN trained on scikit-learn's digits, tuned to int8 on Ray.

The model (PyTorch by default; ``--framework tensorflow`` for Keras, ``mxnet`` for Gluon) is trained once and cached in
the workspace; tuning runs on a private local Ray with two workers. The demo prints the fp32 and
int8 accuracy, the ops left in fp32 and the measured fp32 / int8 latency ratio of the compiled
models.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
import time
from pathlib import Path

from .. import timings, tune
from .torch_digits import digits_loaders, train_digits_cnn

WIDTH = 64


def demo_config(workspace: Path, workers: int, framework: str = "pytorch") -> dict:
    return {
        "model": {"name": "digits_cnn", "framework": framework},
        "quantization": {"calibration": {"sampling_size": 200}},
        "evaluation": {"accuracy": {"metric": {"topk": 1}}},
        "tuning": {
            "accuracy_criterion": {"relative": 0.01},
            "exit_policy": {"timeout": 0, "max_trials": 50},
            "workspace": {"path": str(workspace)},
        },
        "ray": {"workers": workers},
    }


def trained_torch_model(workspace: Path):
    """The demo CNN, trained on the first run and read from the workspace afterwards."""
    import torch

    from .torch_digits import digits_cnn

    path = workspace / "digits_cnn.pt"
    _, calibration, evaluation = digits_loaders()
    if path.is_file():
        model = digits_cnn(WIDTH)
        model.load_state_dict(torch.load(path))
        return model.eval(), calibration, evaluation
    model, calibration, evaluation = train_digits_cnn(width=WIDTH)
    workspace.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, calibration, evaluation


def trained_keras_model(workspace: Path):
    """The same CNN in Keras (channels-last), trained once and cached as a .keras file."""
    import keras

    from .keras_digits import digits_keras_loaders, train_digits_keras

    path = workspace / "digits_cnn.keras"
    if path.is_file():
        return (keras.models.load_model(path), *digits_keras_loaders())
    model, calibration, evaluation = train_digits_keras(width=WIDTH)
    workspace.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return model, calibration, evaluation


def trained_gluon_model(workspace: Path):
    """The same CNN as a Gluon HybridBlock, trained once and cached as MXNet checkpoint files."""
    from .gluon_digits import digits_array_loader, load_digits_gluon, save_digits_gluon, train_digits_gluon

    prefix = workspace / "digits_cnn"
    if Path(f"{prefix}-symbol.json").is_file():
        return load_digits_gluon(str(prefix)), digits_array_loader("calibration", 32), digits_array_loader("evaluation", 64)
    model, calibration, evaluation = train_digits_gluon(width=WIDTH)
    workspace.mkdir(parents=True, exist_ok=True)
    save_digits_gluon(model, str(prefix))
    return model, calibration, evaluation


TRAINED_MODELS = {"pytorch": trained_torch_model, "tensorflow": trained_keras_model, "mxnet": trained_gluon_model}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lpot_ray.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=sorted(TRAINED_MODELS), default="pytorch", help="which framework's CNN to tune")
    parser.add_argument("--workspace", help="where the model and history go (default: lpot_ray_workspace/demo[_FRAMEWORK])")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (1 runs in-process)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")

    suffix = "" if args.framework == "pytorch" else f"_{args.framework}"
    workspace = Path(args.workspace or f"lpot_ray_workspace/demo{suffix}")
    started = time.perf_counter()
    model, calibration, evaluation = TRAINED_MODELS[args.framework](workspace)
    print(f"{args.framework} digits CNN ready ({time.perf_counter() - started:.1f} s); tuning with {args.workers} workers ...")
    tuning_started = time.perf_counter()
    result = tune(model, demo_config(workspace, args.workers, args.framework), q_dataloader=calibration,
                  eval_dataloader=evaluation, verbose=args.verbose)
    tuning = time.perf_counter() - tuning_started

    print(f"\nfp32 accuracy      {result.baseline:.4f}")
    if not result.passed:
        closest = result.best_failing
        print("no int8 config met the criterion" + (f"; closest: {closest.accuracy:.4f}" if closest else ""))
        return 1
    figures = result.objectives
    print(f"int8 accuracy      {result.accuracy:.4f}")
    print(f"int8 ops           {', '.join(result.int8_ops) or '-'}")
    print(f"ops left fp32      {', '.join(result.fp32_ops) or 'none'}")
    print(f"latency per batch  fp32 {figures['fp32_latency_ms']:.2f} ms, int8 {figures['latency_ms']:.2f} ms "
          f"(fp32/int8 = {figures['latency_ratio']:.2f}x)")
    print(f"trials             {result.n_trials}, stopped by: {result.stopped_by}")
    print(f"tuning time        {tuning:.1f} s, of which:")
    print(textwrap.indent(timings.table(result.timings), "  "))
    print(f"saved to           {result.save(workspace / 'int8_model')}")
    return 0
