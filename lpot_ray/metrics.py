"""Built-in accuracy metrics with mergeable state.

A metric sees numpy arrays only (the adaptor converts framework tensors), keeps counts rather
than per-sample lists, and can ``merge`` another instance's state, so an evaluation split across
workers combines into the same figure as a whole one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from .errors import ConfigError, EvaluationError


class Metric(ABC):
    """update(preds, labels) per batch, result() at the end, merge(other) across splits."""

    higher_is_better = True

    @abstractmethod
    def update(self, preds: np.ndarray, labels: np.ndarray) -> None: ...

    @abstractmethod
    def result(self) -> float: ...

    @abstractmethod
    def merge(self, other: "Metric") -> None: ...

    @abstractmethod
    def reset(self) -> None: ...


class _CountingMetric(Metric):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def merge(self, other: "Metric") -> None:
        assert isinstance(other, type(self))
        self.correct += other.correct
        self.total += other.total

    def result(self) -> float:
        if self.total == 0:
            raise EvaluationError(f"{type(self).__name__}: no samples were evaluated (empty evaluation loader?)")
        return self.correct / self.total


class TopK(_CountingMetric):
    """Share of samples whose label is among the k highest scores (LPOT's ``topk``)."""

    def __init__(self, k: int = 1) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"`evaluation.accuracy.metric.topk`: {k!r} must be a positive integer")
        self.k = k
        super().__init__()

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds = np.asarray(preds)
        labels = np.asarray(labels).reshape(-1)
        if preds.ndim != 2 or preds.shape[0] != labels.shape[0]:
            raise EvaluationError(
                f"topk: expected scores of shape (batch, classes) matching {labels.shape[0]} labels, got {preds.shape}"
            )
        top = np.argsort(-preds, axis=1, kind="stable")[:, : self.k]
        self.correct += int((top == labels[:, None]).any(axis=1).sum())
        self.total += labels.shape[0]


class Accuracy(_CountingMetric):
    """Exact-match accuracy of predicted classes (argmax of scores, or labels given directly)."""

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds = np.asarray(preds)
        labels = np.asarray(labels).reshape(-1)
        if preds.ndim == 2:
            preds = preds.argmax(axis=1)
        preds = preds.reshape(-1)
        if preds.shape != labels.shape:
            raise EvaluationError(f"Accuracy: {preds.shape[0]} predictions for {labels.shape[0]} labels")
        self.correct += int((preds == labels).sum())
        self.total += labels.shape[0]


def make_metric(spec: dict[str, Any]) -> Metric:
    """Build the metric named by the YAML ``evaluation.accuracy.metric`` mapping, e.g. {topk: 1}."""
    from . import registry

    (name, params), = spec.items()
    cls = registry.metrics.get(name)
    if params is None or params == {}:
        return cls()
    if isinstance(params, dict):
        return cls(**params)
    return cls(params)
