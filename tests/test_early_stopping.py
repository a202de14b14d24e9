"""Hopeless trials stop early, exactly: the verdicts of full evaluations, in less time."""

import numpy as np
import pytest

import lpot_ray
from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.criterion import Criterion
from lpot_ray.history import History
from lpot_ray.metrics import make_metric
from lpot_ray.trial import GiveUp, Status

from conftest import accuracy_of, base_conf


@pytest.mark.parametrize("metric", [{"topk": 1}, {"topk": 3}, {"Accuracy": None}])
def test_a_metrics_reachable_range_holds_its_final_result_after_every_batch(metric):
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(size, 5)), rng.integers(0, 5, size)) for size in (7, 3, 11, 1, 8)]
    total = sum(len(labels) for _, labels in batches)
    whole = make_metric(metric)
    for scores, labels in batches:
        whole.update(scores, labels)
    final = whole.result()
    partial, seen = make_metric(metric), 0
    for scores, labels in batches:
        partial.update(scores, labels)
        seen += len(labels)
        low, high = partial.reachable(total - seen)
        assert low <= final <= high
    assert partial.reachable(0) == (final, final)


def test_unbounded_metrics_never_give_up():
    metric = make_metric({"MSE": None})
    metric.update(np.ones(4), np.zeros(4))
    assert metric.reachable(100) is None
    assert not GiveUp(Criterion(0.1, absolute=0.01, higher_is_better=False), 104).hopeless(metric.reachable(100))


def test_giving_up_follows_the_criterions_direction():
    higher = GiveUp(Criterion(0.9, absolute=0.05), samples=100)
    assert higher.hopeless((0.1, 0.84)) and not higher.hopeless((0.1, 0.85))
    lower = GiveUp(Criterion(0.2, absolute=0.05, higher_is_better=False), samples=100)
    assert lower.hopeless((0.26, 0.9)) and not lower.hopeless((0.25, 0.9))


def strict_fallback_job(model, calibration, evaluation, tmp_path, name, early_stopping):
    """The outlier CNN under a criterion that needs fallback, in the driver alone."""
    adaptor = PyTorchAdaptor()
    batches = [images for images, _ in calibration]
    exported = adaptor.load(adaptor.prepare(model, batches[0]))
    conf = base_conf(tmp_path / name)
    space = lpot_ray.TuningSpace.build(adaptor.capabilities(exported), lpot_ray.load_config(conf).quantization)
    loss = accuracy_of(model, evaluation) - accuracy_of(adaptor.quantize(exported, space.model_wise_configs()[0], batches), evaluation)
    conf["tuning"].update(accuracy_criterion={"absolute": loss / 4},
                          exit_policy={"timeout": 600, "max_trials": 40, "early_stopping": early_stopping})
    conf["ray"] = {"workers": 1}
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    return result, History(tmp_path / name / "ws" / "history.db")


def test_early_stopping_changes_no_verdict_and_no_choice_on_a_real_fallback_job(outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    stopped, stopped_history = strict_fallback_job(model, calibration, evaluation, tmp_path, "early", True)
    full, full_history = strict_fallback_job(model, calibration, evaluation, tmp_path, "full", False)

    assert stopped.passed and full.passed and stopped.config.key == full.config.key
    assert stopped.fp32_ops == full.fp32_ops
    verdicts = {trial.key: trial.passed for trial in full_history.trials()}
    early = [trial for trial in stopped_history.trials() if trial.status == Status.STOPPED_EARLY]
    assert early, "no hopeless trial stopped early"
    assert all(full.status == Status.OK for full in full_history.trials() if full.kind == "trial")
    for trial in stopped_history.trials():
        assert trial.passed == verdicts[trial.key], trial.key  # the same verdict, config by config
    threshold = stopped_history.get_meta("criterion")
    for trial in early:
        figures = trial.figures["stopped_early"]
        assert figures["samples"] < len(evaluation.dataset) and figures["batches"] < len(evaluation)
        assert figures["reachable"][1] < Criterion(**threshold).threshold  # even all right would not pass
        assert trial.accuracy is None and "stopped after" in trial.reason
