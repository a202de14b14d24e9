"""The demo's digits CNN in every installed framework: fp32 vs int8 latency and accuracy.

Each framework runs in a fresh Python process, as a user would run ``python -m lpot_ray.demo
--framework X``: its model is trained (or read from the cache), tuned with the demo's
configuration on one worker, and the chosen int8 model measured against fp32 compiled or
converted the same way (PyTorch: inductor with oneDNN; TensorFlow: TFLite run by LiteRT with
XNNPACK; MXNet: its oneDNN-fused graph). Both models of one framework are timed alternately in
the same process, so the ratio is fair even on a busy machine. Usage:

    python benchmarks/frameworks.py [--frameworks pytorch tensorflow mxnet] [--strict]

``--strict`` adds the activation outliers of the tests and asks for at most 2 points of accuracy
loss, so the tuning has to fall back ops to fp32.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap

JOB = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    started = time.perf_counter()
    import lpot_ray
    from lpot_ray.demo import TRAINED_MODELS, demo_config

    framework, workspace, strict = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
    model, calibration, evaluation = TRAINED_MODELS[framework](workspace / "model")
    conf = demo_config(workspace / "run", 1, framework)
    if strict:
        conf["tuning"]["accuracy_criterion"] = {"absolute": 0.02}
        conf["quantization"]["recipes"] = False  # a fallback job: equalization would spare it the fallback
        conf["tuning"]["exit_policy"] = {"timeout": 600, "max_trials": 40}
        if framework == "pytorch":
            from lpot_ray.demo.torch_digits import with_activation_outliers
        elif framework == "tensorflow":
            from lpot_ray.demo.keras_digits import with_activation_outliers
        else:
            from lpot_ray.demo.gluon_digits import with_activation_outliers
        model = with_activation_outliers(model, calibration)
    tuning_started = time.perf_counter()
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    print(json.dumps({
        "wall_s": time.perf_counter() - started, "tuning_s": time.perf_counter() - tuning_started,
        "trials": result.n_trials, "passed": result.passed, "baseline": result.baseline,
        "accuracy": result.accuracy, "int8_ops": len(result.int8_ops), "fp32_ops": len(result.fp32_ops),
        "fp32_ms": result.objectives.get("fp32_latency_ms"), "int8_ms": result.objectives.get("latency_ms"),
        "size_ratio": result.objectives.get("fp32_model_size_bytes", 0) / max(result.objectives.get("model_size_bytes", 1), 1),
    }))
    """
)

MODULES = {"pytorch": "torch", "tensorflow": "tensorflow", "mxnet": "mxnet"}


def run(framework: str, root: str, strict: bool) -> dict:
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", JOB, framework, os.path.join(root, framework), "1" if strict else "0"],
                          capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", nargs="+", default=list(MODULES), choices=list(MODULES))
    parser.add_argument("--strict", action="store_true", help="outlier models under a 2-point criterion")
    args = parser.parse_args()
    header = (f"{'framework':<11}{'fp32 acc':>9}{'int8 acc':>9}{'int8/fp32 ops':>14}{'fp32 ms':>9}{'int8 ms':>9}"
              f"{'speed-up':>9}{'size':>7}{'trials':>7}{'tuning s':>9}{'wall s':>8}")
    print(header)
    with tempfile.TemporaryDirectory() as root:
        for framework in args.frameworks:
            if importlib.util.find_spec(MODULES[framework]) is None:
                print(f"{framework:<11}not installed")
                continue
            figures = run(framework, root, args.strict)
            if "error" in figures:
                print(f"{framework:<11}failed: {figures['error']}")
            elif not figures["passed"]:
                print(f"{framework:<11}{figures['baseline']:>9.4f}  no config passed ({figures['trials']} trials)")
            else:
                ops = f"{figures['int8_ops']}/{figures['fp32_ops']}"
                print(f"{framework:<11}{figures['baseline']:>9.4f}{figures['accuracy']:>9.4f}{ops:>14}"
                      f"{figures['fp32_ms']:>9.2f}{figures['int8_ms']:>9.2f}{figures['fp32_ms'] / figures['int8_ms']:>8.2f}x"
                      f"{figures['size_ratio']:>6.1f}x{figures['trials']:>7}{figures['tuning_s']:>9.1f}{figures['wall_s']:>8.1f}")
    print("latency: per batch of 32, one thread; size: fp32 bytes / int8 bytes of the saved models")


if __name__ == "__main__":
    main()
