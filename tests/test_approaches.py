"""LPOT's approaches beyond static quantization: dynamic quantization and quantization-aware training."""

import pytest

import lpot_ray
from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.demo.torch_digits import digits_loaders, fit
from lpot_ray.history import History

from conftest import accuracy_of, base_conf


def train(prepared, epochs: int = 4) -> None:
    """A user's q_func: fine-tune the fake-quantized model on the training split, shuffled the
    same way on every call (wherever it runs, after whatever ran before)."""
    fit(prepared, digits_loaders()[0], epochs, learning_rate=1e-3)


def approach_conf(tmp_path, approach, **tuning):
    conf = base_conf(tmp_path, **tuning)
    conf["quantization"] = {"approach": approach}
    return conf


def test_dynamic_quantization_runs_linear_ops_int8_end_to_end(ray_session, digits, tmp_path):
    model, _, evaluation = digits
    conf = approach_conf(tmp_path, "post_training_dynamic_quant")
    conf["quantization"]["use_bf16"] = False  # the convolutions stay fp32, not bf16 where that runs faster
    result = lpot_ray.tune(model, conf, eval_dataloader=evaluation)  # no calibration loader needed
    assert result.passed
    # X86's dynamic path quantizes Linear only; the convolutions have no dynamic scheme.
    assert result.int8_ops == ("fc1", "fc2") and result.fp32_ops == ("conv1", "conv2")
    assert result.baseline - result.accuracy <= 0.01 * result.baseline
    (trial,) = History(tmp_path / "ws" / "history.db").trials()
    schemes = trial.config.to_dict()["ops"]
    assert schemes["fc1"]["activation"]["algorithm"] == "dynamic" and schemes["conv1"] == {"dtype": "fp32"}


def test_training_recovers_what_static_quantization_lost(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    static = lpot_ray.tune(model, base_conf(tmp_path / "static", accuracy_criterion={"absolute": 0.1},
                                            exit_policy={"max_trials": 1}),
                           q_dataloader=calibration, eval_dataloader=evaluation)
    assert not static.passed and static.best_failing.accuracy < 0.5  # all-int8 static: broken by the outliers

    conf = approach_conf(tmp_path / "qat", "quant_aware_training", accuracy_criterion={"absolute": 0.1},
                         exit_policy={"max_trials": 1})
    result = lpot_ray.tune(model, conf, q_func=lambda prepared: train(prepared, epochs=8), q_dataloader=calibration,
                           eval_dataloader=evaluation)
    assert result.passed and result.fp32_ops == () and len(result.int8_ops) == 4
    assert result.accuracy > static.best_failing.accuracy + 0.4


def test_a_fallback_config_trains_for_its_own_int8_set_and_the_same_set_reuses_it(outlier_digits):
    model, calibration, evaluation = outlier_digits
    adaptor = PyTorchAdaptor()
    batches = [images for images, _ in calibration]
    exported = adaptor.load(adaptor.prepare(model, batches[0]))
    conf = lpot_ray.load_config({"model": {"framework": "pytorch"}, "quantization": {"approach": "quant_aware_training"}})
    space = lpot_ray.TuningSpace.build(adaptor.capabilities(exported), conf.quantization)
    full = space.model_wise_configs()[0]
    assert {scheme.activation.algorithm for _, scheme in full.op_schemes} == {"minmax"}

    adaptor.quantize_aware(exported, full, lambda prepared: train(prepared, epochs=1), batches)
    trained = []

    def record_and_train(prepared):
        trained.append(prepared)
        train(prepared, epochs=3)

    fallback = adaptor.quantize_aware(exported, full.with_fallback(["conv2"]), record_and_train, batches)
    assert adaptor.trainings == 2 and len(trained) == 1  # weights trained with conv2 quantized don't serve it in fp32
    adaptor.quantize_aware(exported, full.with_fallback(["conv2"]), lambda prepared: 1 / 0, batches)
    assert adaptor.trainings == 2  # the same int8 set again: trained once
    lowered = adaptor.lower(fallback, space.ops, full.with_fallback(["conv2"]), batches[0])
    assert lowered.fp32_ops == ("conv2",) and accuracy_of(fallback, evaluation) > 0.5
    assert accuracy_of(exported.module(), evaluation) == accuracy_of(model, evaluation)  # fp32 model untouched


def test_a_q_func_that_raises_fails_its_trial_with_the_reason(digits, tmp_path):
    model, calibration, evaluation = digits

    def broken(prepared):
        raise RuntimeError("out of training data")

    conf = approach_conf(tmp_path, "quant_aware_training", exit_policy={"max_trials": 2})
    conf["ray"]["workers"] = 1
    result = lpot_ray.tune(model, conf, q_func=broken, q_dataloader=calibration, eval_dataloader=evaluation)
    assert not result.passed
    trials = History(tmp_path / "ws" / "history.db").trials()
    assert trials and all(trial.status == "failed" and "out of training data" in trial.reason for trial in trials)


@pytest.mark.parametrize("approach, framework, q_func, message", [
    ("quant_aware_training", "pytorch", None, "q_func: quant_aware_training needs q_func"),
    ("post_training_static_quant", "pytorch", train, "q_func: only used with `quantization.approach: quant_aware_training`"),
    ("post_training_dynamic_quant", "mxnet", None,
     "'post_training_dynamic_quant' is not supported by the mxnet adaptor; it supports post_training_static_quant"),
])
def test_an_approach_the_framework_cannot_do_is_named(digits, tmp_path, approach, framework, q_func, message):
    model, calibration, evaluation = digits
    conf = approach_conf(tmp_path, approach)
    conf["model"]["framework"] = framework
    with pytest.raises(lpot_ray.ConfigError, match=message):
        lpot_ray.tune(model, conf, q_func=q_func, q_dataloader=calibration, eval_dataloader=evaluation)


def test_training_from_the_yaml_alone_on_the_command_line(outlier_digits, tmp_path):
    import subprocess
    import sys

    import yaml

    from test_cli import save_pt2, write_conf

    conf_path = write_conf(tmp_path, save_pt2(outlier_digits[0], tmp_path / "outliers.pt2"),
                           accuracy_criterion={"absolute": 0.1}, exit_policy={"max_trials": 1})
    conf = yaml.safe_load(conf_path.read_text())
    conf["quantization"] = {"approach": "quant_aware_training", "train": {
        "end_epoch": 4, "dataloader": {"batch_size": 64, "dataset": {"digits": {"split": "train"}}},
        "optimizer": {"Adam": {"learning_rate": 0.001}}, "criterion": {"CrossEntropyLoss": {}}}}
    conf_path.write_text(yaml.safe_dump(conf))
    done = subprocess.run([sys.executable, "-m", "lpot_ray", "tune", str(conf_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]  # all four ops int8: static quantization fails this criterion
    (trial,) = History(tmp_path / "ws" / "history.db").trials()
    assert trial.passed and trial.config.fp32_ops == ()

    conf["quantization"]["train"]["optimizer"] = {"Adagrad": {}}
    conf_path.write_text(yaml.safe_dump(conf))
    done = subprocess.run([sys.executable, "-m", "lpot_ray", "tune", str(conf_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "unknown optimizer 'Adagrad'; known: SGD, Adam" in done.stderr


def test_training_runs_on_ray_workers_too(ray_session, outlier_digits, tmp_path):
    import os
    import time

    model, calibration, evaluation = outlier_digits
    driver = os.getpid()

    def slow_in_driver(candidate):  # so that the Ray worker joins and trains too
        time.sleep(1.5 if os.getpid() == driver else 0)
        return accuracy_of(candidate, evaluation)

    conf = approach_conf(tmp_path, "quant_aware_training", strategy={"name": "exhaustive"},
                         exit_policy={"timeout": 600, "max_trials": 6})
    del conf["evaluation"]
    result = lpot_ray.tune(model, conf, q_func=lambda prepared: train(prepared, epochs=1), q_dataloader=calibration,
                           eval_func=slow_in_driver)
    trials = History(tmp_path / "ws" / "history.db").trials()
    on_worker = [trial for trial in trials if trial.worker == "worker-1"]
    assert on_worker and all(trial.status == "ok" for trial in trials) and result.n_trials == 6
    # Trained there: all-int8 static quantization of this model scores below 0.1.
    assert max(trial.accuracy for trial in on_worker) > 0.5
