"""The accuracy criterion: whether a config's accuracy is close enough to the fp32 baseline.

One home for the rule, used by the engine to judge trials and by a worker to stop an evaluation
that can no longer meet it (``trial.GiveUp``), so that both judge alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .config import AccuracyCriterion


@dataclass(frozen=True)
class Criterion:
    """Whether an accuracy is close enough to the fp32 baseline."""

    baseline: float
    relative: Optional[float] = None
    absolute: Optional[float] = None
    higher_is_better: bool = True

    @classmethod
    def from_config(cls, baseline: float, config: AccuracyCriterion, higher_is_better: bool) -> "Criterion":
        return cls(baseline, config.relative, config.absolute, higher_is_better)

    @property
    def allowed_loss(self) -> float:
        if self.absolute is not None:
            return self.absolute
        return (self.relative or 0.0) * abs(self.baseline)

    def loss(self, accuracy: float) -> float:
        return self.baseline - accuracy if self.higher_is_better else accuracy - self.baseline

    @property
    def threshold(self) -> float:
        """The accuracy a config must reach (or stay under, when lower is better)."""
        return self.baseline - self.allowed_loss if self.higher_is_better else self.baseline + self.allowed_loss

    def margin(self, accuracy: Optional[float]) -> Optional[float]:
        """Headroom left by ``accuracy``, relative to the baseline: >= 0 passes."""
        if accuracy is None or not math.isfinite(accuracy):
            return None
        return (self.allowed_loss - self.loss(accuracy)) / max(abs(self.baseline), 1e-12)

    def passes(self, accuracy: Optional[float]) -> bool:
        if accuracy is None or not math.isfinite(accuracy):
            return False
        return self.loss(accuracy) <= self.allowed_loss + 1e-12
