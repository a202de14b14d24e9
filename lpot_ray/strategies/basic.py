"""LPOT's basic strategy, made parallel.

Phases, each proposing a batch of independent configs:

1. model-wise: every model-wise config (one int8 scheme everywhere). If one passes, done.
2. rank: from the most accurate model-wise config, each op alone in fp32, all at once. If one
   passes, done; otherwise the ops are ranked by the accuracy their fallback recovered. (The
   mse strategy changes only this phase.)
3. accumulated fallback: the top-2, top-3, ... ranked ops in fp32, proposed as speculative
   prefixes as fast as workers free up. The smallest passing prefix wins; longer ones in flight
   become obsolete.
4. prune: from the passing fallback set, give int8 back to each op in parallel; keep the best
   passing smaller set and repeat until no op can be given back. LPOT keeps every accumulated op
   in fp32; pruning often halves that set.

An op falls back to bf16 where that is one of its choices (a CPU with native bf16), else to fp32,
as LPOT falls back int8 -> bf16 -> fp32. If no accumulated bf16 fallback passes, phase 3 runs
again with fp32 instead, in the same ranking.

Outcomes are told in proposal order, so the result does not depend on the number of workers.
Phases 3 and 4 use only whether a config passes, so they propose verdict-only trials, which a
worker may stop once the criterion is out of reach.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..space import FP32, TuneConfig, TuningSpace
from ..trial import EvaluateRequest, Status, Trial
from .base import Proposal, Strategy


class BasicStrategy(Strategy):
    def __init__(self, space: TuningSpace, higher_is_better: bool = True, seed: int = 0):
        super().__init__(space, higher_is_better, seed)
        self.phase = "model_wise"
        self.queue: list[Proposal] = list(space.model_wise_configs())
        self.waiting: dict[str, Proposal] = {}
        self.outcomes: list[Trial] = []
        self.base: Optional[TuneConfig] = None
        self.ranking: list[str] = []
        self.to_fp32 = False  # whether fallback skips bf16 (after bf16 fallbacks all failed)
        self._obsolete: set[str] = set()
        self._done = False

    @property
    def finished(self) -> bool:
        return self._done and not self.waiting

    def obsolete(self) -> set[str]:
        return self._obsolete

    def ask(self, n: int) -> list[Proposal]:
        proposals: list[Proposal] = []
        while len(proposals) < n and not self._done:
            if self.queue:
                proposal = self.queue.pop(0)
                self.waiting[proposal.key] = proposal
                proposals.append(proposal)
            elif self.waiting:
                break
            else:
                self._advance()
        return proposals

    def tell(self, trial: Trial) -> None:
        if self.waiting.pop(trial.key, None) is None or trial.status == Status.CANCELLED:
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
            if passing or all(trial.status.is_failure for trial in outcomes):
                return self._finish()  # done, or nothing quantized runs at all: say so, stop
            self.base = max(outcomes, key=self.score).config
            self._start("rank", self._ranking_proposals())
        elif self.phase == "rank":
            ranking = self._rank(outcomes)
            if ranking is None:
                return self._finish()
            self.ranking = ranking
            self._start("accumulate", self._accumulated(self.first_prefix))
        elif self.phase in ("accumulate", "prune"):
            if not passing:
                if self.phase == "accumulate" and not self.to_fp32 and self._uses_bf16():
                    self.to_fp32 = True  # bf16 was not enough: the same ranking, in fp32
                    return self._start("accumulate", self._accumulated(1))
                return self._finish()
            best = min(passing, key=lambda trial: (trial.objective, -self.score(trial), trial.key))
            fallback = _fallen_back(self.base, best.config)
            if len(fallback) <= 1:
                return self._finish()
            self._start("prune", [_verdict(self._fall_back(set(fallback) - {name})) for name in fallback])

    def _fall_back(self, names) -> TuneConfig:
        """The base with ``names`` one step down: bf16 where it is a choice, else fp32."""
        names = set(names)
        return replace(self.base, op_schemes=tuple(
            (name, (FP32 if self.to_fp32 else self.space.fallback_for(name)) if name in names else scheme)
            for name, scheme in self.base.op_schemes))

    def _accumulated(self, first: int) -> list[Proposal]:
        return [_verdict(self._fall_back(self.ranking[:size])) for size in range(first, len(self.ranking) + 1)]

    def _uses_bf16(self) -> bool:
        return any(self.space.fallback_for(name) != FP32 for name in self.ranking)

    # --- how ops are ranked for fallback (the part other strategies change) -------------------
    first_prefix = 2  # one-op fallbacks were the ranking trials themselves

    def _ranking_proposals(self) -> list[Proposal]:
        """Each int8 op of the base alone in fp32, all at once."""
        return [self._fall_back([name]) for name in self.base.int8_ops]

    def _rank(self, outcomes: list[Trial]) -> Optional[list[str]]:
        """Ops by the accuracy their own fallback recovered; None ends the search (a one-op
        fallback passed, or there is nothing to accumulate)."""
        if any(trial.passed for trial in outcomes) or len(outcomes) < 2:
            return None
        ranked = sorted(outcomes, key=self.score, reverse=True)  # stable: ties keep op order
        return [_new_fallback(self.base, trial.config) for trial in ranked]

    def _start(self, phase: str, configs: list[Proposal]) -> None:
        self.phase = phase
        self.queue = configs
        if not configs:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.queue = []


def _verdict(config: TuneConfig) -> EvaluateRequest:
    """A trial of which only pass or fail matters."""
    return EvaluateRequest(config, verdict_only=True)


def _fallen_back(base: TuneConfig, config: TuneConfig) -> list[str]:
    """The ops ``config`` moved off the base's scheme (to bf16 or fp32), in model order."""
    schemes = dict(base.op_schemes)
    return [name for name, scheme in config.op_schemes if scheme != schemes[name]]


def _new_fallback(base: TuneConfig, config: TuneConfig) -> str:
    """The op a one-op fallback config moves off the base's scheme."""
    (name,) = _fallen_back(base, config)
    return name
