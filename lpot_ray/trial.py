"""A trial: one evaluated tune config and everything measured about it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .space import TuneConfig

OK, FAILED, CANCELLED = "ok", "failed", "cancelled"
TRIAL, INSPECTION = "trial", "inspection"  # what was run: a candidate, or a request for per-op errors
WORKER_LOST = "worker lost:"  # how the reason of a trial that failed only because workers died begins


@dataclass
class Trial:
    """The outcome of one candidate, numbered by proposal order (``seq``)."""

    seq: int
    config: TuneConfig
    status: str = OK
    accuracy: Optional[float] = None
    passed: bool = False
    objective: Optional[float] = None  # share of MACs left fp32: lower is faster
    reason: str = ""
    worker: str = ""
    started: float = 0.0
    duration: float = 0.0
    figures: dict = field(default_factory=dict)
    # Accuracy headroom against the criterion, relative to the baseline (>= 0 passes); set by
    # the engine when it tells the strategy, for strategies that model "how close to passing".
    margin: Optional[float] = None
    kind: str = TRIAL

    @property
    def key(self) -> str:
        return self.config.key if self.kind == TRIAL else f"{self.kind}-{self.config.key}"

