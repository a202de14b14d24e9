"""bf16 as a per-op dtype between int8 and fp32: offered only where the CPU computes it natively."""

import logging

import numpy as np
import pytest

import lpot_ray
from lpot_ray import cpu
from lpot_ray.config import ExitPolicy, load_config
from lpot_ray.engine import Criterion, Engine
from lpot_ray.history import History
from lpot_ray.space import BF16, FP32, Op, OpCapability, OpScheme, TensorScheme, TuneConfig, TuningSpace
from lpot_ray.strategies.basic import BasicStrategy

from conftest import base_conf
from fakes import FakeExecutor

INT8 = OpScheme(TensorScheme("int8", "sym", "per_channel"), TensorScheme("uint8", "asym", "per_tensor"))
NATIVE_BF16 = cpu.supports_bf16(cpu.cpu_flags())
needs_bf16_cpu = pytest.mark.skipif(not NATIVE_BF16, reason=cpu.NO_BF16)


BF16_ON = load_config({"model": {"framework": "pytorch"}, "quantization": {"use_bf16": True}}).quantization


def bf16_space(n_ops: int = 4, int8=(INT8,), **quantization) -> TuningSpace:
    capabilities = [OpCapability(Op(f"op{i}", "Linear", macs=100), (*int8, BF16)) for i in range(n_ops)]
    conf = {"model": {"framework": "pytorch"}, "quantization": {"use_bf16": True, **quantization}}
    return TuningSpace.build(capabilities, load_config(conf).quantization)


# --- which CPUs get bf16 -------------------------------------------------------------------------
@pytest.mark.parametrize("flags, offered", [
    ({"avx512f", "avx512_vnni", "avx512_bf16"}, True),
    ({"avx512f", "amx_tile", "amx_bf16", "amx_int8"}, True),
    ({"avx512f", "avx512_vnni", "avx2"}, False),  # VNNI gives int8, not bf16
    (set(), False),  # not Linux: no flags, nothing optional
])
def test_bf16_is_offered_only_with_native_bf16_flags(flags, offered):
    assert cpu.supports_bf16(flags) is offered
    assert cpu.bf16_unavailable_reason(flags) == (None if offered else cpu.NO_BF16)


def test_cpu_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n"
    assert cpu.parse_cpuinfo(text) == {"fpu", "sse", "avx512_bf16", "avx512_vnni"}
    assert cpu.parse_cpuinfo("no flags here") == frozenset()


@pytest.mark.parametrize("offered", [True, False])
def test_pytorch_capabilities_follow_the_cpu(offered, trained_digits, monkeypatch, caplog, tmp_path):
    from lpot_ray.adaptors import pytorch

    from lpot_ray import session

    reason = None if offered else cpu.NO_BF16
    monkeypatch.setattr(pytorch, "bf16_unavailable_reason", lambda: reason)
    monkeypatch.setattr(session, "bf16_unavailable_reason", lambda: reason)
    model, calibration, evaluation = trained_digits
    adaptor = pytorch.PyTorchAdaptor()
    exported = adaptor.load(adaptor.prepare(model, next(iter(calibration))[0]))
    capabilities = adaptor.capabilities(exported)
    assert all((BF16 in capability.schemes) is offered for capability in capabilities)
    space = TuningSpace.build(capabilities, BF16_ON)
    assert (BF16 in space.choices["conv1"]) is offered and space.choices["conv1"][-1] == FP32
    if offered:
        assert space.choices["conv1"][-2:] == (BF16, FP32)
    off_by_default = TuningSpace.build(capabilities, load_config({"model": {"framework": "pytorch"}}).quantization)
    assert BF16 not in off_by_default.choices["conv1"]

    conf = base_conf(tmp_path, exit_policy={"max_trials": 1})  # asking for bf16 where there is none says why
    conf["quantization"] = {"use_bf16": True}
    conf["ray"]["workers"] = 1
    with caplog.at_level(logging.WARNING, logger="lpot_ray"):
        lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert (cpu.NO_BF16 in caplog.text) is not offered


# --- bf16 in the space, as plain data ------------------------------------------------------------
def test_bf16_round_trips_and_is_neither_int8_nor_fp32():
    config = TuneConfig((("a", INT8), ("b", BF16), ("c", FP32)), 100)
    assert [scheme.dtype for _, scheme in config.op_schemes] == ["int8", "bf16", "fp32"]
    assert (config.int8_ops, config.bf16_ops, config.fp32_ops) == (("a",), ("b",), ("c",))
    assert config.to_dict()["ops"]["b"] == {"dtype": "bf16"} and BF16.describe() == "bf16"
    assert TuneConfig.from_dict(config.to_dict()) == config
    assert config.with_fallback(["a"], BF16).bf16_ops == ("a", "b")


def test_bf16_sits_between_int8_and_fp32_and_restrictions_select_it():
    assert bf16_space().choices["op0"] == (INT8, BF16, FP32)
    assert bf16_space(model_wise={"weight": {"dtype": ["int8", "fp32"]}}).choices["op0"] == (INT8, FP32)
    only_bf16 = bf16_space(op_wise={"op1": {"weight": {"dtype": "bf16"}, "activation": {"dtype": "bf16"}}})
    assert only_bf16.choices["op1"] == (BF16, FP32) and only_bf16.choices["op0"] == (INT8, BF16, FP32)
    # bf16 has no quantization parameters: granularity or algorithm restrictions leave it alone.
    assert BF16 in bf16_space(model_wise={"weight": {"granularity": "per_channel"}}).choices["op0"]
    # Every approach can use it: dynamic quantization and training need no ranges for bf16 ops.
    # (An adaptor offers an op no int8 scheme of an approach it can't run that op in.)
    assert bf16_space(int8=(), approach="post_training_dynamic_quant").choices["op0"] == (BF16, FP32)


def test_the_proxies_count_a_bf16_op_at_half_an_fp32_one():
    space = bf16_space()
    names = [op.name for op in space.ops]
    config = TuneConfig(tuple((name, INT8) for name in names), 100)
    assert space.fp32_macs_fraction(config.with_fallback(["op0"], BF16)) == pytest.approx(0.125)
    assert space.fp32_macs_fraction(config.with_fallback(["op0"])) == pytest.approx(0.25)
    assert space.fp32_macs_fraction(config.with_fallback(names, BF16)) == pytest.approx(0.5)


# --- the basic strategy falls back int8 -> bf16 -> fp32 ------------------------------------------
def run_basic(tmp_path, accuracy_of):
    space = bf16_space()
    history = History.start(tmp_path / "ws", None, {"model": "m"})
    try:
        return Engine(BasicStrategy(space), FakeExecutor(accuracy_of, 2), history, Criterion(0.9, absolute=0.01),
                      ExitPolicy(timeout=60), space.fp32_macs_fraction).run()
    finally:
        history.close()


def test_basic_falls_back_to_bf16_before_fp32(tmp_path):
    def accuracy_of(config):  # op1 and op3 break in int8, bf16 is as good as fp32
        return 0.9 - 0.05 * len({"op1", "op3"} & set(config.int8_ops))

    outcome = run_basic(tmp_path, accuracy_of)
    best = outcome.passing[0].config
    assert set(best.bf16_ops) == {"op1", "op3"} and best.fp32_ops == ()
    assert not any(trial.config.fp32_ops for trial in outcome.trials)  # fp32 was never needed


def test_basic_goes_on_to_fp32_when_bf16_is_not_enough(tmp_path):
    def accuracy_of(config):  # op2 needs fp32 itself
        return 0.9 - 0.05 * (config.op_schemes[2][1] != FP32)

    best = run_basic(tmp_path, accuracy_of).passing[0].config
    assert best.fp32_ops == ("op2",) and best.bf16_ops == ()


# --- real bf16 kernels (PyTorch, inductor, oneDNN) -----------------------------------------------
@needs_bf16_cpu
def test_a_bf16_op_lowers_to_bf16_kernels_beside_int8_ones(trained_digits):
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor

    model, calibration, evaluation = trained_digits
    adaptor = PyTorchAdaptor()
    batches = [images for images, _ in calibration]
    exported = adaptor.load(adaptor.prepare(model, batches[0]))
    space = TuningSpace.build(adaptor.capabilities(exported), BF16_ON)
    config = space.model_wise_configs()[0].with_fallback(["conv2"], BF16)
    quantized = adaptor.quantize(exported, config, batches)
    lowered = adaptor.lower(quantized, space.ops, config, batches[0])
    assert lowered.bf16_ops == ("conv2",) and lowered.int8_ops == ("conv1", "fc1", "fc2") and lowered.fp32_ops == ()

    def accuracy(run):
        return float(np.mean(np.concatenate([adaptor.predict(run, images).argmax(1) == labels.numpy()
                                             for images, labels in evaluation])))

    assert abs(accuracy(lowered.model) - accuracy(model)) <= 0.02
    saved = adaptor.deserialize(adaptor.serialize(quantized, batches[0]))
    assert str(saved.get_buffer("conv2_weight_bf16").dtype) == "torch.bfloat16"  # the saved model holds bf16 weights


@needs_bf16_cpu
def test_tuning_ends_with_the_outlier_ops_in_bf16_not_fp32(ray_session, outlier_digits, tmp_path):
    model, calibration, evaluation = outlier_digits
    conf = base_conf(tmp_path, exit_policy={"timeout": 600, "max_trials": 30})  # a timeout: prune the fallback set
    conf["quantization"]["use_bf16"] = True
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and result.n_evaluated > 2  # the model-wise configs failed: bf16 came from fallback
    assert set(result.bf16_ops) == {"conv2", "fc1"} and result.fp32_ops == ()
    assert set(result.int8_ops) == {"conv1", "fc2"}
    assert result.baseline - result.accuracy <= 0.01 * result.baseline
    assert 0 < result.objectives["fp32_macs_fraction"] < 0.5  # bf16 ops counted at half their MACs
    loaded = lpot_ray.load(result.save(tmp_path / "saved"))
    assert loaded.bf16_ops == result.bf16_ops and loaded.config == result.config


def test_unset_use_bf16_keeps_bf16_out_of_the_search_but_offers_the_fallback_ops_a_bf16_twin():
    capabilities = [OpCapability(Op(f"op{i}", "Linear", macs=100), (INT8, BF16)) for i in range(3)]

    def space(**quantization):
        return TuningSpace.build(capabilities, load_config({"model": {"framework": "pytorch"},
                                                            "quantization": quantization}).quantization)

    unset = space(op_wise={"op2": {"activation": {"dtype": "fp32"}}})  # the user keeps op2 in fp32
    assert all(BF16 not in choices for choices in unset.choices.values())
    fallback = TuneConfig(tuple((f"op{i}", INT8 if i == 0 else FP32) for i in range(3)), 100)
    twin = unset.bf16_twin(fallback)
    assert twin.bf16_ops == ("op1",) and twin.fp32_ops == ("op2",) and twin.int8_ops == ("op0",)
    assert unset.bf16_twin(fallback.with_fallback(["op1"], INT8)) is None  # nothing the search put in fp32
    assert space(use_bf16=False).bf16_twin(fallback) is None
    assert space(model_wise={"weight": {"dtype": ["int8", "fp32"]}}).bf16_twin(fallback) is None
    searched = space(use_bf16=True)  # in the search already: no twin at the end
    assert BF16 in searched.choices["op1"] and searched.bf16_twin(fallback) is None


@needs_bf16_cpu
def test_a_tunings_fallback_ops_end_in_bf16_only_if_measured_faster(ray_session, outlier_digits, tmp_path):
    from lpot_ray.history import History
    from lpot_ray.session import BF16_WORTH

    model, calibration, evaluation = outlier_digits
    conf = base_conf(tmp_path, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 0, "max_trials": 30})
    del conf["quantization"]["use_bf16"]  # unset: bf16 not searched, tried for the fallback ops at the end
    conf["ray"]["workers"] = 1
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    twin = History(tmp_path / "ws" / "history.db").get_meta("bf16_twin")
    assert result.passed and twin is not None and twin["bf16_ops"]
    faster = twin["latency_ratio"] > BF16_WORTH * twin["fp32_fallback_latency_ratio"]
    assert twin["kept"] == (faster and result.baseline - twin["accuracy"] <= 0.02)
    fallback = set(twin["bf16_ops"])
    if twin["kept"]:
        assert set(result.bf16_ops) == fallback and not fallback & set(result.fp32_ops)
        assert result.objectives["latency_ratio"] == twin["latency_ratio"]
    else:
        assert result.bf16_ops == () and fallback <= set(result.fp32_ops)
