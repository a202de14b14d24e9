"""A simulated framework: known per-op sensitivity and a fixed cost per trial, no deep learning.

``SimulatedAdaptor`` is registered as framework ``simulated`` through the extension API, exactly
as a third-party adaptor would be. A ``SimulatedModel`` lists ops with their MACs and the accuracy
each loses when it runs int8 (half of that with ``kl`` calibration); quantizing sleeps for
``trial_seconds``, standing in for calibration and evaluation, so strategies and scaling can be
measured on many workers of a small machine (or, ``busy``, spends that much CPU time). Evaluate with ``simulated_eval``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from lpot_ray import registry
from lpot_ray.adaptors.base import Adaptor, Lowered
from lpot_ray.space import Op, OpCapability, OpScheme, TensorScheme, TuneConfig

WEIGHT = TensorScheme("int8", "sym", "per_channel", "minmax")
SCHEMES = tuple(OpScheme(WEIGHT, TensorScheme("uint8", "asym", "per_tensor", algorithm)) for algorithm in ("minmax", "kl"))

# 16 ops; four of them lose more than a 1.2-point criterion allows even with kl calibration.
SENSITIVITY = (0.0, 0.03, 0.0, 0.05, 0.001, 0.0, 0.04, 0.002, 0.0, 0.001, 0.0, 0.0, 0.02, 0.0, 0.004, 0.0)


@dataclass(frozen=True)
class SimulatedModel:
    sensitivity: tuple[float, ...] = SENSITIVITY
    baseline: float = 0.9
    trial_seconds: float = 0.2
    config: Any = None  # the TuneConfig of a "quantized" model, None for fp32
    busy: bool = False  # spend ``trial_seconds`` of CPU time per trial instead of sleeping

    @property
    def op_names(self) -> list[str]:
        return [f"op{index}" for index in range(len(self.sensitivity))]

    def accuracy(self) -> float:
        if self.config is None:
            return self.baseline
        loss = 0.0
        for (_, scheme), sensitivity in zip(self.config.op_schemes, self.sensitivity, strict=True):
            if not scheme.is_fp32:
                loss += sensitivity * (0.5 if scheme.activation.algorithm == "kl" else 1.0)
        return self.baseline - loss

    def __call__(self, *inputs: Any) -> None:
        return None

    def spend(self) -> None:
        """A trial's cost: a sleep, or with ``busy`` this much CPU time (longer on a busy machine)."""
        if not self.busy:
            time.sleep(self.trial_seconds)
            return
        until = time.thread_time() + self.trial_seconds
        while time.thread_time() < until:
            pass

    def to_json(self) -> bytes:
        data = asdict(self)
        data["config"] = None if self.config is None else self.config.to_dict()
        return json.dumps(data, sort_keys=True).encode()

    @classmethod
    def from_json(cls, payload: bytes) -> "SimulatedModel":
        data = json.loads(payload)
        config = None if data["config"] is None else TuneConfig.from_dict(data["config"])
        return cls(tuple(data["sensitivity"]), data["baseline"], data["trial_seconds"], config, data.get("busy", False))


def simulated_eval(model: SimulatedModel) -> float:
    """The eval_func of simulated models."""
    return model.accuracy()


@registry.adaptors.register("simulated")
class SimulatedAdaptor(Adaptor):
    framework = "simulated"

    def prepare(self, model: Any, example_inputs: Any) -> bytes:
        return model.to_json()

    def load(self, payload: bytes) -> SimulatedModel:
        return SimulatedModel.from_json(payload)

    def weights_digest(self, model: SimulatedModel) -> str:
        return hashlib.sha256(model.to_json()).hexdigest()[:16]

    def capabilities(self, model: SimulatedModel) -> list[OpCapability]:
        return [OpCapability(Op(name, "Linear", macs=1000 * (index + 1)), SCHEMES) for index, name in enumerate(model.op_names)]

    def quantize(self, model: SimulatedModel, config: TuneConfig, calibration: Sequence[Any]) -> SimulatedModel:
        model.spend()
        return SimulatedModel(model.sensitivity, model.baseline, model.trial_seconds, config, model.busy)

    def inspect_tensors(self, model: SimulatedModel, config: TuneConfig, calibration: Sequence[Any]) -> dict[str, float]:
        """Each int8 op's error is its known sensitivity (the mse strategy's ranking input)."""
        model.spend()
        sensitivity = dict(zip(model.op_names, model.sensitivity, strict=True))
        return {name: sensitivity[name] for name in config.int8_ops}

    def predict(self, model: SimulatedModel, inputs: Any) -> np.ndarray:
        """Nothing to compute: accuracy comes from simulated_eval, and measured latencies of a
        simulated model mean nothing."""
        return np.zeros((1, 1), dtype=np.float32)

    def lower(self, model: SimulatedModel, ops: Sequence[Op], config: TuneConfig, example_inputs: Any) -> Lowered:
        return Lowered(model, config.int8_ops, config.fp32_ops)

    def lower_fp32(self, model: SimulatedModel, example_inputs: Any) -> SimulatedModel:
        return model

    def serialize(self, model: SimulatedModel, example_inputs: Any) -> bytes:
        return model.to_json()

    def deserialize(self, payload: bytes) -> SimulatedModel:
        return SimulatedModel.from_json(payload)


CALIBRATION = [np.zeros((1, 1), dtype=np.float32)]  # the simulated model ignores its data
