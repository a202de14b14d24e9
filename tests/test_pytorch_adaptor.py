"""The PyTorch adaptor on a real digits CNN: real PT2E int8, calibration cache, lowering."""

import dataclasses

import numpy as np
import pytest
import torch

from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.config import load_config
from lpot_ray.errors import ModelError
from lpot_ray.space import FP32, OpScheme, TuningSpace


def build(model, calibration, **quantization):
    adaptor = PyTorchAdaptor()
    batches = [images for images, _ in calibration]
    exported = adaptor.load(adaptor.prepare(model, batches[0]))
    conf = {"model": {"framework": "pytorch"}, "quantization": quantization}
    space = TuningSpace.build(adaptor.capabilities(exported), load_config(conf).quantization)
    return adaptor, exported, space, batches


def test_capabilities_list_conv_and_linear_modules_with_their_macs(digits):
    model, calibration, _ = digits
    _, _, space, _ = build(model, calibration)
    assert [(op.name, op.op_type) for op in space.ops] == [
        ("conv1", "Conv2d"), ("conv2", "Conv2d"), ("fc1", "Linear"), ("fc2", "Linear")]
    assert space.ops[1].macs == 8 * 8 * 32 * 16 * 9  # conv2: output elements x (in_ch x 3 x 3)
    assert all(scheme.weight.granularity == "per_channel" for op in space.ops for scheme in space.choices[op.name][:-1])


def test_cached_calibration_gives_the_same_outputs_without_a_forward_pass(digits):
    model, calibration, evaluation = digits
    adaptor, exported, space, batches = build(model, calibration)
    full = space.model_wise_configs()[0]
    adaptor.quantize(exported, full, batches)  # calibrates once
    passes = adaptor.calibration_passes
    cached = adaptor.quantize(exported, full.with_fallback(["conv1"]), batches)
    assert adaptor.calibration_passes == passes

    fresh_adaptor = PyTorchAdaptor()
    fresh = fresh_adaptor.quantize(exported, full.with_fallback(["conv1"]), batches)
    assert fresh_adaptor.calibration_passes > 0
    images = next(iter(evaluation))[0]
    assert torch.equal(cached(images), fresh(images))


def test_lowering_runs_int8_kernels_and_reports_fallback_ops(digits):
    model, calibration, _ = digits
    adaptor, exported, space, batches = build(model, calibration)
    config = space.model_wise_configs()[0].with_fallback(["fc1"])
    lowered = adaptor.lower(adaptor.quantize(exported, config, batches), space.ops, config, batches[0])
    assert lowered.int8_ops == ("conv1", "conv2", "fc2")
    assert lowered.fp32_ops == ("fc1",)


def test_compiled_model_runs_other_batch_sizes_in_chunks_and_compiles_only_for_far_larger_ones(digits):
    from torch._dynamo.utils import counters

    model, calibration, evaluation = digits
    adaptor, exported, space, batches = build(model, calibration)
    config = space.model_wise_configs()[0]
    lowered = adaptor.lower(adaptor.quantize(exported, config, batches), space.ops, config, batches[0])
    images = torch.cat([images for images, _ in evaluation])
    compiled = counters["stats"]["unique_graphs"]
    example = len(batches[0])
    full = lowered.model(images[:2 * example])  # two chunks of the compiled size
    smaller = lowered.model(images[:example - 5])  # one padded chunk
    uneven = lowered.model(images[:example + 7])  # a chunk and a padded one
    assert counters["stats"]["unique_graphs"] == compiled  # no new compile
    assert torch.equal(full[:example], lowered.model(images[:example]))
    assert torch.equal(smaller, full[:example - 5]) and torch.equal(uneven, full[:example + 7])
    lowered.model(images[:9 * example])  # more than 8 chunks' worth: compiled for once
    assert counters["stats"]["unique_graphs"] == compiled + 1
    reference = adaptor.quantize(exported, config, batches)(images[:2 * example])  # the q/dq model, uncompiled
    assert (full.argmax(1) == reference.argmax(1)).float().mean() >= 0.95


def test_numpy_float64_batches_run_a_float32_model(digits):
    model, calibration, _ = digits
    batches = [images.numpy().astype(np.float64) for images, _ in calibration]  # numpy's default float
    adaptor = PyTorchAdaptor()
    exported = adaptor.load(adaptor.prepare(model, batches[0]))
    config = TuningSpace.build(adaptor.capabilities(exported), load_config({"model": {"framework": "pytorch"}}).quantization
                               ).model_wise_configs()[0]
    quantized = adaptor.quantize(exported, config, batches)
    scores = adaptor.predict(quantized, batches[0])
    assert scores.shape == (len(batches[0]), 10)
    assert np.array_equal(scores, adaptor.predict(quantized, batches[0].astype(np.float32)))


def test_per_tensor_weights_do_not_lower_to_int8_so_they_are_not_offered(digits):
    model, calibration, _ = digits
    adaptor, exported, space, batches = build(model, calibration)
    config = space.model_wise_configs()[0]
    per_tensor = {name: OpScheme(dataclasses.replace(scheme.weight, granularity="per_tensor"), scheme.activation)
                  for name, scheme in config.op_schemes}
    config = dataclasses.replace(config, op_schemes=tuple(per_tensor.items()))
    lowered = adaptor.lower(adaptor.quantize(exported, config, batches), space.ops, config, batches[0])
    assert lowered.int8_ops == ()  # inductor silently compiles them to fp32

    _, _, restricted, _ = build(model, calibration, model_wise={"weight": {"granularity": "per_tensor"}})
    assert all(restricted.choices[op.name] == (FP32,) for op in restricted.ops)


def test_model_that_torch_export_cannot_handle_is_a_model_error(digits):
    _, calibration, _ = digits

    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x.flatten(1))
            return -self.fc(x.flatten(1))

    adaptor = PyTorchAdaptor()
    with pytest.raises(ModelError, match="torch.export could not export DataDependent"):
        adaptor.prepare(DataDependent(), next(iter(calibration))[0])
    with pytest.raises(ModelError, match="expected a torch.nn.Module"):
        adaptor.prepare(object(), next(iter(calibration))[0])


def test_quantized_model_round_trips_through_bytes(digits):
    model, calibration, evaluation = digits
    adaptor, exported, space, batches = build(model, calibration)
    quantized = adaptor.quantize(exported, space.model_wise_configs()[0], batches)
    restored = adaptor.deserialize(adaptor.serialize(quantized, batches[0]))
    images = next(iter(evaluation))[0]
    np.testing.assert_array_equal(adaptor.predict(restored, images), adaptor.predict(quantized, images))
    restored.eval()  # user eval functions call this on quantized models


def test_inspection_blames_the_ops_whose_inputs_have_outliers(outlier_digits):
    model, calibration, _ = outlier_digits
    adaptor, exported, space, batches = build(model, calibration)
    errors = adaptor.inspect_tensors(exported, space.model_wise_configs()[0], batches)
    assert set(errors) == {"conv1", "conv2", "fc1", "fc2"}
    assert min(errors["conv2"], errors["fc1"]) > 100 * max(errors["conv1"], errors["fc2"])


class _Payload:
    """Unpickling this touches a file: what a crafted model file could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_a_model_file_that_would_run_code_when_unpickled_is_refused_unrun(tmp_path):
    import io
    import zipfile

    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    torch.export.save(torch.export.export(module, (torch.randn(2, 1, 8, 8),)), tmp_path / "good.pt2")
    marker = tmp_path / "code_ran"
    crafted = io.BytesIO()
    torch.save(((_Payload(str(marker)),), {}), crafted)
    with zipfile.ZipFile(tmp_path / "good.pt2") as good, zipfile.ZipFile(tmp_path / "crafted.pt2", "w") as bad:
        for info in good.infolist():
            bad.writestr(info, crafted.getvalue() if info.filename.endswith("sample_inputs/model.pt") else good.read(info))

    adaptor = PyTorchAdaptor()
    assert isinstance(adaptor.load_file(str(tmp_path / "good.pt2")), torch.nn.Module)
    with pytest.raises(ModelError, match="crafted.pt2: holds pickled Python objects beyond tensors"):
        adaptor.load_file(str(tmp_path / "crafted.pt2"))
    assert not marker.exists()
    torch.load(io.BytesIO(crafted.getvalue()), weights_only=False)  # the same bytes, unpickled freely, do run
    assert marker.exists()


def test_compiled_model_makes_a_length_dynamic_once_it_varies_and_keeps_the_output_structure():
    from torch._dynamo.utils import counters

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(50, 16)
            self.fc = torch.nn.Linear(16, 8)

        def forward(self, ids):
            return {"scores": self.fc(self.embedding(ids))}

    model = Tagger().eval()
    tokens = [torch.randint(0, 50, (4, length)) for length in (6, 9, 3, 12)]
    adaptor = PyTorchAdaptor()
    exported = adaptor.load(adaptor.prepare(model, {"ids": tokens[0]}))
    compiled = adaptor.lower_fp32(exported, {"ids": tokens[0]})  # compiled for length 6
    before = counters["aot_autograd"]["total"]
    for ids in tokens[1:]:
        output = compiled(ids=ids)
        assert list(output) == ["scores"]
        torch.testing.assert_close(output["scores"], model(ids)["scores"], rtol=1e-4, atol=1e-5)
    assert counters["aot_autograd"]["total"] == before + 1  # length 9 made it dynamic; 3 and 12 reuse that


class ResidualBlock(torch.nn.Module):
    """torchvision's BasicBlock pattern: one ReLU module called twice, the second after the add."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(channels)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(channels)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_a_module_called_twice_like_torchvisions_residual_relu_quantizes_and_lowers_to_int8(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), ResidualBlock(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    images = torch.randn(64, 3, 16, 16)
    labels = model(images).argmax(1)
    conf = {"model": {"name": "residual", "framework": "pytorch"}, "evaluation": {"accuracy": {"metric": {"topk": 1}}},
            "tuning": {"workspace": {"path": str(tmp_path / "ws")}, "accuracy_criterion": {"absolute": 0.5}},
            "ray": {"workers": 1}}
    import lpot_ray

    result = lpot_ray.tune(model, conf, q_dataloader=[images[start:start + 16] for start in range(0, 64, 16)],
                           eval_dataloader=[(images[start:start + 16], labels[start:start + 16]) for start in range(0, 64, 16)])
    assert result.passed, result.reason  # it failed every trial: "Input partition has more than one output node"
    assert result.int8_ops == ("0", "2.conv1", "2.conv2", "5") and result.fp32_ops == ()


def test_percentile_calibration_leaves_out_the_stray_values_minmax_stretches_its_range_to():
    """One corrupt value among 262144 calibration inputs: minmax's int8 grid for the input spans
    it and rounds every real input to a few steps; percentile's leaves it out. (A layer after
    would see the corrupt sample's whole output row: a range no percentile leaves out.)"""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 16)).eval()
    calibration = [torch.randn(32, 1024) for _ in range(8)]
    calibration[3][5, 7] = 1e4
    evaluation = torch.randn(64, 1024)
    adaptor = PyTorchAdaptor()
    exported = adaptor.load(adaptor.prepare(model, calibration[0]))
    capabilities = adaptor.capabilities(exported)
    default = TuningSpace.build(capabilities, load_config({"model": {"framework": "pytorch"}}).quantization)
    assert {scheme.activation.algorithm for scheme in default.choices["0"][:-1]} == {"minmax", "kl"}  # percentile: opt-in
    conf = {"model": {"framework": "pytorch"},
            "quantization": {"model_wise": {"activation": {"algorithm": "minmax, percentile"}},
                             "calibration": {"sampling_size": 256}}}
    space = TuningSpace.build(capabilities, load_config(conf).quantization)
    minmax, percentile = space.model_wise_configs()
    assert [scheme.activation.algorithm for _, scheme in percentile.op_schemes] == ["percentile"]

    with torch.no_grad():
        expected = model(evaluation)

        def cosine(config):
            outputs = adaptor.quantize(exported, config, calibration)(evaluation)
            return float(torch.nn.functional.cosine_similarity(outputs, expected).mean())

        assert cosine(minmax) < 0.9 < 0.99 < cosine(percentile)
    lowered = adaptor.lower(adaptor.quantize(exported, percentile, calibration), space.ops, percentile, calibration[0])
    assert lowered.int8_ops == ("0",)
