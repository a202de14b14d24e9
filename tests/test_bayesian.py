"""The bayesian strategy as pure logic against a simulated evaluation."""

import numpy as np
import pytest

from lpot_ray.config import ExitPolicy
from lpot_ray.engine import Criterion, Engine
from lpot_ray.history import History
from lpot_ray.strategies.bayesian import BayesianStrategy
from lpot_ray.strategies.random_search import RandomStrategy

from fakes import FakeExecutor, make_space, simulated_accuracy

SPACE = make_space(n_ops=16)


def tune(tmp_path, strategy_class, seed, workers, timeout=0.0, max_trials=400, history=None, name="h"):
    strategy = strategy_class(SPACE, seed=seed)
    strategy.parallelism = workers
    history = history or History(tmp_path / f"{name}-{seed}-{workers}.db")
    executor = FakeExecutor(simulated_accuracy, workers, seed)
    engine = Engine(strategy, executor, history, Criterion(0.9, absolute=0.012),
                    ExitPolicy(timeout=timeout, max_trials=max_trials), SPACE.fp32_macs_fraction)
    return engine.run(), executor, history


def test_a_round_fills_every_planned_worker_with_distinct_configs_inside_the_space():
    strategy = BayesianStrategy(SPACE, seed=0)
    strategy.parallelism = 6
    batch = strategy.ask(6)
    assert len(batch) == 6 and len({config.key for config in batch}) == 6
    for config in batch:
        SPACE.check(config)
    assert strategy.ask(6) == []  # the next round waits for this one's outcomes


def test_fp32_fallback_is_part_of_the_search_and_a_pass_is_found(tmp_path):
    outcome, _, _ = tune(tmp_path, BayesianStrategy, seed=0, workers=2)
    assert outcome.passing
    assert {"op1", "op3", "op6"} <= set(outcome.passing[0].config.fp32_ops)


def test_same_seed_same_proposals_whatever_the_completion_order(tmp_path):
    first, _, _ = tune(tmp_path, BayesianStrategy, seed=3, workers=4, name="a")
    second, _, _ = tune(tmp_path, BayesianStrategy, seed=3, workers=4, name="b")
    assert [trial.key for trial in first.trials] == [trial.key for trial in second.trials]


def test_bayesian_needs_fewer_trials_than_random_to_pass(tmp_path):
    def mean_trials(strategy_class):
        counts = []
        for seed in range(4):
            outcome, _, _ = tune(tmp_path, strategy_class, seed, workers=4, name=strategy_class.__name__)
            counts.append(len(outcome.trials) if outcome.passing else 400)
        return float(np.mean(counts))

    bayesian, random = mean_trials(BayesianStrategy), mean_trials(RandomStrategy)
    assert bayesian < random / 2, (bayesian, random)


@pytest.mark.parametrize("stop_after", [5, 13])
def test_resume_mid_way_ends_with_the_uninterrupted_choice(tmp_path, stop_after):
    whole, _, _ = tune(tmp_path, BayesianStrategy, seed=1, workers=3, timeout=600, max_trials=30, name="whole")
    _, _, history = tune(tmp_path, BayesianStrategy, seed=1, workers=3, timeout=600, max_trials=stop_after, name="cut")
    done_before = {trial.key for trial in history.trials()}
    resumed, executor, _ = tune(tmp_path, BayesianStrategy, seed=1, workers=3, timeout=600, max_trials=30, history=history)
    assert resumed.passing[0].key == whole.passing[0].key
    assert not {config.key for config in executor.evaluated} & done_before  # nothing evaluated twice
