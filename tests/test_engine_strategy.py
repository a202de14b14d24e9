"""The ask/tell loop and the basic strategy, with a fake evaluation: pure logic, no model."""

import dataclasses

import pytest

from lpot_ray.config import ExitPolicy
from lpot_ray.engine import Criterion, Engine
from lpot_ray.history import History
from lpot_ray.strategies.basic import BasicStrategy
from lpot_ray.trial import Status

from fakes import FakeExecutor, make_space, sensitive_ops_accuracy


def run(tmp_path, accuracy_of, slots=2, seed=0, timeout=60.0, max_trials=100, space=None, criterion=0.01, name="h"):
    space = space or make_space()
    history = History(tmp_path / f"{name}.db")
    executor = FakeExecutor(accuracy_of, slots, seed)
    engine = Engine(BasicStrategy(space), executor, history, Criterion(0.9, absolute=criterion),
                    ExitPolicy(timeout=timeout, max_trials=max_trials), space.fp32_macs_fraction)
    return engine.run(), executor, history


def test_model_wise_pass_ends_the_search(tmp_path):
    outcome, executor, _ = run(tmp_path, sensitive_ops_accuracy({}))
    assert [trial.config.fp32_ops for trial in outcome.trials] == [(), ()]
    assert outcome.passing[0].config.fp32_ops == ()


def test_fallback_accumulates_then_prunes_to_the_needed_ops(tmp_path):
    # op1 and op3 each cost 0.05; the criterion allows 0.01: both must be fp32, nothing else.
    outcome, executor, _ = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05, "op4": 0.001}))
    best = outcome.passing[0]
    assert set(best.config.fp32_ops) == {"op1", "op3"}
    phases = [len(trial.config.fp32_ops) for trial in outcome.trials]
    assert phases[:2] == [0, 0] and phases[2:7] == [1] * 5  # model-wise, then one-op fallback


@pytest.mark.parametrize("slots", [1, 2, 5])
def test_same_choice_whatever_the_number_of_workers_and_completion_order(tmp_path, slots):
    accuracy = sensitive_ops_accuracy({"op0": 0.02, "op2": 0.03, "op4": 0.004})
    reference, _, _ = run(tmp_path, accuracy, slots=1, seed=0, name="ref")
    outcome, _, _ = run(tmp_path, accuracy, slots=slots, seed=slots, name=f"s{slots}")
    assert outcome.passing[0].config.key == reference.passing[0].config.key
    assert set(outcome.passing[0].config.fp32_ops) == {"op0", "op2"}


def test_timeout_zero_stops_at_the_first_passing_config_in_proposal_order(tmp_path):
    outcome, executor, _ = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05}), slots=5, timeout=0)
    passing = [trial for trial in outcome.trials if trial.passed]
    assert passing == [outcome.passing[0]] and outcome.passing[0].config.fp32_ops == ("op1",)
    assert outcome.stopped_by.startswith("first passing")


def test_speculative_prefixes_longer_than_the_winner_are_cancelled(tmp_path):
    space = make_space(n_ops=8)
    accuracy = sensitive_ops_accuracy({f"op{i}": 0.02 for i in range(2)} | {"op5": 0.001})
    outcome, executor, _ = run(tmp_path, accuracy, slots=6, space=space)
    assert set(outcome.passing[0].config.fp32_ops) == {"op0", "op1"}
    assert executor.cancelled, "prefixes longer than the smallest passing one should be cancelled"


def test_failed_trials_are_recorded_and_the_search_goes_on(tmp_path):
    def accuracy(config):
        return None if config.fp32_ops == ("op0",) else sensitive_ops_accuracy({"op2": 0.05})(config)

    outcome, _, history = run(tmp_path, accuracy)
    failed = [trial for trial in history.trials() if trial.status == "failed"]
    assert len(failed) == 1 and failed[0].reason == "boom"
    assert outcome.passing[0].config.fp32_ops == ("op2",)


def test_max_trials_bounds_the_search(tmp_path):
    outcome, executor, _ = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05}), max_trials=4)
    assert len(executor.evaluated) <= 4 and outcome.stopped_by == "max_trials 4"


def test_resume_replays_history_and_evaluates_nothing_again(tmp_path):
    accuracy = sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05})
    first, _, history = run(tmp_path, accuracy)
    space = make_space()
    executor = FakeExecutor(accuracy, 2)
    engine = Engine(BasicStrategy(space), executor, history, Criterion(0.9, absolute=0.01),
                    ExitPolicy(timeout=60), space.fp32_macs_fraction)
    second = engine.run()
    assert executor.evaluated == [] and second.n_evaluated == 0
    assert second.passing[0].key == first.passing[0].key


def test_nothing_passes_when_every_op_hurts_even_in_fp32(tmp_path):
    outcome, _, _ = run(tmp_path, lambda config: 0.5)
    assert outcome.passing == [] and outcome.stopped_by == "strategy finished"


def test_pruning_runs_after_a_cancelled_prefix_winds_down(tmp_path):
    # Needs op1 and op2 in fp32; ties rank op0 first, so the passing prefix is {op0, op1, op2}
    # and the longer prefix in flight is cancelled; pruning must still give op0 back.
    needed = {"op1", "op2"}
    cancellations = 0
    for seed in range(5):
        outcome, executor, _ = run(tmp_path, lambda config: 0.9 if needed <= set(config.fp32_ops) else 0.1,
                                   slots=3, seed=seed, space=make_space(n_ops=4), name=f"s{seed}")
        cancellations += len(executor.cancelled)
        assert set(outcome.passing[0].config.fp32_ops) == needed
    assert cancellations, "the scenario needs a cancelled prefix"


def test_the_strategy_hears_every_outcome_before_it_is_asked_again(tmp_path):
    # One worker: nothing is ever speculative, so nothing is cancelled or wasted.
    needed = {"op1", "op2"}
    outcome, executor, _ = run(tmp_path, lambda config: 0.9 if needed <= set(config.fp32_ops) else 0.1,
                               slots=1, space=make_space(n_ops=4))
    assert executor.cancelled == [] and all(trial.status == "ok" for trial in outcome.trials)


def test_max_trials_counts_only_trials_that_matter_so_workers_do_not_change_the_choice(tmp_path):
    space = make_space(n_ops=8)
    needed = {"op3", "op5"}
    for max_trials in (17, 24, 32):
        chosen = set()
        for slots in (1, 2, 4, 8):
            outcome, _, _ = run(tmp_path, lambda config: 0.9 if needed <= set(config.fp32_ops) else 0.1, slots=slots,
                                space=space, max_trials=max_trials, name=f"m{max_trials}-{slots}")
            chosen.add(outcome.passing[0].key if outcome.passing else None)
        assert len(chosen) == 1, max_trials


def test_equal_objectives_rank_by_accuracy_then_key(tmp_path):
    space = make_space(n_ops=2)
    outcome, _, _ = run(tmp_path, lambda config: 0.8999 if config.op_schemes[0][1].activation.algorithm == "kl" else 0.891,
                        space=space, criterion=0.01)
    assert outcome.passing[0].accuracy == 0.8999


class CompilingExecutor:
    """finalize() with given compiled accuracies and latencies per config key."""

    def __init__(self, accuracy, latency):
        self.accuracy, self.latency, self.finalized = accuracy, latency, []

    def finalize(self, config):
        from lpot_ray.trial import Finalized

        self.finalized.append(config.key)
        latency = self.latency.get(config.key, 1.0)
        figures = {"latency_ms": latency, "fp32_latency_ms": 2.0, "latency_ratio": 2.0 / latency,
                   "model_size_bytes": 10, "fp32_model_size_bytes": 40}
        return Finalized(self.accuracy.get(config.key, 0.9), config.int8_ops, config.fp32_ops, figures, b"model", b"model",
                         config.bf16_ops)


def finalize(outcome, executor, history, **twins):
    from lpot_ray.session import conclude

    return conclude(outcome, Criterion(0.9, absolute=0.01), executor.finalize, history, "pytorch", **twins)


@pytest.mark.parametrize("twin_latency, twin_accuracy, kept", [(0.5, 0.9, True), (0.95, 0.9, False), (0.5, 0.5, False)])
def test_the_chosen_configs_bf16_twin_is_kept_only_if_it_passes_and_runs_faster(tmp_path, twin_latency, twin_accuracy, kept):
    from lpot_ray.space import BF16

    outcome, _, history = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05}))
    chosen = outcome.passing[0].config
    twin = chosen.with_fallback(chosen.fp32_ops, BF16)
    executor = CompilingExecutor({twin.key: twin_accuracy}, {twin.key: twin_latency})
    result = finalize(outcome, executor, history, bf16_twin=lambda config: twin if config == chosen else None,
                      proxy=lambda config: 0.25)
    assert executor.finalized == [chosen.key, twin.key]
    assert result.config == (twin if kept else chosen) and result.bf16_ops == (("op1",) if kept else ())
    assert result.objectives["fp32_macs_fraction"] == (0.25 if kept else outcome.passing[0].objective)
    assert history.get_meta("result")["key"] == outcome.passing[0].key  # the chosen trial, bf16 twin or not
    recorded = history.get_meta("bf16_twin")
    assert recorded["kept"] is kept and recorded["bf16_ops"] == ["op1"]
    assert recorded["latency_ratio"] == 2.0 / twin_latency and recorded["fp32_fallback_latency_ratio"] == 2.0


def test_a_finalist_that_fails_once_compiled_gives_way_to_the_next(tmp_path):
    outcome, _, history = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05}))
    passing = outcome.passing
    assert len(passing) >= 3
    executor = CompilingExecutor({passing[0].key: 0.5}, {})  # the best breaks when compiled
    result = finalize(outcome, executor, history)
    assert executor.finalized == [trial.key for trial in passing[:2]]
    assert result.passed and result.config == passing[1].config and result.accuracy == 0.9
    assert history.get_meta("result")["rejected"] == [{"key": passing[0].key, "compiled_accuracy": 0.5}]


def test_lpot_ray_history_says_why_a_finalist_was_rejected(tmp_path, capsys):
    import json

    from lpot_ray.cli import show_history

    outcome, _, history = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05}))
    finalize(outcome, CompilingExecutor({outcome.passing[0].key: 0.5}, {}), history)
    assert show_history(str(tmp_path / "h.db"), "seq", as_json=True) == 0
    rows = {row["key"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[outcome.passing[0].key]["rejected"] == f"finalist {outcome.passing[0].key} scored 0.5 compiled"
    assert rows[outcome.passing[1].key]["chosen"] and rows[outcome.passing[1].key]["rejected"] is None
    assert show_history(str(tmp_path / "h.db"), "seq", as_json=False) == 0
    assert f"finalist {outcome.passing[0].key} scored 0.5 compiled" in capsys.readouterr().out


def test_exhaustive_and_random_are_lazy_distinct_and_fill_every_worker():
    from lpot_ray.strategies.exhaustive import ExhaustiveStrategy
    from lpot_ray.strategies.random_search import RandomStrategy

    huge = make_space(n_ops=60)  # 3^60 configs: never materialised
    assert huge.size == 3 ** 60
    for strategy_class in (ExhaustiveStrategy, RandomStrategy):
        strategy = strategy_class(huge, seed=7)
        batch = strategy.ask(16)
        assert len(batch) == 16 and len({config.key for config in batch}) == 16
        for config in batch:
            huge.check(config)
    first = [config.key for config in RandomStrategy(huge, seed=3).ask(8)]
    assert first == [config.key for config in RandomStrategy(huge, seed=3).ask(8)]
    assert first != [config.key for config in RandomStrategy(huge, seed=4).ask(8)]


@pytest.mark.parametrize("name", ["exhaustive", "random"])
def test_small_spaces_are_exhausted_exactly_once(tmp_path, name):
    from lpot_ray import registry

    space = make_space(n_ops=3)
    strategy = registry.strategies.get(name)(space, seed=1)
    history = History(tmp_path / "h.db")
    executor = FakeExecutor(lambda config: 0.5, slots=4)
    outcome = Engine(strategy, executor, history, Criterion(0.9, absolute=0.01), ExitPolicy(timeout=60),
                     space.fp32_macs_fraction).run()
    assert len(outcome.trials) == space.size == 27
    assert len({trial.key for trial in outcome.trials}) == 27 and strategy.finished


def test_a_proposal_outside_the_space_names_the_op_and_the_choice(tmp_path):
    from lpot_ray.errors import SpaceError
    from lpot_ray.space import OpScheme, TensorScheme

    space = make_space(n_ops=2)
    bad = space.model_wise_configs()[0]
    odd = OpScheme(TensorScheme("int8", "asym", "per_tensor"), TensorScheme("uint8", "asym", "per_tensor"))
    bad = type(bad)(((bad.op_schemes[0][0], odd),) + bad.op_schemes[1:], bad.sampling_size)

    class Rogue(BasicStrategy):
        def ask(self, n):
            return [bad]

    engine = Engine(Rogue(space), FakeExecutor(lambda config: 0.9, 1), History(tmp_path / "h.db"),
                    Criterion(0.9, absolute=0.01), ExitPolicy(), space.fp32_macs_fraction)
    with pytest.raises(SpaceError, match="op 'op0': 'w:int8/asym/per_tensor/minmax a:uint8/asym/per_tensor/minmax' is not among its choices"):
        engine.run()


def test_mse_ranks_by_one_inspection_then_accumulates_and_prunes(tmp_path):
    from lpot_ray.strategies.mse import MseStrategy
    from lpot_ray.trial import InspectRequest

    sensitive = {"op1": 0.05, "op3": 0.05, "op4": 0.001}
    space = make_space()
    executor = FakeExecutor(sensitive_ops_accuracy(sensitive), slots=2,
                            op_errors=lambda config: {name: sensitive.get(name, 0.0) for name in config.int8_ops})
    history = History(tmp_path / "mse.db")
    outcome = Engine(MseStrategy(space), executor, history, Criterion(0.9, absolute=0.01), ExitPolicy(timeout=60),
                     space.fp32_macs_fraction).run()
    assert set(outcome.passing[0].config.fp32_ops) == {"op1", "op3"}
    inspections = [item for item in executor.evaluated if isinstance(item, InspectRequest)]
    assert len(inspections) == 1
    basic, _, _ = run(tmp_path, sensitive_ops_accuracy(sensitive), name="basic")
    assert len(outcome.trials) < len(basic.trials)  # one request instead of one trial per op
    assert len(history) == len(executor.evaluated) - 1  # the inspection is kept, not counted a trial


@pytest.mark.parametrize("stop_after", [3, 9, 14])
def test_basic_resumed_mid_way_ends_with_the_uninterrupted_choice(tmp_path, stop_after):
    accuracy = sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05, "op4": 0.001})
    whole, _, _ = run(tmp_path, accuracy, name="whole")
    _, _, history = run(tmp_path, accuracy, max_trials=stop_after, name="cut")
    done_before = {trial.key for trial in history.trials()}
    space = make_space()
    executor = FakeExecutor(accuracy, 2)
    resumed = Engine(BasicStrategy(space), executor, history, Criterion(0.9, absolute=0.01),
                     ExitPolicy(timeout=60), space.fp32_macs_fraction).run()
    assert resumed.passing[0].key == whole.passing[0].key
    assert not {config.key for config in executor.evaluated} & done_before


def test_trials_all_failing_for_one_reason_stop_the_tuning_saying_it(tmp_path):
    from lpot_ray.strategies.exhaustive import ExhaustiveStrategy

    space = make_space()
    executor = FakeExecutor(lambda config: None, 1)
    engine = Engine(ExhaustiveStrategy(space), executor, History(tmp_path / "h.db"), Criterion(0.9, absolute=0.01),
                    ExitPolicy(timeout=60, max_trials=100), space.fp32_macs_fraction)
    outcome = engine.run()
    assert outcome.stopped_by == "every trial failed: boom"
    assert len(outcome.trials) == 3 and len(executor.evaluated) == 3


def test_failures_for_different_reasons_or_after_a_success_do_not_stop_it(tmp_path):
    reasons = iter(["boom", "bang"] * 50)

    class Varied(FakeExecutor):
        def results(self, timeout):
            return [dataclasses.replace(outcome, reason=next(reasons)) if outcome.status == Status.FAILED else outcome
                    for outcome in super().results(timeout)]

    space = make_space()
    engine = Engine(BasicStrategy(space), Varied(lambda config: None, 1), History(tmp_path / "v.db"),
                    Criterion(0.9, absolute=0.01), ExitPolicy(timeout=60, max_trials=8), space.fp32_macs_fraction)
    assert engine.run().stopped_by != "every trial failed: boom"
    first_ok = iter([0.5] + [None] * 50)
    outcome, _, _ = run(tmp_path, lambda config: next(first_ok), slots=1, max_trials=6, name="ok-first")
    assert not outcome.stopped_by.startswith("every trial failed") and len(outcome.trials) > 3


def bert_like_space():
    """37 Linear ops named as a 6-layer BERT names them, plus its pooler."""
    from lpot_ray.config import load_config
    from lpot_ray.space import Op, OpCapability, OpScheme, TensorScheme, TuningSpace

    int8 = (OpScheme(TensorScheme("int8", "sym", "per_channel"), TensorScheme("uint8", "asym", "per_tensor")),)
    blocks = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
              "intermediate.dense", "output.dense"]
    names = [f"encoder.layer.{layer}.{block}" for layer in range(6) for block in blocks] + ["pooler.dense"]
    capabilities = [OpCapability(Op(name, "Linear", macs=100), int8) for name in names]
    return TuningSpace.build(capabilities, load_config({"model": {"framework": "pytorch"}}).quantization)


def test_ops_are_grouped_as_the_model_groups_them():
    from lpot_ray.strategies.basic import op_groups

    names = [op.name for op in bert_like_space().ops]
    groups = op_groups(names, 12)
    assert [group[0] for group in groups] == [f"encoder.layer.{layer}.attention.self.query" for layer in range(6)] + ["pooler.dense"]
    assert [len(group) for group in groups] == [6] * 6 + [1]
    flat = op_groups([f"conv2d_{index}" for index in range(53)], 12)  # no structure in the names: runs in model order
    assert len(flat) == 7 and sum(flat, []) == [f"conv2d_{index}" for index in range(53)]


@pytest.mark.parametrize("grouped", [True, False])
def test_a_36_linear_model_needing_two_ops_in_fp32_passes_within_30_trials_when_ranked_in_groups(tmp_path, monkeypatch, grouped):
    from lpot_ray.strategies import basic

    if not grouped:
        monkeypatch.setattr(basic, "GROUPED_ABOVE", 1000)  # one ranking trial per op, as for a small model
    accuracy = sensitive_ops_accuracy({"encoder.layer.2.intermediate.dense": 0.03, "encoder.layer.2.output.dense": 0.02,
                                       "encoder.layer.4.attention.self.key": 0.004})
    outcome, executor, _ = run(tmp_path, accuracy, slots=4, space=bert_like_space(), max_trials=30, name=str(grouped))
    if grouped:
        assert set(outcome.passing[0].config.fp32_ops) == {"encoder.layer.2.intermediate.dense", "encoder.layer.2.output.dense"}
        assert len([trial for trial in outcome.trials if trial.status != Status.CANCELLED]) <= 30
    else:
        assert not outcome.passing and outcome.stopped_by == "max_trials 30"  # still ranking ops one by one
