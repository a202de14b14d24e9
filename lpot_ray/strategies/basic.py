"""LPOT's basic strategy, made parallel.

Phases, each proposing a batch of independent configs:

1. model-wise: every model-wise config (one int8 scheme everywhere). If one passes, done; if
   not, and the space has accuracy-recovery recipes, the most accurate one with each recipe
   alone, all at once (SmoothQuant once per alpha), then with every recipe that helped together:
   if one passes, done. Fallback then starts from the most accurate config of all, its recipes kept.
2. rank: from the most accurate config so far (model-wise, or with recipes), each op alone in
   fp32, all at once. If one passes, done; otherwise the ops are ranked by the accuracy their
   fallback recovered. (The mse strategy changes only this phase.) A model of more than
   ``GROUPED_ABOVE`` int8 ops ranks groups of ops instead, as the model groups them (a
   transformer layer, a residual stage: ``op_groups``), so that a 36-Linear model needs 7
   ranking trials, not 36.
3. accumulated fallback: the top-2, top-3, ... ranked ops (or groups) in fp32, proposed as
   speculative prefixes as fast as workers free up. The smallest passing prefix wins; longer ones
   in flight become obsolete.
4. prune: from the passing fallback set, give int8 back to each op in parallel; keep the best
   passing smaller set and repeat until no op can be given back. LPOT keeps every accumulated op
   in fp32; pruning often halves that set. After a group fallback, every op whose give-back
   passed alone is given back at once in one more trial, and pruning goes on from there if it
   passes (from the best single give-back if not), so a group shrinks in a few rounds.

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

GROUPED_ABOVE = 16  # int8 ops above which ops are ranked in groups
MAX_GROUPS = 12  # groups ranked at most: one ranking round on a dozen workers


class BasicStrategy(Strategy):
    def __init__(self, space: TuningSpace, higher_is_better: bool = True, seed: int = 0):
        super().__init__(space, higher_is_better, seed)
        self.phase = "model_wise"
        self.queue: list[Proposal] = list(space.model_wise_configs())
        self.waiting: dict[str, Proposal] = {}
        self.outcomes: list[Trial] = []
        self.tried: list[Trial] = []  # model-wise and recipe outcomes, the most accurate of which falls back
        self.base: Optional[TuneConfig] = None
        self.ranking: list[str] = []
        self.prefix_sizes: list[int] = []  # the accumulated prefixes: ops in fp32 for each
        self.grouped = False  # whether the ops were ranked in groups
        self.pruning: list[str] = []  # the fallback set being pruned
        self.single_best: Optional[Trial] = None  # pruning's fallback while all its give-backs are tried at once
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
            self.tried = outcomes
            variants = self.space.recipe_variants(max(outcomes, key=self.score).config)
            if variants:
                return self._start("recipes", variants)
            self._fall_back_from(outcomes)
        elif self.phase == "recipes":
            if passing:
                return self._finish()
            base = max(self.tried, key=self.score)
            helping = sorted((trial for trial in outcomes if self.score(trial) > self.score(base)),
                             key=self.score, reverse=True)
            self.tried += outcomes
            combined = self.space.combined_recipes(base.config, (trial.config for trial in helping))
            if combined is not None:
                return self._start("combined_recipes", [combined])
            self._fall_back_from(self.tried)
        elif self.phase == "combined_recipes":
            if passing:
                return self._finish()
            self._fall_back_from(self.tried + outcomes)
        elif self.phase == "rank":
            if passing:
                return self._prune_from(self._best(passing))  # a group fallback passed: make it smaller
            ranked = self._rank(outcomes)
            if ranked is None:
                return self._finish()
            self.ranking = [name for group in ranked for name in group]
            self.prefix_sizes = [sum(map(len, ranked[:count])) for count in range(1, len(ranked) + 1)]
            self._start("accumulate", self._accumulated(self.first_prefix))
        elif self.phase == "combine":
            best, self.single_best = (passing[0] if passing else self.single_best), None
            self._prune_from(best)
        elif self.phase in ("accumulate", "prune"):
            if not passing:
                if self.phase == "accumulate" and not self.to_fp32 and self._uses_bf16():
                    self.to_fp32 = True  # bf16 was not enough: the same ranking, in fp32
                    return self._start("accumulate", self._accumulated(1))
                return self._finish()
            best = self._best(passing)
            if self.phase == "prune" and self.grouped and len(passing) > 1:
                given_back = set().union(*(set(self.pruning) - set(_fallen_back(self.base, trial.config))
                                           for trial in passing))
                self.single_best = best
                return self._start("combine", [_verdict(self._fall_back(set(self.pruning) - given_back))])
            self._prune_from(best)

    def _fall_back_from(self, outcomes: list[Trial]) -> None:
        """Rank the ops of the most accurate config evaluated so far, for fallback."""
        self.base = max(outcomes, key=self.score).config
        self._start("rank", self._ranking_proposals())

    def _best(self, passing: list[Trial]) -> Trial:
        return min(passing, key=lambda trial: (trial.objective, -self.score(trial), trial.key))

    def _prune_from(self, best: Trial) -> None:
        """Give int8 back to each op ``best`` has in fp32, one op per trial, all at once."""
        self.pruning = _fallen_back(self.base, best.config)
        if len(self.pruning) <= 1:
            return self._finish()
        self._start("prune", [_verdict(self._fall_back(set(self.pruning) - {name})) for name in self.pruning])

    def _fall_back(self, names) -> TuneConfig:
        """The base with ``names`` one step down: bf16 where it is a choice, else fp32."""
        names = set(names)
        return replace(self.base, op_schemes=tuple(
            (name, (FP32 if self.to_fp32 else self.space.fallback_for(name)) if name in names else scheme)
            for name, scheme in self.base.op_schemes))

    def _accumulated(self, first: int) -> list[Proposal]:
        """The ranked prefixes from the ``first``-th on (1-based), each a verdict-only trial."""
        return [_verdict(self._fall_back(self.ranking[:size])) for size in self.prefix_sizes[first - 1:]]

    def _uses_bf16(self) -> bool:
        return any(self.space.fallback_for(name) != FP32 for name in self.ranking)

    # --- how ops are ranked for fallback (the part other strategies change) -------------------
    first_prefix = 2  # the first ranked op (or group) alone was a ranking trial itself

    def _ranking_proposals(self) -> list[Proposal]:
        """Each int8 op of the base (or each group of ops, in a large model) alone in fp32, all at once."""
        ops = list(self.base.int8_ops)
        self.grouped = len(ops) > GROUPED_ABOVE
        groups = op_groups(ops, MAX_GROUPS) if self.grouped else [[name] for name in ops]
        return [self._fall_back(group) for group in groups]

    def _rank(self, outcomes: list[Trial]) -> Optional[list[list[str]]]:
        """Groups of ops (single ops in a small model), by the accuracy their own fallback
        recovered, most first; None ends the search (nothing to accumulate)."""
        if len(outcomes) < 2:
            return None
        ranked = sorted(outcomes, key=self.score, reverse=True)  # stable: ties keep model order
        return [_fallen_back(self.base, trial.config) for trial in ranked]

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


def op_groups(names: list[str], most: int) -> list[list[str]]:
    """Ops grouped as the model groups them, in model order: by the module path prefix (``a.b`` of
    ``a.b.c.d``) of the deepest level that makes between 2 and ``most`` groups, an op never being
    a group of its own below the top level; where names have no such structure (``dense_3``),
    consecutive runs of about equal size."""
    best: list[list[str]] = []
    for depth in range(1, max(len(name.split(".")) for name in names)):
        groups: dict[str, list[str]] = {}
        for name in names:
            parts = name.split(".")
            groups.setdefault(".".join(parts[:min(depth, max(1, len(parts) - 1))]), []).append(name)
        if 2 <= len(groups) <= most:
            best = list(groups.values())
    if best:
        return best
    size = -(-len(names) // min(most, max(2, round(len(names) ** 0.5))))
    return [names[start:start + size] for start in range(0, len(names), size)]
