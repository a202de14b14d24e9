"""Semantic segmentation: LPOT's ``mIOU``, the intersection over union per class, averaged.

``preds`` are per-pixel class indices (batch, height, width), or scores with the classes on
axis 1 (batch, classes, height, width); ``labels`` are class indices (batch, height, width).
Pixels labelled outside ``0..num_classes-1`` (an "ignore" value such as 255) are left out. The
state is the confusion matrix, merged by adding.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, EvaluationError
from .base import Metric


class MIoU(Metric):
    def __init__(self, num_classes: int = 21) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ConfigError(f"`evaluation.accuracy.metric.mIOU.num_classes`: {num_classes!r} must be an integer >= 2")
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds, labels = np.asarray(preds), np.asarray(labels)
        if preds.ndim == labels.ndim + 1:  # scores: the class axis after the batch
            preds = preds.argmax(axis=1)
        if preds.shape != labels.shape:
            raise EvaluationError(f"mIOU: predictions of shape {preds.shape} don't match labels of shape {labels.shape}")
        valid = (labels >= 0) & (labels < self.num_classes)
        pairs = self.num_classes * labels[valid].astype(np.int64) + preds[valid].astype(np.int64)
        self.confusion += np.bincount(pairs, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def merge(self, other: Metric) -> None:
        if not isinstance(other, MIoU) or other.num_classes != self.num_classes:
            raise EvaluationError(f"can't merge {type(other).__name__} into mIOU over {self.num_classes} classes")
        self.confusion += other.confusion

    def result(self) -> float:
        if not self.confusion.any():
            raise EvaluationError("mIOU: no labelled pixels were evaluated (empty evaluation loader?)")
        intersection = np.diag(self.confusion)
        union = self.confusion.sum(axis=0) + self.confusion.sum(axis=1) - intersection
        present = union > 0  # classes neither predicted nor labelled don't count
        return float((intersection[present] / union[present]).mean())
