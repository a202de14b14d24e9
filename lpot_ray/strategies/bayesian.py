"""Bayesian optimisation with batched expected improvement, over a space that includes fp32.

The surrogate is scikit-learn's ``GaussianProcessRegressor`` over a one-hot encoding of every
op's choices, fp32 fallback included (Neural Compressor's bayesian leaves fp32 out, so on a model
that needs a fallback it can never pass). The target to maximise is

    score = -fp32_macs_fraction - PENALTY * max(0, -margin)

where ``margin`` is the accuracy headroom against the criterion relative to the baseline: every
passing config scores in [-1, 0], higher when more of the model runs int8, and a failing config
scores lower the further it misses. So the search seeks the fastest passing config, not merely
an accurate one; real latency is measured for the finalists only.

Batches: each round proposes ``parallelism`` configs (one per planned worker) chosen one after the
other by expected improvement under the *constant liar* heuristic: every config already chosen
for the round joins the GP's data with a made-up score, the "lie", so that the next choice looks
elsewhere. The lie is the best score seen so far (CL-max). Measured on a simulated 16-op space
(four sensitive ops must stay fp32; 4 workers; trials to the first pass, mean of 10 seeds): CL-max 19.6,
CL-mean 31.6, CL-min 38.4, random search 102.8. The Kriging believer (lying with the GP's mean)
was not chosen because with the few observations of a tuning the mean is flat, and q-EI because
it needs Monte-Carlo integration for what is a strategy step between trials.

A round is proposed only once the previous one is told, and its size does not depend on how many
workers happen to be free, so the proposals depend on the seed, the worker plan and the outcomes
alone: the same run after run, and replayed exactly on resume.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import replace

import numpy as np

from ..space import TuneConfig, TuningSpace
from ..trial import Status, Trial
from .base import Strategy

PENALTY = 20.0
CANDIDATES = 512
XI = 0.01


class BayesianStrategy(Strategy):
    def __init__(self, space: TuningSpace, higher_is_better: bool = True, seed: int = 0):
        super().__init__(space, higher_is_better, seed)
        self.round: list[TuneConfig] = []
        self.waiting: set[str] = set()
        self.proposed: dict[str, TuneConfig] = {}
        self.observed: list[tuple[TuneConfig, float]] = []
        self.rounds = 0
        self._columns = _one_hot_columns(space)

    @property
    def finished(self) -> bool:
        return len(self.proposed) >= self.space.size and not self.waiting and not self.round

    def ask(self, n: int) -> list[TuneConfig]:
        if not self.round and not self.waiting and not self.finished:
            self.round = self._next_round()
        proposals, self.round = self.round[:n], self.round[n:]
        self.waiting.update(config.key for config in proposals)
        return proposals

    def tell(self, trial: Trial) -> None:
        self.waiting.discard(trial.key)
        if trial.status != Status.CANCELLED:
            self.observed.append((trial.config, self.score_of(trial)))

    def score_of(self, trial: Trial) -> float:
        """The target the GP models: higher is faster-and-passing."""
        speed = -self.space.fp32_macs_fraction(trial.config)
        if trial.margin is None:  # failed to run: worse than anything that ran
            return -1.0 - PENALTY
        return speed - PENALTY * max(0.0, -trial.margin)

    # --- rounds ------------------------------------------------------------------------------
    def _next_round(self) -> list[TuneConfig]:
        self.rounds += 1
        rng = np.random.default_rng([self.seed, self.rounds])
        size = max(1, self.parallelism)
        batch: list[TuneConfig] = []
        if self.rounds == 1:  # start where LPOT starts: one int8 scheme everywhere
            batch = [config for config in self.space.model_wise_configs() if config.key not in self.proposed]
            size = max(size, len(batch))
        candidates = self._candidates(rng)
        while len(batch) < size and candidates:
            if len(self.observed) < 2:  # too little to model yet: explore at random
                choice = candidates.pop(int(rng.integers(len(candidates))))
            else:
                choice = candidates.pop(self._most_promising(candidates, batch))
            batch.append(choice)
        for config in batch:
            self.proposed[config.key] = config
        return batch

    def _most_promising(self, candidates: list[TuneConfig], batch: list[TuneConfig]) -> int:
        """Index of the candidate of highest EI, with the batch so far lied in at the best score."""
        from scipy.stats import norm
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

        lie = max(score for _, score in self.observed)
        configs = [config for config, _ in self.observed] + batch
        scores = np.array([score for _, score in self.observed] + [lie] * len(batch))
        kernel = ConstantKernel(1.0) * Matern(length_scale=1.0, nu=2.5) + WhiteKernel(1e-3)
        model = GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=self.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convergence notes on tiny data sets
            model.fit(self._encode(configs), scores)
            mean, std = model.predict(self._encode(candidates), return_std=True)
        best = scores[: len(self.observed)].max()
        std = np.maximum(std, 1e-9)
        z = (mean - best - XI) / std
        improvement = (mean - best - XI) * norm.cdf(z) + std * norm.pdf(z)
        return int(np.argmax(improvement))  # ties: the first, i.e. candidate order

    def _candidates(self, rng: np.random.Generator) -> list[TuneConfig]:
        """Configs not proposed yet: mutations of the best observed, then random draws."""
        pool: dict[str, TuneConfig] = {}
        ranked = sorted(self.observed, key=lambda item: -item[1])[:5]
        for config, _ in ranked:
            for mutant in _single_changes(self.space, config):
                pool.setdefault(mutant.key, mutant)
        size = self.space.size
        if size <= CANDIDATES:
            indices = range(size)
        else:  # Python's randrange is exact for spaces beyond 64-bit integers
            draw = random.Random(int(rng.integers(2**63)))
            indices = [draw.randrange(size) for _ in range(CANDIDATES)]
        for index in indices:
            config = self.space.config_at(index)
            pool.setdefault(config.key, config)
        return [config for key, config in pool.items() if key not in self.proposed]

    def _encode(self, configs: list[TuneConfig]) -> np.ndarray:
        matrix = np.zeros((len(configs), len(self._columns)))
        for row, config in enumerate(configs):
            for name, scheme in config.op_schemes:
                matrix[row, self._columns[(name, scheme)]] = 1.0
            if len(self.space.sampling_sizes) > 1:
                matrix[row, self._columns[("sampling_size", config.sampling_size)]] = 1.0
            if len(self.space.recipe_sets) > 1:
                matrix[row, self._columns[("recipes", config.recipes)]] = 1.0
        return matrix


def _one_hot_columns(space: TuningSpace) -> dict[tuple, int]:
    columns: dict[tuple, int] = {}
    for op in space.ops:
        for scheme in space.choices[op.name]:
            columns[(op.name, scheme)] = len(columns)
    if len(space.sampling_sizes) > 1:
        for size in space.sampling_sizes:
            columns[("sampling_size", size)] = len(columns)
    if len(space.recipe_sets) > 1:  # each recipe combination a dimension of its own
        for recipes in space.recipe_sets:
            columns[("recipes", recipes)] = len(columns)
    return columns


def _single_changes(space: TuningSpace, config: TuneConfig) -> list[TuneConfig]:
    """Every config that differs from ``config`` in one op's choice, or in its recipes."""
    mutants = []
    schemes = dict(config.op_schemes)
    for op in space.ops:
        for scheme in space.choices[op.name]:
            if scheme != schemes[op.name]:
                changed = tuple((name, scheme if name == op.name else current) for name, current in config.op_schemes)
                mutants.append(TuneConfig(changed, config.sampling_size, config.recipes))
    mutants += [replace(config, recipes=recipes) for recipes in space.recipe_sets if recipes != config.recipes]
    return mutants

