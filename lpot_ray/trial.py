"""A trial: one evaluated tune config and everything measured about it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

from .space import TuneConfig

OK, FAILED, CANCELLED = "ok", "failed", "cancelled"


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

    @property
    def key(self) -> str:
        return self.config.key

    def to_row(self) -> dict:
        row = asdict(self)
        row["config"] = self.config.to_dict()
        row["key"] = self.key
        return row
