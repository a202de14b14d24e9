"""The ask/tell protocol every strategy follows.

A strategy is pure logic: it proposes configs (``ask``), hears their outcomes (``tell``) in
proposal order, and says when it has nothing more to try (``finished``). It never runs a model,
so it is tested with a fake evaluation and is deterministic for a seed and the same outcomes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Union

from ..space import TuneConfig, TuningSpace
from ..trial import Request, Trial


Proposal = Union[TuneConfig, Request]  # a trial of a config, or a request (see trial.py)


class Strategy(ABC):
    # How many workers the tuning plans to run, set by the engine's owner before the first ask.
    # A strategy that proposes in rounds sizes them by this, not by the workers free at the
    # moment, so that its proposals do not depend on timing.
    parallelism: int = 1
    # Whether the strategy sends InspectRequests (the adaptor must implement inspect_tensors).
    inspects_tensors: bool = False

    def __init__(self, space: TuningSpace, higher_is_better: bool = True, seed: int = 0):
        self.space = space
        self.higher_is_better = higher_is_better
        self.seed = seed

    @abstractmethod
    def ask(self, n: int) -> list[Proposal]:
        """Up to ``n`` new proposals; an empty list means: waiting for outcomes, or finished."""

    @abstractmethod
    def tell(self, trial: Trial) -> None:
        """The outcome of a proposal, delivered in proposal order."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """True once the strategy will propose nothing more."""

    def obsolete(self) -> set[str]:
        """Keys of proposals whose outcome no longer matters (the engine may cancel them)."""
        return set()

    def score(self, trial: Trial) -> float:
        """Accuracy oriented so that larger is better; failed trials rank last."""
        if trial.accuracy is None:
            return float("-inf")
        return trial.accuracy if self.higher_is_better else -trial.accuracy
