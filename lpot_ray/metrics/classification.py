"""Classification: topk, Accuracy, F1 (binary)."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, EvaluationError
from .base import ShareCorrect, SummedMetric


def _class_labels(labels: np.ndarray, metric: str) -> np.ndarray:
    """Class indices, from indices or one-hot rows (LPOT accepts both). Labels that are not
    whole numbers (strings, fractions) would never equal a predicted class: refused."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] > 1:
        return labels.argmax(axis=1)
    labels = labels.reshape(-1)
    whole = labels.dtype.kind in "iub" or (labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0))
    if not whole:
        example = labels[0] if labels.size else "?"
        raise EvaluationError(f"{metric}: labels must be class indices (whole numbers), got {labels.dtype} "
                              f"labels such as {example!r}; map them to 0..classes-1 in the dataset")
    return labels.astype(np.int64)


def predicted_classes(preds: np.ndarray, labels: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Predicted classes (argmax of scores, or classes given) and labels, checked to match."""
    preds, labels = np.asarray(preds), _class_labels(labels, metric)
    if preds.ndim == 2:  # scores: one column is a sigmoid's probability of class 1
        preds = (preds[:, 0] > 0.5).astype(np.int64) if preds.shape[1] == 1 else preds.argmax(axis=1)
    preds = preds.reshape(-1)
    if preds.shape != labels.shape:
        raise EvaluationError(f"{metric}: {preds.shape[0]} predictions for {labels.shape[0]} labels")
    return preds, labels


class TopK(ShareCorrect):
    """Share of samples whose label is among the k highest scores (LPOT's ``topk``)."""

    def merge(self, other) -> None:
        if getattr(other, "k", None) != self.k:
            raise EvaluationError(f"can't merge top-{getattr(other, 'k', '?')} into top-{self.k}")
        super().merge(other)

    def __init__(self, k: int = 1) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"`evaluation.accuracy.metric.topk`: {k!r} must be a positive integer")
        self.k = k
        super().__init__()

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds, labels = np.asarray(preds), _class_labels(labels, "topk")
        if preds.ndim != 2 or preds.shape[0] != labels.shape[0]:
            raise EvaluationError(
                f"topk: expected scores of shape (batch, classes) matching {labels.shape[0]} labels, got {preds.shape}"
            )
        if labels.size and (labels.min() < 0 or labels.max() >= preds.shape[1]):
            raise EvaluationError(f"topk: label {labels.max() if labels.max() >= preds.shape[1] else labels.min()} "
                                  f"is not a class of a model that gives {preds.shape[1]} scores per sample")
        top = np.argsort(-preds, axis=1, kind="stable")[:, : self.k]
        self.add(correct=(top == labels[:, None]).any(axis=1).sum(), total=labels.shape[0])


class Accuracy(ShareCorrect):
    """Exact-match accuracy of predicted classes (argmax of scores, or classes given directly)."""

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds, labels = predicted_classes(preds, labels, "Accuracy")
        self.add(correct=(preds == labels).sum(), total=labels.shape[0])


class BinaryConfusion(SummedMetric):
    """Binary classification (positive class 1) from summed confusion counts; a subclass says
    which figure of them it reports."""

    SUMS = ("tp", "tn", "fp", "fn")
    merges_exactly = True

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds, labels = predicted_classes(preds, labels, type(self).__name__)
        predicted, actual = preds == 1, labels == 1
        self.add(tp=(predicted & actual).sum(), tn=(~predicted & ~actual).sum(),
                 fp=(predicted & ~actual).sum(), fn=(~predicted & actual).sum())

    def counts(self) -> tuple[float, float, float, float]:
        """tp, tn, fp, fn; an error if no sample was evaluated."""
        if not any(self.sums.values()):
            raise EvaluationError(f"{type(self).__name__}: no samples were evaluated (empty evaluation loader?)")
        return self.sums["tp"], self.sums["tn"], self.sums["fp"], self.sums["fn"]


class F1(BinaryConfusion):
    """F1 score of binary classification."""

    def result(self) -> float:
        tp, _, fp, fn = self.counts()
        return 2 * tp / (2 * tp + fp + fn) if tp else 0.0
