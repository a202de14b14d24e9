"""How a model's accuracy is measured: a built-in metric over a loader, or the user's eval_func."""

from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from .errors import EvaluationError
from .metrics import make_metric
from .trial import GiveUp


class TrialCancelled(Exception):
    """Raised between evaluation batches once the engine no longer needs the trial."""


class TrialHopeless(Exception):
    """Raised between evaluation batches once the criterion can't be met whatever the rest holds."""

    def __init__(self, reachable: tuple[float, float], batches: int, samples: int):
        super().__init__(f"stopped after {samples} samples: the result can only be in [{reachable[0]:.6g}, {reachable[1]:.6g}]")
        self.figures = {"reachable": list(reachable), "batches": batches, "samples": samples}


def split_batch(batch: Any) -> tuple[Any, Any]:
    """LPOT's loader convention: a batch is (inputs, labels); a bare batch has no labels."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return batch, None


# The fp32 model's outputs for the evaluation batch at a position, given its inputs.
Fp32Outputs = Callable[[int, Any], Any]

USER_CODE_LIMIT = 3600.0  # seconds the baseline or reading the calibration data may take by default


def user_code_limit(policy: Any) -> float:
    """Seconds the fp32 baseline and the reading of the calibration data may take: the exit
    policy's ``trial_timeout`` if given (0: no limit), else an hour."""
    return policy.trial_timeout if policy.trial_timeout is not None else USER_CODE_LIMIT


def within(seconds: Optional[float], function: Callable[[], Any], timed_out: Exception) -> Any:
    """``function()``, or ``timed_out`` raised once it has run ``seconds`` (0: no limit). It runs
    in a daemon thread, which a call blocked for good in the user's code leaves behind."""
    if not seconds:
        return function()
    done: concurrent.futures.Future = concurrent.futures.Future()

    def call() -> None:
        try:
            done.set_result(function())
        except BaseException as error:  # raised in the caller below
            done.set_exception(error)

    threading.Thread(target=call, name="lpot-ray-user-code", daemon=True).start()
    try:
        return done.result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise timed_out from None


def as_numpy(values: Any) -> np.ndarray:
    """Labels or outputs of any framework as a numpy array (an MXNet NDArray has no __array__)."""
    return values.asnumpy() if hasattr(values, "asnumpy") else np.asarray(values)


@dataclass
class Evaluation:
    """Either ``eval_func(model) -> float`` or ``metric`` ({name: params}) over ``dataloader``."""

    eval_func: Optional[Callable[[Any], float]] = None
    dataloader: Any = None
    metric: Optional[dict] = None

    @property
    def given(self) -> bool:
        return self.eval_func is not None or self.dataloader is not None

    def shards_at_most(self) -> int:
        """How many workers one evaluation can be split across: one per batch for a built-in
        metric whose parts merge exactly; 1 for an eval_func, which is one call that can't be divided."""
        if self.eval_func is not None or self.dataloader is None or not make_metric(self.metric).merges_exactly:
            return 1
        return max(1, _length(self.dataloader))

    def run_shard(self, adaptor: Any, model: Any, shard: tuple[int, int],
                  should_stop: Callable[[], bool] = lambda: False, fp32: Optional[Fp32Outputs] = None) -> Any:
        """The metric's state over shard ``index`` of ``count``: every count-th batch from ``index``."""
        return self._metric_over(adaptor, model, should_stop, None, fp32, shard).metric

    def run(self, adaptor: Any, model: Any, should_stop: Callable[[], bool] = lambda: False,
            give_up: Optional[GiveUp] = None, fp32: Optional[Fp32Outputs] = None) -> float:
        """The model's accuracy; ``give_up`` raises TrialHopeless once it can't meet the criterion.
        ``fp32`` gives the fp32 model's outputs, for a metric that compares with them."""
        return self.measure(adaptor, model, should_stop, give_up, fp32).value

    def measure(self, adaptor: Any, model: Any, should_stop: Callable[[], bool] = lambda: False,
                give_up: Optional[GiveUp] = None, fp32: Optional[Fp32Outputs] = None) -> "Measured":
        """The accuracy, with what the fp32 baseline tells the tuning about its evaluation (the
        baseline passes no ``fp32``: its own outputs are the fp32 ones)."""
        if self.eval_func is not None:
            return Measured(as_accuracy(self.eval_func(adaptor.user_model(model))))
        measured = self._metric_over(adaptor, model, should_stop, give_up, fp32)
        measured.value = as_accuracy(measured.metric.result())
        return measured

    def _metric_over(self, adaptor: Any, model: Any, should_stop: Callable[[], bool], give_up: Optional[GiveUp],
                     fp32: Optional[Fp32Outputs], shard: tuple[int, int] = (0, 1)) -> "Measured":
        metric = make_metric(self.metric)
        batches = samples = 0
        inference = 0.0
        index, count = shard
        for position, batch in enumerate(self.dataloader):
            if position % count != index:
                continue
            if should_stop():
                raise TrialCancelled()
            inputs, labels = split_batch(batch)
            if labels is None and not metric.compares_to_fp32:
                raise EvaluationError("eval_dataloader: batches must be (inputs, labels) for a built-in metric")
            started = time.perf_counter()
            predictions = adaptor.predict_outputs(model, inputs) if metric.reads_every_output else adaptor.predict(model, inputs)
            inference += time.perf_counter() - started
            if metric.compares_to_fp32:
                labels = predictions if fp32 is None else fp32(position, inputs)
            labels = as_numpy(labels)
            metric.update(predictions, labels)
            batches, samples = batches + 1, samples + len(labels)
            if give_up is not None and samples <= give_up.samples:
                reachable = metric.reachable(give_up.samples - samples)
                if give_up.hopeless(reachable):
                    raise TrialHopeless(reachable, batches, samples)
        return Measured(metric=metric, samples=samples, inference_seconds=inference)


@dataclass
class Measured:
    """An evaluation's result; for a built-in metric also its state, the samples it saw and the
    seconds spent in the model (the rest is reading the data)."""

    value: float = 0.0
    metric: Any = None
    samples: Optional[int] = None  # None for an eval_func, which can't be counted or stopped early
    inference_seconds: Optional[float] = None


def _length(loader: Any) -> int:
    try:
        return len(loader)
    except TypeError:  # a loader without a length: not split
        return 0


def as_accuracy(value: Any) -> float:
    try:
        accuracy = float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"evaluation returned {value!r}; expected a number") from None
    if math.isnan(accuracy) or math.isinf(accuracy):
        raise EvaluationError(f"evaluation returned {accuracy}; expected a finite number")
    return accuracy
