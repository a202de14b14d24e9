"""A fake executor: accuracy from a formula, results returned in shuffled order, no model."""

from __future__ import annotations

import random

from lpot_ray.trial import ExecutorStatus, InspectRequest, Outcome, Request, Status
from lpot_ray.space import FP32, Op, OpCapability, OpScheme, TensorScheme, TuneConfig, TuningSpace
from lpot_ray.config import load_config


def make_space(n_ops: int = 5, **quantization) -> TuningSpace:
    int8 = [OpScheme(TensorScheme("int8", "sym", "per_channel"), TensorScheme("uint8", "asym", "per_tensor", algorithm))
            for algorithm in ("minmax", "kl")]
    capabilities = [OpCapability(Op(f"op{i}", "Linear", macs=10 * (i + 1)), tuple(int8)) for i in range(n_ops)]
    return TuningSpace.build(capabilities, load_config({"model": {"framework": "pytorch"}, "quantization": quantization}).quantization)


class FakeExecutor:
    """Evaluates ``accuracy_of(config)`` with ``slots`` workers, finishing in random order."""

    def __init__(self, accuracy_of, slots: int, seed: int = 0, op_errors=None):
        self.accuracy_of = accuracy_of
        self.op_errors = op_errors  # config -> {op: error}, for inspection requests
        self.slots = slots
        self.running: list[tuple[int, Request]] = []
        self.random = random.Random(seed)
        self.evaluated: list[Request] = []
        self.cancelled: list[int] = []
        self.cancelled_waits = 0

    def status(self) -> ExecutorStatus:
        return ExecutorStatus(free=self.slots - len(self.running), pending=bool(self.running),
                              workers=self.slots, busy=len(self.running))

    def submit(self, seq, request):
        assert self.status().free > 0
        self.running.append((seq, request))

    def results(self, timeout):
        if not self.running:
            return []
        winding_down = [item for item in self.running if item[0] in self.cancelled]
        if winding_down:  # like a real worker, a cancelled trial holds its slot for a while
            self.cancelled_waits += 1
            if self.cancelled_waits % 2 == 0:
                self.running.remove(winding_down[0])
            return []
        seq, request = self.running.pop(self.random.randrange(len(self.running)))
        self.evaluated.append(request)
        if isinstance(request, InspectRequest):
            return [Outcome(seq, Status.OK, figures={"op_errors": self.op_errors(request.config)})]
        accuracy = self.accuracy_of(request.config)
        if accuracy is None:
            return [Outcome(seq, Status.FAILED, reason="boom")]
        return [Outcome(seq, Status.OK, accuracy=accuracy, worker="fake")]

    def cancel(self, seq):
        self.cancelled.append(seq)


def sensitive_ops_accuracy(sensitive: dict[str, float], baseline: float = 0.9):
    """Accuracy = baseline minus the loss of each sensitive op left int8."""
    def accuracy_of(config: TuneConfig) -> float:
        return baseline - sum(loss for name, loss in sensitive.items() if name in config.int8_ops)
    return accuracy_of


SIMULATED_SENSITIVITY = [0.0, 0.03, 0.0, 0.05, 0.001, 0.0, 0.04, 0.002, 0.0, 0.001, 0.0, 0.0, 0.02, 0.0, 0.004, 0.0]


def simulated_accuracy(config: TuneConfig) -> float:
    """A 16-op model: each int8 op costs its sensitivity (half with kl calibration)."""
    return 0.9 - sum(SIMULATED_SENSITIVITY[int(name[2:])] * (0.5 if scheme.activation.algorithm == "kl" else 1.0)
                     for name, scheme in config.op_schemes if not scheme.is_fp32)


__all__ = ["FP32", "FakeExecutor", "make_space", "sensitive_ops_accuracy", "simulated_accuracy"]
