"""The TensorFlow adaptor on a real Keras CNN: TFLite int8, fallback, Ray, saved .tflite, bad input."""

import os
import time

import pytest

pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the tensorflow extra is not installed")

import lpot_ray  # noqa: E402
from lpot_ray.adaptors.tensorflow import TensorFlowAdaptor, TFLiteModel  # noqa: E402
from lpot_ray.errors import DataError, ModelError  # noqa: E402
from lpot_ray.history import History  # noqa: E402

from cli_helpers import CHANNELS_LAST, assert_history_and_report, digits_conf, tune_yaml
from conftest import accuracy_of_numpy, base_conf, tune_equalizing  # noqa: E402


@pytest.fixture(scope="module")
def keras_outliers(keras_digits):
    from lpot_ray.demo.keras_digits import with_activation_outliers

    model, calibration, evaluation = keras_digits
    return with_activation_outliers(model, calibration), calibration, evaluation


def build(model, calibration):
    adaptor = TensorFlowAdaptor()
    batches = [images for images, _ in calibration]
    fp32 = adaptor.load(adaptor.prepare(model, batches[0]))
    space = lpot_ray.TuningSpace.build(adaptor.capabilities(fp32), lpot_ray.load_config({"model": {"framework": "tensorflow"}}).quantization)
    return adaptor, fp32, space, batches


def test_capabilities_name_ops_by_keras_layer_with_their_macs(keras_digits):
    model, calibration, _ = keras_digits
    _, _, space, _ = build(model, calibration)
    assert [(op.name, op.op_type) for op in space.ops] == [
        ("conv1", "Conv2D"), ("conv2", "Conv2D"), ("fc1", "Dense"), ("fc2", "Dense")]
    assert space.ops[1].macs == 8 * 8 * 32 * 16 * 9  # conv2: output elements x (in_ch x 3 x 3)
    assert space.ops[2].weights == 32 * 4 * 4 * 64


def test_fallback_ops_run_float_and_calibration_runs_once(keras_digits):
    model, calibration, evaluation = keras_digits
    adaptor, fp32, space, batches = build(model, calibration)
    full = space.model_wise_configs()[0]
    quantized = adaptor.quantize(fp32, full, batches)
    lowered = adaptor.lower(quantized, space.ops, full, batches[0])
    assert lowered.int8_ops == ("conv1", "conv2", "fc1", "fc2") and lowered.fp32_ops == ()
    assert len(quantized.content) < 0.4 * len(fp32.content)  # int8 weights
    assert abs(accuracy_of_numpy(quantized, evaluation) - accuracy_of_numpy(model, evaluation)) < 0.02

    config = full.with_fallback(["fc1"])
    lowered = adaptor.lower(adaptor.quantize(fp32, config, batches), space.ops, config, batches[0])
    assert lowered.int8_ops == ("conv1", "conv2", "fc2") and lowered.fp32_ops == ("fc1",)
    assert adaptor.calibration_passes == 1  # the fallback reused the calibrated model


def test_inspect_tensors_blames_the_op_behind_the_outlier(keras_outliers):
    model, calibration, _ = keras_outliers
    adaptor, fp32, space, batches = build(model, calibration)
    errors = adaptor.inspect_tensors(fp32, space.model_wise_configs()[0], batches)
    assert set(errors) == {"conv1", "conv2", "fc1", "fc2"}
    assert max(errors, key=errors.get) == "conv2" and errors["conv2"] > 100 * errors["fc1"]


def test_strict_criterion_forces_a_fallback_through_ray_and_the_saved_tflite_reloads(
        ray_session, keras_outliers, tmp_path):
    model, calibration, evaluation = keras_outliers

    driver = os.getpid()

    def slow_eval(candidate):  # slow in the driver, so that the Ray worker joins (importing its framework) and takes trials
        time.sleep(1.5 if os.getpid() == driver else 0)
        return accuracy_of_numpy(candidate, evaluation)

    conf = base_conf(tmp_path, "tensorflow", accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 600, "max_trials": 30})
    del conf["evaluation"]
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=slow_eval)
    assert result.passed and result.framework == "tensorflow"
    assert {"conv2"} <= set(result.fp32_ops) and "fc1" in result.int8_ops and "fc2" in result.int8_ops
    assert result.baseline - result.accuracy <= 0.02
    assert {"latency_ms", "fp32_latency_ms", "latency_ratio"} <= set(result.objectives)
    assert "worker-1" in {trial.worker for trial in History(tmp_path / "ws" / "history.db").trials()}

    folder = result.save(tmp_path / "saved")
    assert (folder / "model.tflite").is_file()
    from ai_edge_litert.interpreter import Interpreter  # the saved file needs no lpot_ray

    Interpreter(model_path=str(folder / "model.tflite")).allocate_tensors()
    loaded = lpot_ray.load(folder)
    assert loaded.int8_ops == result.int8_ops
    assert accuracy_of_numpy(loaded.model, evaluation) == pytest.approx(result.accuracy)


def test_builtin_metric_and_mse_strategy_on_a_saved_model_directory(ray_session, keras_outliers, tmp_path):
    model, calibration, evaluation = keras_outliers
    saved_model = tmp_path / "saved_model"
    model.export(str(saved_model), verbose=False)
    conf = base_conf(tmp_path, "tensorflow", strategy={"name": "mse"}, accuracy_criterion={"absolute": 0.02},
                   exit_policy={"timeout": 600, "max_trials": 10})
    result = lpot_ray.tune(str(saved_model), conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed
    # Without Keras layers, ops are named by their weights' path; conv2's must stay fp32.
    assert any("conv2" in name for name in result.fp32_ops)
    (inspection,) = [trial for trial in History(tmp_path / "ws" / "history.db").trials() if trial.kind == "inspection"]
    errors = inspection.figures["op_errors"]
    assert "conv2" in max(errors, key=errors.get)


def test_tune_a_keras_file_from_a_yaml_alone(keras_digits, tmp_path):
    model_path = tmp_path / "digits.keras"
    keras_digits[0].save(model_path)
    conf = digits_conf(tmp_path, "tensorflow", model_path, CHANNELS_LAST)
    done = tune_yaml(tmp_path, conf)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8 accuracy" in done.stdout
    assert (tmp_path / "ws" / "int8_model" / "model.tflite").is_file()
    assert_history_and_report(tmp_path / "ws")

    (tmp_path / "notes.txt").write_text("hello")
    conf["model"]["path"] = str(tmp_path / "notes.txt")
    done = tune_yaml(tmp_path, conf)
    assert done.returncode == 2 and "notes.txt: expected a .keras file or a SavedModel directory" in done.stderr


def test_bad_models_and_batches_are_named(keras_digits, tmp_path):
    import tensorflow as tf

    model, calibration, _ = keras_digits
    adaptor = TensorFlowAdaptor()
    images = next(iter(calibration))[0]
    with pytest.raises(ModelError, match="expected a Keras model, a .keras file or a SavedModel directory.*got dict"):
        adaptor.prepare({"not": "a model"}, images)

    no_signature = tmp_path / "no_signature"
    tf.saved_model.save(tf.Module(), str(no_signature))
    with pytest.raises(ModelError, match="no 'serving_default' signature"):
        adaptor.prepare(str(no_signature), images)

    with pytest.raises(DataError, match=r"has shape \(32, 1, 8, 8\); the model expects \('batch', 8, 8, 1\)"):
        adaptor.prepare(model, images.transpose(0, 3, 1, 2))

    conf = base_conf(tmp_path, "tensorflow")
    conf["quantization"] = {"op_wise": {"classifier": {"activation": {"dtype": "fp32"}}}}
    with pytest.raises(lpot_ray.ConfigError, match="matches no op of the model; its ops are: conv1, conv2, fc1, fc2"):
        lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=lambda candidate: 1.0)


def test_quantized_model_pickles_without_its_interpreters(keras_digits):
    import pickle

    model, calibration, evaluation = keras_digits
    adaptor, fp32, space, batches = build(model, calibration)
    quantized = adaptor.quantize(fp32, space.model_wise_configs()[0], batches)
    before = accuracy_of_numpy(quantized, evaluation)
    copy = pickle.loads(pickle.dumps(quantized))
    assert isinstance(copy, TFLiteModel) and accuracy_of_numpy(copy, evaluation) == before


def test_equalization_on_the_flatbuffer_is_exact_and_rescues_the_outlier_model(keras_outliers):
    """The x1000 channel between conv1 and conv2 breaks static int8; the equalized flatbuffer
    computes the same in fp32 and quantizes all int8 at the fp32 model's accuracy."""
    import dataclasses

    import numpy as np

    from lpot_ray.adaptors import tensorflow_recipes
    from lpot_ray.recipes import CROSS_LAYER_EQUALIZATION

    model, calibration, evaluation = keras_outliers
    adaptor, fp32, space, batches = build(model, calibration)
    assert adaptor.recipes(fp32) == (CROSS_LAYER_EQUALIZATION,)
    content, pairs = tensorflow_recipes.equalize(fp32.content)
    assert pairs == 3  # conv1 -> conv2 -> (pool, flatten) fc1 -> fc2
    equalized = TFLiteModel(content, fp32.op_names)
    for batch in batches:
        assert np.allclose(equalized(batch), fp32(batch), rtol=1e-4, atol=1e-4 * float(np.abs(fp32(batch)).max()))
    assert [op.name for op in equalized.ops()] == [op.name for op in fp32.ops()]

    config = space.model_wise_configs()[0]
    accuracy = lambda quantized: accuracy_of_numpy(quantized, evaluation)  # noqa: E731
    assert accuracy(adaptor.quantize(fp32, config, batches)) < 0.5
    with_recipe = adaptor.quantize(fp32, dataclasses.replace(config, recipes=(CROSS_LAYER_EQUALIZATION,)), batches)
    assert accuracy(with_recipe) >= accuracy(fp32) - 0.01
    assert adaptor.calibration_passes == 2  # the plain and the equalized flatbuffer, each calibrated once
    adaptor.quantize(fp32, dataclasses.replace(config, recipes=(CROSS_LAYER_EQUALIZATION,)), batches)
    assert adaptor.calibration_passes == 2
    plain = adaptor.inspect_tensors(fp32, config, batches)
    errors = adaptor.inspect_tensors(fp32, dataclasses.replace(config, recipes=(CROSS_LAYER_EQUALIZATION,)), batches)
    assert max(errors.values()) < 1e-3 < plain["conv2"]  # measured against the equalized fp32 ops


def test_a_tuning_equalizes_instead_of_falling_back_and_the_saved_tflite_keeps_it(keras_outliers, tmp_path):
    result = tune_equalizing("tensorflow", *keras_outliers, tmp_path, accuracy_of_numpy)
    assert len(result.int8_ops) == 4
