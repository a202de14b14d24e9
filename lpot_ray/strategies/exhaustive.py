"""LPOT's exhaustive strategy: every config of the space, in product order, lazily.

The space is never materialised: config ``i`` is decoded from ``i`` as a mixed-radix number over
the per-op choices (``TuningSpace.config_at``), so a space of 10^30 configs costs nothing to start.
Proposals do not depend on outcomes, so every free worker always has one.
"""

from __future__ import annotations

from ..space import TuneConfig
from ..trial import Trial
from .base import Strategy


class ExhaustiveStrategy(Strategy):
    def __init__(self, space, higher_is_better: bool = True, seed: int = 0):
        super().__init__(space, higher_is_better, seed)
        self.next_index = 0

    @property
    def finished(self) -> bool:
        return self.next_index >= self.space.size

    def ask(self, n: int) -> list[TuneConfig]:
        proposals = []
        while len(proposals) < n and not self.finished:
            proposals.append(self.space.config_at(self.next_index))
            self.next_index += 1
        return proposals

    def tell(self, trial: Trial) -> None:
        pass
