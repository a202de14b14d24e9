"""The metric contract, and a base for metrics whose state is a few running sums."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

from ..errors import EvaluationError


class Metric(ABC):
    """update(preds, labels) per batch, result() at the end, merge(other) across splits."""

    higher_is_better = True
    # Whether merging the states of parts gives exactly the whole's result (counts do; float
    # sums may differ in the last bit): only such a metric's evaluation is split across workers,
    # so that a result never depends on how many were free.
    merges_exactly = False
    # Whether the labels are the fp32 model's outputs on the same batch rather than the dataset's
    # (LPOT's ``compare_label: false``): the fp32 model itself then scores 0 error.
    compares_to_fp32 = False
    # Whether ``update`` takes every output of the model (a detector's boxes, scores, classes)
    # rather than its first.
    reads_every_output = False

    @abstractmethod
    def update(self, preds: Any, labels: Any) -> None: ...

    @abstractmethod
    def result(self) -> float: ...

    @abstractmethod
    def merge(self, other: "Metric") -> None: ...

    @abstractmethod
    def reset(self) -> None: ...

    def reachable(self, samples_left: int) -> Optional[tuple[float, float]]:
        """The lowest and highest result possible once ``samples_left`` more samples are
        evaluated, whatever they hold; None where the metric is unbounded. What lets a hopeless
        trial stop early, exactly."""
        return None


class SummedMetric(Metric):
    """State = named running sums (``SUMS``); merging adds them."""

    SUMS: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.SUMS, 0.0)

    def add(self, **amounts: float) -> None:
        for name, amount in amounts.items():
            self.sums[name] += float(amount)

    def merge(self, other: "Metric") -> None:
        if not isinstance(other, type(self)):
            raise EvaluationError(f"can't merge {type(other).__name__} into {type(self).__name__}")
        for name in self.SUMS:
            self.sums[name] += other.sums[name]

    def require(self, name: str) -> float:
        """A sum that must be positive for a result (e.g. the sample count)."""
        if self.sums[name] <= 0:
            raise EvaluationError(f"{type(self).__name__}: no samples were evaluated (empty evaluation loader?)")
        return self.sums[name]


class ShareCorrect(SummedMetric):
    """A share of samples counted correct (``correct`` of ``total``): bounded, since each sample
    still to come can only be right or wrong."""

    SUMS = ("correct", "total")
    merges_exactly = True

    def result(self) -> float:
        return self.sums["correct"] / self.require("total")

    def reachable(self, samples_left: int) -> Optional[tuple[float, float]]:
        total = self.sums["total"] + samples_left
        if total <= 0:
            return None
        return self.sums["correct"] / total, (self.sums["correct"] + samples_left) / total
