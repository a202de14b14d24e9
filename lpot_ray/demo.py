"""python -m lpot_ray.demo: a real CNN trained on scikit-learn's digits, tuned to int8 on Ray.

The model is trained once and cached in the workspace; tuning runs on a private local Ray with
two workers. The demo prints the fp32 and int8 accuracy, the ops left in fp32 and the measured
fp32 / int8 latency ratio of the compiled models.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from . import tune
from .digits import digits_loaders, train_digits_cnn

WIDTH = 64


def demo_config(workspace: Path, workers: int) -> dict:
    return {
        "model": {"name": "digits_cnn", "framework": "pytorch"},
        "quantization": {"calibration": {"sampling_size": 200}},
        "evaluation": {"accuracy": {"metric": {"topk": 1}}},
        "tuning": {
            "accuracy_criterion": {"relative": 0.01},
            "exit_policy": {"timeout": 0, "max_trials": 50},
            "workspace": {"path": str(workspace)},
        },
        "ray": {"workers": workers},
    }


def trained_model(workspace: Path):
    """The demo CNN, trained on the first run and read from the workspace afterwards."""
    import torch

    from .digits import digits_cnn

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lpot_ray.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="lpot_ray_workspace/demo", help="where the model and history go")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (1 runs in-process)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  %(message)s")

    workspace = Path(args.workspace)
    started = time.perf_counter()
    model, calibration, evaluation = trained_model(workspace)
    print(f"digits CNN ready ({time.perf_counter() - started:.1f} s); tuning with {args.workers} workers ...")
    result = tune(model, demo_config(workspace, args.workers), q_dataloader=calibration,
                  eval_dataloader=evaluation, verbose=args.verbose)
    wall = time.perf_counter() - started

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
    print(f"wall time          {wall:.1f} s")
    print(f"saved to           {result.save(workspace / 'int8_model')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
