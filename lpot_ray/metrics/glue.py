"""LPOT's GLUE metric: each GLUE task's own figure of a sentence classifier (or, for sts-b,
regressor): accuracy for most tasks, Matthews correlation for cola, the mean of Pearson's and
Spearman's correlations for sts-b. Predictions are the model's logits (or sts-b's scores)."""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from ..errors import ConfigError, EvaluationError
from .base import Metric
from .classification import Accuracy, BinaryConfusion

ACCURACY_TASKS = ("mrpc", "qqp", "qnli", "rte", "mnli", "wnli", "sst-2")
TASKS = ACCURACY_TASKS + ("cola", "sts-b")


class MatthewsCorrelation(BinaryConfusion):
    """Matthews correlation of binary predictions."""

    def result(self) -> float:
        tp, tn, fp, fn = self.counts()
        denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return (tp * tn - fp * fn) / denominator if denominator else 0.0


class MeanCorrelation(Metric):
    """The mean of Pearson's and Spearman's correlations of scores with labels (sts-b). Ranks
    need every sample, so the state is the scores themselves, merged by concatenation."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.scores: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, preds: np.ndarray, labels: np.ndarray) -> None:
        preds, labels = np.asarray(preds, dtype=np.float64).reshape(-1), np.asarray(labels, dtype=np.float64).reshape(-1)
        if preds.shape != labels.shape:
            raise EvaluationError(f"GLUE sts-b: {preds.size} scores for {labels.size} labels (one score per pair expected)")
        self.scores.append(preds)
        self.labels.append(labels)

    def merge(self, other: Metric) -> None:
        if not isinstance(other, MeanCorrelation):
            raise EvaluationError(f"can't merge {type(other).__name__} into {type(self).__name__}")
        self.scores += other.scores
        self.labels += other.labels

    def result(self) -> float:
        from scipy import stats

        scores, labels = np.concatenate(self.scores or [np.empty(0)]), np.concatenate(self.labels or [np.empty(0)])
        if scores.size < 2:
            raise EvaluationError(f"GLUE sts-b: {scores.size} samples evaluated; a correlation needs at least 2")
        pearson, spearman = stats.pearsonr(scores, labels)[0], stats.spearmanr(scores, labels)[0]
        return float(np.nan_to_num((pearson + spearman) / 2))


class GLUE(Metric):
    """LPOT's ``GLUE: {task: mrpc}``: the figure LPOT reports for the task."""

    def __init__(self, task: str = "mrpc") -> None:
        if task not in TASKS:
            raise ConfigError(f"`evaluation.accuracy.metric.GLUE.task`: {task!r} must be one of {', '.join(TASKS)}")
        self.task = task
        self.figure: Metric = {"cola": MatthewsCorrelation, "sts-b": MeanCorrelation}.get(task, Accuracy)()

    @property
    def merges_exactly(self) -> bool:  # type: ignore[override]
        return self.figure.merges_exactly

    def update(self, preds: Any, labels: Any) -> None:
        if isinstance(preds, (list, tuple)) and len(preds) == 1:  # a model's only output
            preds = preds[0]
        self.figure.update(preds, labels)

    def result(self) -> float:
        return self.figure.result()

    def merge(self, other: Metric) -> None:
        if not isinstance(other, GLUE) or other.task != self.task:
            raise EvaluationError(f"can't merge {type(other).__name__} into GLUE {self.task}")
        self.figure.merge(other.figure)

    def reset(self) -> None:
        self.figure.reset()

    def reachable(self, samples_left: int) -> Optional[tuple[float, float]]:
        return self.figure.reachable(samples_left)
