"""The Pareto front of a tuning: from trials, from a history, in the result and the report."""

import json

from lpot_ray.pareto import front
from lpot_ray.space import FP32, TuneConfig
from lpot_ray.trial import Kind, Status, Trial

from fakes import sensitive_ops_accuracy
from test_engine_strategy import CompilingExecutor, finalize, run


def trial(seq, accuracy, objective, passed=True, **fields):
    config = TuneConfig(((f"op{seq}", FP32),), 100)  # a distinct config per trial
    return Trial(seq, config, accuracy=accuracy, objective=objective, passed=passed, **fields)


def test_the_front_keeps_each_trial_more_accurate_than_every_faster_one():
    trials = [trial(0, 0.90, 0.0), trial(1, 0.95, 0.2), trial(2, 0.93, 0.3),  # 2: slower and less accurate than 1
              trial(3, 0.97, 0.5), trial(4, 0.99, 0.5, passed=False),  # 4 missed the criterion
              trial(5, 0.96, 0.1, status=Status.STOPPED_EARLY, passed=False),
              trial(6, 0.99, 0.9, kind=Kind.INSPECTION)]
    assert [t.seq for t in front(trials)] == [0, 1, 3]
    # lower is better (an error metric): 0.90 at the fastest is then the best of all
    assert [t.seq for t in front(trials, higher_is_better=False)] == [0]
    assert front([]) == [] and front([trial(0, 0.9, 0.1, passed=False)]) == []


def test_a_tuning_returns_its_front_led_by_the_chosen_config_and_the_cli_shows_it(tmp_path, capsys):
    from lpot_ray.cli import show_history

    # basic falls back op1, op3 and op4 together, then prunes op4 (it costs 0.001): two passing
    # configs, the pruned one faster, the other more accurate
    outcome, _, history = run(tmp_path, sensitive_ops_accuracy({"op1": 0.05, "op3": 0.05, "op4": 0.001}))
    result = finalize(outcome, CompilingExecutor({}, {}), history)
    passing = [t for t in outcome.trials if t.passed]
    assert len(result.pareto) >= 2 and result.pareto[0].key == result.config.key
    for point in result.pareto:  # nothing that passed beats a point of the front on both
        assert point.passed and not any(
            other.objective <= point.objective and other.accuracy >= point.accuracy
            and (other.objective, other.accuracy) != (point.objective, point.accuracy) for other in passing)
    for other in passing:  # and every passing trial off the front is beaten by one on it
        if other.key not in {point.key for point in result.pareto}:
            assert any(p.objective <= other.objective and p.accuracy >= other.accuracy for p in result.pareto)
    assert show_history(str(tmp_path / "h.db"), "objective", as_json=True, pareto_only=True) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["key"] for row in rows] == [point.key for point in result.pareto] and rows[0]["chosen"]
