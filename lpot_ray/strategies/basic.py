"""LPOT's basic strategy, made parallel.

Phases, each proposing a batch of independent configs:

1. model-wise: every model-wise config (one int8 scheme everywhere). If one passes, done.
2. one-op fallback: from the most accurate model-wise config, each op alone in fp32, all at once.
   If one passes, done; otherwise the ops are ranked by the accuracy their fallback recovered.
3. accumulated fallback: the top-2, top-3, ... ranked ops in fp32, proposed as speculative
   prefixes as fast as workers free up. The smallest passing prefix wins; longer ones in flight
   become obsolete.
4. prune: from the passing fallback set, give int8 back to each op in parallel; keep the best
   passing smaller set and repeat until no op can be given back. LPOT keeps every accumulated op
   in fp32; pruning often halves that set.

Outcomes are told in proposal order, so the result does not depend on the number of workers.
"""

from __future__ import annotations

from typing import Optional

from ..space import TuneConfig, TuningSpace
from ..trial import CANCELLED, FAILED, Trial
from .base import Strategy


class BasicStrategy(Strategy):
    def __init__(self, space: TuningSpace, higher_is_better: bool = True, seed: int = 0):
        super().__init__(space, higher_is_better, seed)
        self.phase = "model_wise"
        self.queue: list[TuneConfig] = space.model_wise_configs()
        self.waiting: dict[str, TuneConfig] = {}
        self.outcomes: list[Trial] = []
        self.base: Optional[TuneConfig] = None
        self.ranking: list[str] = []
        self._obsolete: set[str] = set()
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done and not self.waiting

    def obsolete(self) -> set[str]:
        return self._obsolete

    def ask(self, n: int) -> list[TuneConfig]:
        proposals: list[TuneConfig] = []
        while len(proposals) < n and not self._done:
            if self.queue:
                config = self.queue.pop(0)
                self.waiting[config.key] = config
                proposals.append(config)
            elif self.waiting:
                break
            else:
                self._advance()
        return proposals

    def tell(self, trial: Trial) -> None:
        if self.waiting.pop(trial.key, None) is None or trial.status == CANCELLED:
            return
        self.outcomes.append(trial)
        if self.phase == "accumulate" and trial.passed:
            # Told in proposal order: every shorter prefix already failed, longer ones are moot.
            self._obsolete |= set(self.waiting)
            self.waiting.clear()
            self.queue.clear()

    # --- phases ------------------------------------------------------------------------------
    def _advance(self) -> None:
        outcomes, self.outcomes = self.outcomes, []
        passing = [trial for trial in outcomes if trial.passed]
        if self.phase == "model_wise":
            if passing or all(trial.status == FAILED for trial in outcomes):
                return self._finish()  # done, or nothing quantized runs at all: say so, stop
            self.base = max(outcomes, key=self.score).config
            self._start("one_op", [self.base.with_fallback([name]) for name in self.base.int8_ops])
        elif self.phase == "one_op":
            if passing or len(outcomes) < 2:
                return self._finish()
            ranked = sorted(outcomes, key=self.score, reverse=True)  # stable: ties keep op order
            self.ranking = [_new_fallback(self.base, trial.config) for trial in ranked]
            prefixes = [self.base.with_fallback(self.ranking[:size]) for size in range(2, len(self.ranking) + 1)]
            self._start("accumulate", prefixes)
        elif self.phase in ("accumulate", "prune"):
            if not passing:
                return self._finish()
            best = min(passing, key=lambda trial: (trial.objective, -self.score(trial), trial.key))
            fallback = [name for name in best.config.fp32_ops if name not in self.base.fp32_ops]
            if len(fallback) <= 1:
                return self._finish()
            self._start("prune", [self.base.with_fallback(set(best.config.fp32_ops) - {name}) for name in fallback])

    def _start(self, phase: str, configs: list[TuneConfig]) -> None:
        self.phase = phase
        self.queue = configs
        if not configs:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.queue = []


def _new_fallback(base: TuneConfig, config: TuneConfig) -> str:
    """The op a one-op fallback config puts in fp32 beyond what the base already had."""
    (name,) = set(config.fp32_ops) - set(base.fp32_ops)
    return name
