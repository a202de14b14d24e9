"""TensorFlow dynamic range quantization: hybrid int8 kernels in LiteRT, per-op fallback by giving an
op its float weights back in the flatbuffer."""

import os
import time

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
pytest.importorskip("ai_edge_litert", reason="the tensorflow extra is not installed")

import lpot_ray  # noqa: E402
from lpot_ray.adaptors.tensorflow import TensorFlowAdaptor, _tensors  # noqa: E402
from lpot_ray.history import History  # noqa: E402

from cli_helpers import CHANNELS_LAST, digits_conf, tune_yaml
from conftest import accuracy_of_numpy, base_conf  # noqa: E402

DYNAMIC = "post_training_dynamic_quant"


def build(model, evaluation, approach=DYNAMIC):
    adaptor = TensorFlowAdaptor()
    adaptor.approach = approach
    batches = [next(iter(evaluation))[0]]
    fp32 = adaptor.load(adaptor.prepare(model, batches[0]))
    conf = lpot_ray.load_config({"model": {"framework": "tensorflow"}, "quantization": {"approach": approach}})
    return adaptor, fp32, lpot_ray.TuningSpace.build(adaptor.capabilities(fp32), conf.quantization), batches


def test_dynamic_schemes_only_where_the_converter_quantizes_weights(keras_digits):
    model, _, evaluation = keras_digits
    _, _, space, _ = build(model, evaluation)
    algorithms = {name: [scheme.activation.algorithm for scheme in choices if not scheme.is_fp32]
                  for name, choices in space.choices.items()}
    # conv1 (144 weights) and fc2 (640) are under the converter's 1024-element threshold: float.
    assert algorithms == {"conv1": [], "conv2": ["dynamic"], "fc1": ["dynamic"], "fc2": []}
    assert space.choices["conv2"][0].weight.granularity == "per_channel"  # hybrid conv and dense: per channel
    _, static_model, static_space, _ = build(model, evaluation, "post_training_static_quant")
    assert not static_model.dynamic and all(choice.activation is None or choice.activation.algorithm == "minmax"
                                            for choices in static_space.choices.values() for choice in choices)


def test_a_fallback_op_gets_its_float_weights_and_float_kernel_back(keras_digits):
    model, _, evaluation = keras_digits
    adaptor, fp32, space, batches = build(model, evaluation)
    full = space.model_wise_configs()[0]
    lowered = adaptor.lower(adaptor.quantize(fp32, full, batches), space.ops, full, batches[0])
    assert lowered.int8_ops == ("conv2", "fc1") and lowered.fp32_ops == ("conv1", "fc2")

    config = full.with_fallback(["conv2"])
    quantized = adaptor.quantize(fp32, config, batches)
    lowered = adaptor.lower(quantized, space.ops, config, batches[0])
    assert lowered.int8_ops == ("fc1",) and lowered.fp32_ops == ("conv1", "conv2", "fc2")
    tensors = quantized.tensor_details()
    dtypes = {op.name: (tensors[op.input_index]["dtype"], tensors[op.weight_index]["dtype"]) for op in quantized.ops()}
    assert dtypes["conv2"] == (np.float32, np.float32) and dtypes["fc1"] == (np.float32, np.int8)
    # conv2 now computes exactly what the float model's conv2 does (conv1 is float in both).
    conv2, reference = (next(op for op in graph.ops() if op.name == "conv2") for graph in (quantized, fp32))
    images = np.asarray(batches[0], dtype=np.float32)
    np.testing.assert_allclose(_tensors(quantized.content, [(images,)], 1, [conv2.output_index])[0][conv2.output_index],
                               _tensors(fp32.content, [(images,)], 1, [reference.output_index])[0][reference.output_index],
                               rtol=1e-5, atol=1e-5)
    assert abs(accuracy_of_numpy(quantized, evaluation) - accuracy_of_numpy(fp32, evaluation)) <= 0.02
    assert len(quantized.content) > len(adaptor.quantize(fp32, full, batches).content)  # float weights are bigger


def test_dynamic_tuning_end_to_end_through_ray(ray_session, keras_digits, tmp_path):
    model, _, evaluation = keras_digits
    driver, marker, calls = os.getpid(), tmp_path / "worker-evaluated", []

    def slow_eval(candidate):
        """After the baseline and the model-wise trial (nothing else to do yet), the driver waits
        for the Ray worker (importing TensorFlow) to evaluate a trial, so that both really work."""
        if os.getpid() != driver:
            marker.touch()
        else:
            calls.append(1)
            deadline = time.time() + 120
            while len(calls) > 2 and not marker.exists() and time.time() < deadline:
                time.sleep(0.2)
        return accuracy_of_numpy(candidate, evaluation)

    def needs_conv2_float(candidate):  # a criterion only met with conv2 in float
        tensors = candidate.tensor_details()
        conv2 = next(op for op in candidate.ops() if op.name == "conv2")
        return slow_eval(candidate) - (0.5 if tensors[conv2.weight_index]["dtype"] == np.int8 else 0.0)

    conf = base_conf(tmp_path, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 600, "max_trials": 10})
    conf["model"]["framework"] = "tensorflow"
    conf["quantization"] = {"approach": DYNAMIC}
    del conf["evaluation"]
    # No calibration: the loader only gives the example batch the model is converted with.
    result = lpot_ray.tune(model, conf, q_dataloader=evaluation, eval_func=needs_conv2_float)
    assert result.passed and result.int8_ops == ("fc1",) and result.fp32_ops == ("conv1", "conv2", "fc2")
    assert result.baseline - result.accuracy <= 0.02
    trials = History(tmp_path / "ws" / "history.db").trials()
    assert "worker-1" in {trial.worker for trial in trials}
    assert all(scheme.activation.algorithm == "dynamic" for trial in trials for scheme in dict(trial.config.op_schemes).values()
               if not scheme.is_fp32)
    loaded = lpot_ray.load(result.save(tmp_path / "saved"))
    assert accuracy_of_numpy(loaded.model, evaluation) == pytest.approx(result.accuracy)


def test_dynamic_tuning_from_a_yaml_alone(keras_digits, tmp_path):
    model_path = tmp_path / "digits.keras"
    keras_digits[0].save(model_path)
    # The calibration loader is optional for dynamic quantization: the first evaluation batch is the example.
    conf = digits_conf(tmp_path, "tensorflow", model_path, CHANNELS_LAST, approach=DYNAMIC)
    del conf["quantization"]["calibration"]
    done = tune_yaml(tmp_path, conf)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "conv2, fc1" in done.stdout  # the int8 (hybrid) ops
    assert (tmp_path / "ws" / "int8_model" / "model.tflite").is_file()
