"""LPOT's random strategy: distinct configs drawn uniformly from the space, seeded.

Indices are drawn with ``random.Random(seed)`` over the whole (lazily decoded) space, so the
sequence of proposals is the same for a seed whatever the number of workers. Each config is
proposed once; the strategy finishes when the space is exhausted.
"""

from __future__ import annotations

import random

from ..space import TuneConfig
from ..trial import Trial
from .base import Strategy

_DRAWS_BEFORE_SCAN = 64


class RandomStrategy(Strategy):
    def __init__(self, space, higher_is_better: bool = True, seed: int = 0):
        super().__init__(space, higher_is_better, seed)
        self.random = random.Random(seed)
        self.proposed: set[int] = set()

    @property
    def finished(self) -> bool:
        return len(self.proposed) >= self.space.size

    def ask(self, n: int) -> list[TuneConfig]:
        proposals = []
        while len(proposals) < n and not self.finished:
            index = self._draw()
            self.proposed.add(index)
            proposals.append(self.space.config_at(index))
        return proposals

    def _draw(self) -> int:
        size = self.space.size
        for _ in range(_DRAWS_BEFORE_SCAN):
            index = self.random.randrange(size)
            if index not in self.proposed:
                return index
        # A nearly exhausted space: walk on from a random point to the next unproposed config.
        start = self.random.randrange(size)
        return next((start + step) % size for step in range(size) if (start + step) % size not in self.proposed)

    def tell(self, trial: Trial) -> None:
        pass
