"""tune() end to end: real torch, real Ray workers, real SQLite."""

import math
import time

import pytest
import torch

import lpot_ray
from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.history import History

from conftest import accuracy_of, base_conf


def test_two_workers_tune_to_an_int8_model_that_saves_and_reloads(ray_session, digits, tmp_path):
    model, calibration, evaluation = digits
    result = lpot_ray.tune(model, base_conf(tmp_path), q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and result.int8_ops == ("conv1", "conv2", "fc1", "fc2") and result.fp32_ops == ()
    assert result.accuracy >= result.baseline * 0.99
    assert result.n_trials == result.n_evaluated == len(History(tmp_path / "ws" / "history.db"))
    assert {"latency_ms", "fp32_latency_ms", "latency_ratio"} <= set(result.objectives)
    assert result.objectives["model_size_bytes"] < 0.6 * result.objectives["fp32_model_size_bytes"]  # int8 weights
    assert result.objectives["footprint_bytes"] >= result.objectives["model_size_bytes"]
    workers = {trial.worker for trial in History(tmp_path / "ws" / "history.db").trials()}
    assert workers <= {"driver", "worker-1"} and workers
    timings = result.timings  # where the time went, phase by phase
    assert {"prepare", "prepare.export", "baseline", "search", "trials.quantize", "trials.calibrate", "trials.evaluate",
            "finalize", "finalize.lower_int8", "finalize.validate", "finalize.lower_fp32", "finalize.latency"} <= set(timings)
    assert all(seconds >= 0 for seconds in timings.values()) and timings["trials.evaluate"] > 0
    assert timings["finalize"] >= timings["finalize.lower_int8"] + timings["finalize.lower_fp32"]
    assert list(timings)[:4] == ["prepare", "prepare.export", "baseline", "search"]  # in the order they ran

    loaded = lpot_ray.load(result.save(tmp_path / "saved"))
    assert loaded.config == result.config and loaded.int8_ops == result.int8_ops
    # The reported accuracy is the compiled model's; the reloaded reference model may differ by a sample.
    assert abs(accuracy_of(loaded.model, evaluation) - result.accuracy) <= 1.5 / len(evaluation.dataset)


def test_strict_criterion_falls_back_only_the_ops_that_need_it(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    # Measure the model-wise int8 loss, then ask for less than that: fallback is required.
    adaptor = PyTorchAdaptor()
    batches = [images for images, _ in calibration]
    exported = adaptor.load(adaptor.prepare(model, batches[0]))
    conf = base_conf(tmp_path)
    space = lpot_ray.TuningSpace.build(adaptor.capabilities(exported), lpot_ray.load_config(conf).quantization)
    int8_accuracy = accuracy_of(adaptor.quantize(exported, space.model_wise_configs()[0], batches), evaluation)
    fp32_accuracy = accuracy_of(model, evaluation)
    loss = fp32_accuracy - int8_accuracy
    assert loss > 0.05

    conf["tuning"].update(accuracy_criterion={"absolute": loss / 4}, exit_policy={"timeout": 600, "max_trials": 40})
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed
    assert 1 <= len(result.fp32_ops) < len(space.ops)
    assert set(result.fp32_ops) == {"conv2", "fc1"}  # pruned: conv1, ranked in first, was given back
    assert fp32_accuracy - result.accuracy <= loss / 4


def test_user_eval_func_calls_model_eval_with_its_own_batch_size(ray_session, digits, tmp_path):
    model, calibration, evaluation = digits
    images = torch.cat([batch for batch, _ in evaluation])
    labels = torch.cat([batch for _, batch in evaluation])
    calls = []

    def eval_func(candidate):
        candidate.eval()
        calls.append(1)
        with torch.no_grad():
            predictions = torch.cat([candidate(images[i:i + 50]).argmax(1) for i in range(0, len(images), 50)])
        return float((predictions == labels).float().mean())

    conf = base_conf(tmp_path)
    del conf["evaluation"]
    result = lpot_ray.Quantization(conf)(model, q_dataloader=calibration, eval_func=eval_func)
    assert result.passed and math.isclose(result.baseline, accuracy_of(model, evaluation), rel_tol=1e-6)
    assert calls, "the baseline runs the eval_func in the driver"


def test_resume_evaluates_nothing_twice(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    conf = base_conf(tmp_path, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 600, "max_trials": 40})
    first = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    again = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation,
                          resume_file=tmp_path / "ws")
    assert again.n_evaluated == 0 and again.n_trials == first.n_trials
    assert again.config == first.config


def test_same_seed_same_config_with_one_and_two_workers(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits

    def slow_eval(candidate):  # slow enough that the Ray worker joins and takes trials
        time.sleep(1.2)
        return accuracy_of(candidate, evaluation)

    chosen = []
    for workers in (1, 2):
        conf = base_conf(tmp_path / str(workers), accuracy_criterion={"absolute": 0.02},
                         exit_policy={"timeout": 600, "max_trials": 40})
        del conf["evaluation"]
        conf["ray"]["workers"] = workers
        chosen.append(lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=slow_eval).config)
        ran_on = {trial.worker for trial in History(tmp_path / str(workers) / "ws" / "history.db").trials()}
        assert ran_on == ({"driver"} if workers == 1 else {"driver", "worker-1"})
    assert chosen[0] == chosen[1]


def test_a_failing_trial_is_recorded_with_its_reason_and_tuning_goes_on(ray_session, digits, tmp_path):
    model, calibration, evaluation = digits

    def eval_func(candidate):
        if isinstance(candidate, torch.fx.GraphModule):  # every quantized candidate
            raise RuntimeError("scorer exploded")
        return accuracy_of(candidate, evaluation)

    conf = base_conf(tmp_path)
    del conf["evaluation"]
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=eval_func)
    assert not result.passed and result.model is None and result.best_failing is None
    trials = History(tmp_path / "ws" / "history.db").trials()
    assert trials and all(trial.status == "failed" and "scorer exploded" in trial.reason for trial in trials)
    assert result.reason.startswith("every trial failed: RuntimeError: scorer exploded")  # said, not just recorded


def test_bayesian_finds_the_needed_fallback_on_a_real_model_through_ray(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits

    def slow_eval(candidate):  # slow enough that the Ray worker joins and takes trials
        time.sleep(0.5)
        return accuracy_of(candidate, evaluation)

    conf = base_conf(tmp_path, strategy={"name": "bayesian"}, accuracy_criterion={"absolute": 0.02},
                     exit_policy={"timeout": 600, "max_trials": 16})
    del conf["evaluation"]
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=slow_eval)
    assert result.passed and {"conv2", "fc1"} <= set(result.fp32_ops)
    assert result.n_trials <= 16
    assert "worker-1" in {trial.worker for trial in History(tmp_path / "ws" / "history.db").trials()}


def test_mse_ranks_the_known_sensitive_ops_first_on_a_real_model(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    conf = base_conf(tmp_path, strategy={"name": "mse"}, accuracy_criterion={"absolute": 0.02},
                     exit_policy={"timeout": 600, "max_trials": 20})
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and set(result.fp32_ops) == {"conv2", "fc1"}
    (inspection,) = [trial for trial in History(tmp_path / "ws" / "history.db").trials() if trial.kind == "inspection"]
    errors = inspection.figures["op_errors"]
    assert sorted(errors, key=errors.get, reverse=True)[:2] in (["conv2", "fc1"], ["fc1", "conv2"])
    assert result.n_trials < 2 + 4  # fewer than basic's model-wise plus one trial per op


def test_several_weighted_objectives(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    conf = base_conf(tmp_path, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 600, "max_trials": 20},
                     multi_objectives={"objective": ["performance", "modelsize", "footprint"], "weight": [0.2, 0.6, 0.2]})
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and set(result.fp32_ops) == {"conv2", "fc1"}
    assert {"model_size_bytes", "fp32_model_size_bytes"} <= set(result.objectives)


def test_performance_only_quantizes_the_default_config_without_tuning(digits, tmp_path):
    model, calibration, _ = digits
    conf = base_conf(tmp_path, exit_policy={"performance_only": True})
    result = lpot_ray.tune(model, conf, q_dataloader=calibration)  # no evaluation needed
    assert result.passed and result.n_trials == 0 and result.accuracy is None and result.baseline is None
    assert result.int8_ops == ("conv1", "conv2", "fc1", "fc2") and result.stopped_by == "performance_only"
    assert "latency_ratio" in result.objectives


def test_quantization_with_only_a_model_takes_its_data_from_the_yaml(digits, tmp_path):
    from cli_helpers import digits_conf

    conf = digits_conf(tmp_path, "pytorch", model_path=None)
    del conf["model"]["path"]
    result = lpot_ray.Quantization(conf)(digits[0])  # LPOT's fully-YAML use: no loader passed
    assert result.passed and result.baseline > 0.9


def test_a_job_that_cannot_be_sent_to_ray_workers_runs_in_the_driver_saying_so(ray_session, digits, tmp_path, caplog):
    import threading

    model, calibration, evaluation = digits
    guard = threading.Lock()  # what the eval_func holds can't be pickled

    def eval_func(candidate):
        with guard:
            return accuracy_of(candidate, evaluation)

    conf = base_conf(tmp_path)
    del conf["evaluation"]
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=eval_func)
    assert result.passed
    assert "the jobs can't be sent to Ray workers (" in caplog.text and "trials run in the driver alone" in caplog.text



def test_lpots_compare_label_false_measures_the_int8_outputs_against_the_fp32_models(digits, tmp_path):
    model, calibration, evaluation = digits
    conf = base_conf(tmp_path, accuracy_criterion={"absolute": 1.0}, exit_policy={"timeout": 0, "max_trials": 3})
    conf["evaluation"]["accuracy"]["metric"] = {"RMSE": {"compare_label": False}}
    conf["ray"]["workers"] = 1
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.baseline == 0.0 and result.passed and 0 < result.accuracy <= 1.0
    with torch.no_grad():
        error = torch.cat([result.model(images) - model(images) for images, _ in evaluation])
    # result.accuracy is measured on the compiled int8 kernels, result.model is the quantized model
    # they were compiled from: their roundings differ by a few percent of this small error on some
    # CPUs, while an error against the labels would be two orders of magnitude larger.
    assert result.accuracy == pytest.approx(float(error.pow(2).mean().sqrt()), rel=0.05)
