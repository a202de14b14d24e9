"""Regression and losses: Loss, MAE, MSE, RMSE (lower is better)."""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np

from ..errors import ConfigError, EvaluationError
from .base import SummedMetric


def _pair(preds: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if preds.shape != labels.shape:
        if preds.size != labels.size:
            raise EvaluationError(f"{metric}: predictions of shape {preds.shape} don't match labels of shape {labels.shape}")
        preds, labels = preds.reshape(-1), labels.reshape(-1)
    return preds, labels


class Loss(SummedMetric):
    """The mean of the model's outputs taken as per-sample losses (LPOT's ``Loss``)."""

    higher_is_better = False
    SUMS = ("loss", "count")

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds = np.asarray(preds, dtype=np.float64)
        self.add(loss=preds.sum(), count=preds.shape[0] if preds.ndim else 1)

    def result(self) -> float:
        return self.sums["loss"] / self.require("count")


class _MeanError(SummedMetric):
    """Mean of an element-wise error between predictions and labels, or, with LPOT's
    ``compare_label: false``, between the outputs and the fp32 model's outputs."""

    higher_is_better = False
    SUMS = ("error", "count")

    def __init__(self, compare_label: bool = True) -> None:
        if not isinstance(compare_label, bool):
            raise ConfigError(f"`evaluation.accuracy.metric.{type(self).__name__}.compare_label`: {compare_label!r} "
                              "must be true or false")
        self.compares_to_fp32 = not compare_label
        super().__init__()

    @staticmethod
    @abstractmethod
    def elementwise(difference: np.ndarray) -> np.ndarray:
        """The per-element error, e.g. its absolute value or its square."""

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds, labels = _pair(preds, labels, type(self).__name__)
        self.add(error=self.elementwise(preds - labels).sum(), count=preds.size)

    def result(self) -> float:
        return self.sums["error"] / self.require("count")


class MAE(_MeanError):
    elementwise = staticmethod(np.abs)


class MSE(_MeanError):
    elementwise = staticmethod(np.square)


class RMSE(MSE):
    def result(self) -> float:
        return math.sqrt(super().result())
