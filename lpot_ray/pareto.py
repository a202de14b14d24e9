"""The Pareto front of a tuning: the passing configs that no other passing config beats on both
accuracy and the objective, so a user can take a faster model with less margin or a safer one.

Computed from the trials as they were evaluated (accuracy from the trial, the objective's proxy),
by the tuning for ``TuneResult.pareto`` and from a history by ``lpot-ray history --pareto`` and
the report, alike.
"""

from __future__ import annotations

from typing import Iterable

from .trial import Kind, Trial


def front(trials: Iterable[Trial], higher_is_better: bool = True) -> list[Trial]:
    """The non-dominated passing trials, fastest (lowest objective) first; of configs equal on
    both, the one the engine ranks first (by key), so that a search that ran its course leads
    the front with the config it chose, where that passed compiled."""
    passing = {}
    for trial in trials:
        if trial.kind == Kind.TRIAL and trial.passed and trial.accuracy is not None and trial.objective is not None:
            passing.setdefault(trial.key, trial)
    sign = 1.0 if higher_is_better else -1.0
    ranked = sorted(passing.values(), key=lambda trial: (trial.objective, -sign * trial.accuracy, trial.key))
    kept: list[Trial] = []
    for trial in ranked:  # each kept one must be more accurate than every faster one
        if not kept or sign * trial.accuracy > sign * kept[-1].accuracy:
            kept.append(trial)
    return kept
