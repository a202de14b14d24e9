"""Bad input fails with a clear error, before any worker starts."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lpot_ray
from lpot_ray import pool
from lpot_ray.errors import ConfigError, DataError, EvaluationError, ModelError

from conftest import base_conf


@pytest.fixture(autouse=True)
def no_workers(monkeypatch, ray_session):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker was started despite bad input")

    monkeypatch.setattr(pool.WorkerPool, "add_ray_workers", refuse)


def tune(digits, conf, **kwargs):
    model, calibration, evaluation = digits
    arguments = {"q_dataloader": calibration, "eval_dataloader": evaluation, **kwargs}
    return lpot_ray.tune(model, conf, **arguments)


def test_malformed_yaml(digits, tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text("model: [pytorch\n")
    with pytest.raises(ConfigError, match="conf.yaml: malformed YAML"):
        tune(digits, path)


@pytest.mark.parametrize(
    "section, value, message",
    [
        ("strategy", {"tuning": {"strategy": {"name": "fancy"}}}, "unknown strategy 'fancy'; registered: basic, bayesian, exhaustive, .*mse, random"),
        ("metric", {"evaluation": {"accuracy": {"metric": {"top5": 1}}}}, "unknown metric 'top5'; registered: Accuracy, .*topk"),
        ("framework", {"model": {"framework": "caffe"}}, "unknown framework 'caffe'; registered: mxnet, onnxrt, pytorch, tensorflow"),
        ("metric parameter", {"evaluation": {"accuracy": {"metric": {"topk": 0}}}}, "topk`: 0 must be a positive integer"),
    ],
)
def test_unknown_plugin_names_list_the_registered_ones(digits, tmp_path, section, value, message):
    conf = base_conf(tmp_path)
    for key, part in value.items():
        conf[key] = {**conf.get(key, {}), **part}
    with pytest.raises(ConfigError, match=message):
        tune(digits, conf)


def test_model_the_adaptor_cannot_export(digits, tmp_path):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) if x.mean() > 0 else self.fc(-x.flatten(1))

    with pytest.raises(ModelError, match="torch.export could not export Branchy"):
        tune((Branchy(),) + tuple(digits[1:]), base_conf(tmp_path))


def test_eval_func_that_raises(digits, tmp_path):
    def eval_func(model):
        raise KeyError("labels")

    with pytest.raises(EvaluationError, match="fp32 baseline: evaluating the original model failed: KeyError"):
        tune(digits, base_conf(tmp_path), eval_dataloader=None, eval_func=eval_func)


@pytest.mark.parametrize("value", [math.nan, "high", None])
def test_eval_func_that_returns_no_number(digits, tmp_path, value):
    with pytest.raises(EvaluationError, match="fp32 baseline: evaluation returned"):
        tune(digits, base_conf(tmp_path), eval_func=lambda model: value)


def test_eval_func_returning_several_values_is_named(digits, tmp_path):
    with pytest.raises(EvaluationError, match=r"fp32 baseline: evaluation returned tensor\(\[0.5000, 0.7000\]\); expected a number"):
        tune(digits, base_conf(tmp_path), eval_func=lambda model: torch.tensor([0.5, 0.7]))


def test_a_baseline_of_zero_stops_the_tuning_saying_why(digits, tmp_path):
    with pytest.raises(EvaluationError, match="fp32 baseline: the original model scores 0.0 on the evaluation"):
        tune(digits, base_conf(tmp_path), eval_func=lambda model: 0.0)


def test_empty_loaders(digits, tmp_path):
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="q_dataloader: yielded no batches"):
        tune(digits, base_conf(tmp_path), q_dataloader=empty)
    with pytest.raises(EvaluationError, match="no samples were evaluated"):
        tune(digits, base_conf(tmp_path), eval_dataloader=empty)


def test_missing_evaluation_and_q_func(digits, tmp_path):
    with pytest.raises(ConfigError, match="pass eval_func, or eval_dataloader"):
        tune(digits, base_conf(tmp_path), eval_dataloader=None)
    with pytest.raises(ConfigError, match="q_func: only used with `quantization.approach: quant_aware_training`"):
        tune(digits, base_conf(tmp_path), q_func=lambda model: model)


def test_op_wise_name_the_model_does_not_have(digits, tmp_path):
    conf = base_conf(tmp_path)
    conf["quantization"] = {"op_wise": {"classifier": {"activation": {"dtype": "fp32"}}}}
    with pytest.raises(ConfigError, match="'classifier' matches no op of the model; its ops are: conv1, conv2, fc1, fc2"):
        tune(digits, conf)


def test_resume_of_another_job_is_refused_saying_what_differs(digits, tmp_path):
    from lpot_ray.history import History

    history = History.start(tmp_path / "old", None, {"model": "abc", "approach": "post_training_static_quant", "space": {},
                                                     "criterion": {}, "strategy": "basic", "seed": 1978})
    history.close()
    with pytest.raises(lpot_ray.HistoryError, match="differs from the recorded one in criterion, metric, model, objective, space"):
        tune(digits, base_conf(tmp_path), resume_file=tmp_path / "old")


def test_restrictions_that_leave_nothing_to_quantize(digits, tmp_path):
    conf = base_conf(tmp_path)
    conf["quantization"] = {"model_wise": {"activation": {"scheme": "sym"}}}  # PyTorch activations are asym
    with pytest.raises(ConfigError, match="leave no int8 .*scheme for any op; pytorch offers .*w:int8/sym/per_channel/minmax a:uint8/asym/per_tensor/kl"):
        tune(digits, conf)


def test_a_workspace_in_use_by_another_tuning_is_refused(digits, tmp_path):
    from lpot_ray.errors import HistoryError
    from lpot_ray.history import History

    holder = History.start(tmp_path / "ws", None, {})
    try:
        with pytest.raises(HistoryError, match="ws: another tuning is using this workspace"):
            tune(digits, base_conf(tmp_path))
    finally:
        holder.close()


def test_a_calibration_loader_that_breaks_midway_is_named(digits, tmp_path):
    calibration = digits[1]

    def breaking():
        yield next(iter(calibration))
        raise OSError("disk gone")

    with pytest.raises(DataError, match="q_dataloader: reading batch 2 failed: OSError: disk gone"):
        tune(digits, base_conf(tmp_path), q_dataloader=breaking())


def test_more_calibration_samples_asked_than_given_says_how_many_are_used(digits, caplog):
    from lpot_ray.config import load_config
    from lpot_ray.inputs import calibration_batches

    config = load_config({"model": {"framework": "pytorch"}, "quantization": {"calibration": {"sampling_size": 100000}}})
    held = sum(len(images) for images, _ in digits[1])
    assert sum(len(batch) for batch in calibration_batches(config, digits[1], None)) == held
    assert f"sampling_size: 100000 samples asked, q_dataloader holds {held}; calibrating on {held}" in caplog.text


def test_a_one_shot_evaluation_iterator_is_refused(digits, tmp_path):
    with pytest.raises(DataError, match="eval_dataloader: a generator can be read only once"):
        tune(digits, base_conf(tmp_path), eval_dataloader=(batch for batch in digits[2]))
