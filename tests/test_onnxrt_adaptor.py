"""The ONNX Runtime adaptor on the digits CNN exported to ONNX: QLinear and integer kernels, an
op_wise fp32 op, the saved .onnx reloading, LPOT's onnxrt framework names."""

import io
import logging
import subprocess
import sys
from pathlib import Path

import pytest

onnx = pytest.importorskip("onnx", reason="the onnxrt extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the onnxrt extra is not installed")

import lpot_ray  # noqa: E402
from lpot_ray.adaptors.onnxrt import OnnxModel, OnnxRuntimeAdaptor  # noqa: E402
from lpot_ray.config import Approach, load_config  # noqa: E402
from lpot_ray.errors import DataError, MissingFrameworkError, ModelError  # noqa: E402

from conftest import accuracy_of_numpy, base_conf  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "lpot-yaml" / "corpus"
FC1 = "/fc1/Gemm"
STATIC_KERNELS = {"QLinearConv", "QGemm", "QLinearMatMul"}
DYNAMIC_KERNELS = {"ConvInteger", "MatMulInteger"}


@pytest.fixture(scope="module")
def onnx_digits():
    """The digits CNN trained briefly and exported to ONNX: (ModelProto, calibration, evaluation)."""
    import torch

    from lpot_ray.demo.torch_digits import train_digits_cnn

    model, calibration, evaluation = train_digits_cnn(epochs=3)
    images = next(iter(calibration))[0]
    buffer = io.BytesIO()
    torch.onnx.export(model, (images,), buffer, dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue()), calibration, evaluation


def conf(tmp_path, framework="onnxrt", **quantization) -> dict:
    conf = base_conf(tmp_path, framework, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 120, "max_trials": 10})
    conf["ray"] = {"workers": 1}
    conf["quantization"] = {"op_wise": {FC1: {"activation": {"dtype": "fp32"}, "weight": {"dtype": "fp32"}}}, **quantization}
    return conf


def kernels(folder: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node}


def test_capabilities_name_nodes_with_their_weights_and_macs(onnx_digits):
    model, calibration, _ = onnx_digits
    adaptor = OnnxRuntimeAdaptor()
    fp32 = adaptor.load(adaptor.prepare(model, next(iter(calibration))[0]))
    ops = [capability.op for capability in adaptor.capabilities(fp32)]
    assert [(op.name, op.op_type) for op in ops] == [
        ("/conv1/Conv", "Conv"), ("/conv2/Conv", "Conv"), (FC1, "Gemm"), ("/fc2/Gemm", "Gemm")]
    assert ops[1].macs == 8 * 8 * 32 * 16 * 9 and ops[2].weights == 64 * 32 * 4 * 4


def test_static_tuning_runs_qlinear_kernels_keeps_the_op_wise_op_fp32_and_reloads(onnx_digits, tmp_path):
    model, calibration, evaluation = onnx_digits
    result = lpot_ray.tune(model, conf(tmp_path), q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed and result.framework == "onnxrt"
    assert result.int8_ops == ("/conv1/Conv", "/conv2/Conv", "/fc2/Gemm") and result.fp32_ops == (FC1,)
    assert result.baseline - result.accuracy <= 0.02

    folder = result.save(tmp_path / "saved")
    assert STATIC_KERNELS & kernels(folder) and "Gemm" in kernels(folder)  # fc1 stayed a float Gemm
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    images = next(iter(evaluation))[0].numpy()
    assert session.run(None, {"image": images})[0].shape == (len(images), 10)  # the file needs no lpot_ray
    loaded = lpot_ray.load(folder)
    assert loaded.int8_ops == result.int8_ops
    assert accuracy_of_numpy(loaded.model, evaluation) == pytest.approx(result.accuracy)


def test_lpot_integerops_name_tunes_dynamically_with_integer_kernels(onnx_digits, tmp_path, caplog):
    model, calibration, evaluation = onnx_digits
    caplog.set_level(logging.WARNING, "lpot_ray")
    result = lpot_ray.tune(model, conf(tmp_path, "onnxrt_integerops", approach="post_training_static_quant"),
                           q_dataloader=calibration, eval_dataloader=evaluation)
    assert "`quantization.approach: post_training_static_quant` changes nothing here" in caplog.text
    assert result.passed and FC1 in result.fp32_ops and "/conv2/Conv" in result.int8_ops
    folder = result.save(tmp_path / "saved")
    assert DYNAMIC_KERNELS <= kernels(folder) and not STATIC_KERNELS & kernels(folder)
    assert accuracy_of_numpy(lpot_ray.load(folder).model, evaluation) == pytest.approx(result.accuracy)


def test_an_onnx_file_tunes_from_model_path(onnx_digits, tmp_path):
    model, calibration, evaluation = onnx_digits
    path = tmp_path / "digits.onnx"
    onnx.save(model, str(path))
    adaptor = OnnxRuntimeAdaptor.for_approach(Approach.DYNAMIC)
    fp32 = adaptor.load(adaptor.prepare(adaptor.load_file(str(path)), next(iter(calibration))[0]))
    assert isinstance(fp32, OnnxModel) and len(adaptor.capabilities(fp32)) == 4
    with pytest.raises(ModelError, match="expected a .onnx file"):
        adaptor.load_file(str(Path(__file__)))


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"the LPOT YAML corpus is not at {CORPUS}")
def test_lpot_onnxrt_files_load_with_the_approach_their_name_means():
    static = load_config(CORPUS / "onnxrt_qlinearops__resnet50__resnet50_v1_5.yaml")
    dynamic = load_config(CORPUS / "onnxrt_integerops__onnx_model_zoo-gpt2__gpt2.yaml")
    assert static.model.framework == dynamic.model.framework == "onnxrt"
    assert static.quantization.approach == Approach.STATIC and dynamic.quantization.approach == Approach.DYNAMIC
    assert "MatMul_2924" in dynamic.quantization.op_wise


def test_bad_models_and_batches_are_named(onnx_digits):
    model, calibration, _ = onnx_digits
    adaptor = OnnxRuntimeAdaptor()
    images = next(iter(calibration))[0].numpy()
    with pytest.raises(ModelError, match="expected an onnx.ModelProto or a .onnx file.*got dict"):
        adaptor.prepare({"not": "a model"}, images)
    with pytest.raises(DataError, match=r"has shape \(32, 8, 8, 1\); the model expects \('batch', 1, 8, 8\)"):
        adaptor.prepare(model, images.transpose(0, 2, 3, 1))


def test_onnxruntime_is_imported_only_by_its_adaptor(monkeypatch):
    done = subprocess.run([sys.executable, "-c", "import sys, lpot_ray; print('onnx' in sys.modules or 'onnxruntime' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingFrameworkError, match=r"pip install 'lpot_ray\[onnxrt\]'"):
        OnnxRuntimeAdaptor()


def test_lpots_compare_label_false_tunes_on_the_error_against_the_fp32_outputs(onnx_digits, tmp_path):
    """As in LPOT's ONNX GPT-2 example: `MSE: {compare_label: false}`, the labels unused."""
    import numpy as np

    model, calibration, evaluation = onnx_digits
    settings = conf(tmp_path, "onnxrt_integerops")
    settings["evaluation"]["accuracy"]["metric"] = {"MSE": {"compare_label": False}}
    settings["tuning"]["accuracy_criterion"] = {"absolute": 0.5}
    result = lpot_ray.tune(model, settings, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.baseline == 0.0 and result.passed

    def logits(session):
        return np.concatenate([session.run(None, {"image": images.numpy()})[0] for images, _ in evaluation])

    providers = ["CPUExecutionProvider"]
    fp32 = logits(onnxruntime.InferenceSession(model.SerializeToString(), providers=providers))
    folder = result.save(tmp_path / "saved")
    int8 = logits(onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=providers))
    assert 0 < result.accuracy <= 0.5
    assert result.accuracy == pytest.approx(float(((int8 - fp32) ** 2).mean()), rel=1e-4)

    settings["tuning"]["accuracy_criterion"] = {"relative": 0.01}
    settings["tuning"]["workspace"]["path"] = str(tmp_path / "relative")
    with pytest.raises(lpot_ray.errors.EvaluationError, match="a relative criterion allows no error at all; give "
                                                              "`tuning.accuracy_criterion.absolute`"):
        lpot_ray.tune(model, settings, q_dataloader=calibration, eval_dataloader=evaluation)


def test_a_metric_that_reads_every_output_gets_them_all():
    """COCOmAPv2 reads a detector's several outputs: ONNX Runtime gives them all, in graph order."""
    import numpy as np
    import torch

    class TwoOutputs(torch.nn.Module):
        def forward(self, image):
            return image.sum(dim=(2, 3)), image.amax(dim=(2, 3))

    images = torch.rand(3, 1, 8, 8)
    buffer = io.BytesIO()
    torch.onnx.export(TwoOutputs(), (images,), buffer, dynamo=False, input_names=["image"], output_names=["sum", "max"],
                      dynamic_axes={"image": {0: "batch"}})
    adaptor = OnnxRuntimeAdaptor()
    model = adaptor.load(adaptor.prepare(onnx.load_from_string(buffer.getvalue()), images))
    total, peak = adaptor.predict_outputs(model, images.numpy())
    assert np.allclose(total, images.sum(dim=(2, 3)).numpy()) and np.allclose(peak, images.amax(dim=(2, 3)).numpy())
    assert np.allclose(adaptor.predict(model, images.numpy()), total)


def test_equalization_on_the_onnx_graph_is_exact_and_rescues_an_outlier_model(outlier_digits):
    """The outlier digits CNN exported to ONNX: static int8 breaks on its x1000 channels, the
    equalized graph computes the same in fp32 and tunes all int8."""
    import dataclasses

    import numpy as np
    import torch

    from lpot_ray.adaptors import onnxrt_recipes
    from lpot_ray.recipes import CROSS_LAYER_EQUALIZATION, SMOOTH_QUANT
    from lpot_ray.space import TuningSpace

    model, calibration, evaluation = outlier_digits
    images = next(iter(calibration))[0]
    buffer = io.BytesIO()
    torch.onnx.export(model, (images,), buffer, dynamo=False, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    adaptor = OnnxRuntimeAdaptor()
    fp32 = adaptor.load(adaptor.prepare(onnx.load_from_string(buffer.getvalue()), images))
    assert adaptor.recipes(fp32) == (CROSS_LAYER_EQUALIZATION, SMOOTH_QUANT)  # SmoothQuant: for the Gemm nodes
    proto = onnx.load_from_string(fp32.content)
    assert onnxrt_recipes.equalize(proto) == 3  # conv1 -> conv2 -> (pool, flatten) fc1 -> fc2
    equalized = OnnxModel(proto.SerializeToString())
    batch = images.numpy()
    assert np.allclose(equalized(batch), fp32(batch), rtol=1e-4, atol=1e-4 * float(np.abs(fp32(batch)).max()))

    space = TuningSpace.build(adaptor.capabilities(fp32), load_config({"model": {"framework": "onnxrt"}}).quantization,
                              adaptor.recipes(fp32))
    config = space.model_wise_configs()[0]
    batches = [images for images, _ in calibration]
    accuracy = lambda quantized: accuracy_of_numpy(quantized, evaluation)  # noqa: E731
    assert accuracy(adaptor.quantize(fp32, config, batches)) < 0.5
    assert accuracy(adaptor.quantize(fp32, dataclasses.replace(config, recipes=(CROSS_LAYER_EQUALIZATION,)), batches)) \
        >= accuracy(fp32) - 0.01
