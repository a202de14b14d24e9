"""Classic vision models as users have them, tuned end to end to real int8: Keras MobileNetV2,
Gluon ResNet-18 v1 and torchvision's ResNet-18 and MobileNetV2, each at 32x32 with 10 classes.

The weights are random, drawn so that the network is neither dead nor chaotic: Keras' default
(Glorot) kernels make MobileNetV2's activations die out, so that every image gets one class, and
a random network whose BatchNorm statistics are recomputed on data is chaotic (a 1% perturbation
of the input changes a third of its fp32 top-1 classes), where no rounding can be faithful. So
MobileNetV2's kernels are redrawn He-normal (variance preserving for ReLU) beside BatchNorm's
initial statistics, ResNet-18 v1's BatchNorm statistics are recomputed on generated images, and
each classifier's bias is centred on generated images so that its top-1 classes vary.

The criterion is fidelity to the fp32 model on generated images: the mean cosine similarity of a
candidate's outputs to the fp32 model's, within 0.05 of the fp32 model's own (1.0); the top-1
agreement is asserted beside it.
"""

from __future__ import annotations

import collections
import importlib

import numpy as np
import pytest

import lpot_ray
from lpot_ray.errors import MissingFrameworkError

IMAGE = 32
CLASSES = 10
CALIBRATION_BATCHES, CALIBRATION_BATCH = 2, 16  # 32 calibration samples
EVALUATION_BATCHES, EVALUATION_BATCH = 2, 32  # 64 evaluation samples
MAX_LOSS = 0.05  # cosine similarity to the fp32 outputs of at least 0.95


def images(count: int, seed: int, channels_last: bool) -> np.ndarray:
    shape = (count, IMAGE, IMAGE, 3) if channels_last else (count, 3, IMAGE, IMAGE)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def batches(count: int, size: int, seed: int, channels_last: bool) -> list[np.ndarray]:
    return [images(size, seed + index, channels_last) for index in range(count)]


def conf(tmp_path, framework: str) -> dict:
    return {"model": {"name": "zoo", "framework": framework},
            "tuning": {"accuracy_criterion": {"absolute": MAX_LOSS}, "workspace": {"path": str(tmp_path / "ws")},
                       "exit_policy": {"max_trials": 4, "timeout": 300}},
            "ray": {"workers": 1}}


def fidelity_to(reference_model, evaluation: list, predict):
    """An eval_func: the mean cosine similarity of a model's outputs to the fp32 model's over the
    evaluation images; ``predict(model, batch)`` gives scores as numpy. Its ``agreement(model)``
    is the share of images on which the top-1 classes agree."""
    references = [predict(reference_model, batch) for batch in evaluation]
    distinct = len(np.unique(np.concatenate([scores.argmax(1) for scores in references])))
    assert distinct >= CLASSES // 2, f"the fp32 model gives only {distinct} classes: fidelity would mean nothing"

    def fidelity(model) -> float:
        similarities = [_cosine(predict(model, batch), expected) for batch, expected in zip(evaluation, references, strict=True)]
        return float(np.concatenate(similarities).mean())

    def agreement(model) -> float:
        hits = [predict(model, batch).argmax(1) == expected.argmax(1) for batch, expected in zip(evaluation, references, strict=True)]
        return float(np.concatenate(hits).mean())

    fidelity.agreement = agreement
    return fidelity


def _cosine(scores: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return (scores * expected).sum(1) / (np.linalg.norm(scores, axis=1) * np.linalg.norm(expected, axis=1) + 1e-12)


def assert_faithful_int8(result, n_ops: int, fidelity, min_agreement: float) -> None:
    assert result.passed, result.reason
    assert fidelity.agreement(result.model) >= min_agreement
    assert result.baseline == pytest.approx(1.0, abs=0.02)
    assert result.accuracy >= result.baseline - MAX_LOSS
    assert len(result.int8_ops) + len(result.fp32_ops) == n_ops
    assert len(result.int8_ops) >= 0.9 * n_ops
    assert result.objectives["latency_ratio"] > 0


# --- TensorFlow: Keras MobileNetV2 through TFLite ---------------------------------------------
@pytest.fixture(scope="module")
def keras_mobilenet_v2():
    pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
    pytest.importorskip("ai_edge_litert", reason="the tensorflow extra is not installed")
    from lpot_ray.adaptors.tensorflow import import_tensorflow

    import_tensorflow()
    import keras

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(IMAGE, IMAGE, 3), classes=CLASSES)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:  # He-normal: fan-in is every axis but the output one(s)
            fan_in = np.prod(kernel.shape[:-2 if isinstance(layer, keras.layers.DepthwiseConv2D) else -1])
            kernel.assign(rng.standard_normal(tuple(kernel.shape)).astype(np.float32) * np.sqrt(2.0 / fan_in))
    head = model.get_layer("predictions")
    features = keras.Model(model.input, head.input)(images(128, 100, channels_last=True)).numpy()
    head.bias.assign(-(features @ head.kernel.numpy()).mean(0))
    return model


def tflite_op_dtypes(content: bytes) -> collections.Counter:
    """(op, dtype of its first input) -> count, for every op of a flatbuffer."""
    from lpot_ray.adaptors.tensorflow import _interpreter

    interpreter = _interpreter(content)
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    return collections.Counter((op["op_name"], np.dtype(tensors[int(op["inputs"][0])]["dtype"]).name)
                               for op in interpreter._get_ops_details())


def test_keras_mobilenet_v2_runs_int8_depthwise_convs_and_residual_adds(keras_mobilenet_v2, tmp_path):
    model = keras_mobilenet_v2
    evaluation = batches(EVALUATION_BATCHES, EVALUATION_BATCH, 10, channels_last=True)
    fidelity = fidelity_to(model, evaluation, lambda candidate, batch: np.asarray(candidate(batch)))
    calibration = batches(CALIBRATION_BATCHES, CALIBRATION_BATCH, 1, channels_last=True)
    result = lpot_ray.tune(model, conf(tmp_path, "tensorflow"), q_dataloader=calibration, eval_func=fidelity)

    assert_faithful_int8(result, 53, fidelity, min_agreement=0.6)  # 35 convolutions, 17 depthwise, the classifier
    assert {"block_1_depthwise", "block_16_depthwise", "predictions"} <= set(result.int8_ops)
    ops = tflite_op_dtypes(result.model.content)
    assert ops[("ADD", "int8")] == 10  # every residual add runs int8
    assert ops[("MEAN", "int8")] == ops[("SOFTMAX", "int8")] == 1
    # BatchNorm and ReLU6 are folded into the convolutions by the converter: no op of them is left,
    # and only the input's QUANTIZE reads float.
    assert {op for op, dtype in ops if dtype == "float32"} == {"QUANTIZE"}
    assert not {op for op, _ in ops} & {"MUL", "RELU6", "HARD_SWISH"}


# --- MXNet: Gluon ResNet-18 v1 on oneDNN --------------------------------------------------------
@pytest.fixture(scope="module")
def gluon_resnet18_v1():
    try:
        from lpot_ray.adaptors.mxnet import import_mxnet

        mx = import_mxnet()
    except MissingFrameworkError as error:
        pytest.skip(f"MXNet is not installed: {error}")
    mx.random.seed(0)
    net = mx.gluon.model_zoo.vision.resnet18_v1(pretrained=False, classes=CLASSES)
    net.initialize(mx.init.Xavier())
    for block in _gluon_blocks(net):  # one pass in training mode sets the statistics to this batch's
        if isinstance(block, mx.gluon.nn.BatchNorm):
            block._kwargs["momentum"] = 0.0
    generated = mx.nd.array(images(128, 100, channels_last=False))
    with mx.autograd.train_mode():
        net(generated).wait_to_read()
    features = net.features(generated).reshape((len(generated), -1)).asnumpy()
    net.output.bias.set_data(mx.nd.array(-(features @ net.output.weight.data().asnumpy().T).mean(0)))
    net.hybridize()
    return mx, net


def _gluon_blocks(block):
    yield block
    for child in block._children.values():
        yield from _gluon_blocks(child)


def test_gluon_resnet18_v1_folds_batchnorm_and_fuses_residual_sums_in_int8(gluon_resnet18_v1, tmp_path):
    from lpot_ray.adaptors.mxnet import graph_nodes

    mx, net = gluon_resnet18_v1
    evaluation = batches(EVALUATION_BATCHES, EVALUATION_BATCH, 10, channels_last=False)
    fidelity = fidelity_to(net, evaluation, lambda candidate, batch: candidate(mx.nd.array(batch)).asnumpy())
    calibration = batches(CALIBRATION_BATCHES, CALIBRATION_BATCH, 1, channels_last=False)
    result = lpot_ray.tune(net, conf(tmp_path, "mxnet"), q_dataloader=calibration, eval_func=fidelity)

    # 20 convolutions, the classifier; top-1 agreement on random weights, whose logits lie close,
    # moves with the CPU's int8 kernels (0.86 to 0.91 measured) while the cosine stays above 0.99
    assert_faithful_int8(result, 21, fidelity, min_agreement=0.8)
    nodes = collections.Counter((node["op"], str((node.get("attrs") or {}).get("with_sum", "")).lower())
                                for node in graph_nodes(result.model.symbol) if node["op"] != "null")
    assert nodes[("_sg_mkldnn_conv", "true")] == 8  # the 8 residual adds, each fused into an int8 conv
    assert nodes[("_contrib_quantized_pooling", "")] == 2
    # BatchNorm is folded into its convolution, ReLU and the adds fused: none is left as an op.
    assert not {op for op, _ in nodes} & {"BatchNorm", "elemwise_add", "Activation", "Convolution"}


# --- PyTorch: torchvision ResNet-18 and MobileNetV2 -------------------------------------------
def torchvision_models():
    """torchvision's model builders, or a skip saying why torchvision can't be had here."""
    pytest.importorskip("torch", reason="the torch extra is not installed")
    try:
        return importlib.import_module("torchvision.models")
    except ImportError:
        pytest.skip("torchvision is not installed (no torch extra installs it)")
    except RuntimeError as error:  # a torchvision built for another torch: its C++ ops don't load
        pytest.skip(f"torchvision does not load beside this torch: {error}")


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_model_runs_int8(name, tmp_path):
    import torch

    models = torchvision_models()
    torch.manual_seed(0)
    model = getattr(models, name)(weights=None, num_classes=CLASSES)
    for module in model.modules():  # a cumulative average over one pass in training mode
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    with torch.no_grad():
        model(torch.from_numpy(images(128, 100, channels_last=False)))
    model.eval()

    def predict(candidate, batch):
        with torch.no_grad():
            return candidate(torch.from_numpy(batch)).numpy()

    evaluation = batches(EVALUATION_BATCHES, EVALUATION_BATCH, 10, channels_last=False)
    fidelity = fidelity_to(model, evaluation, predict)
    calibration = [torch.from_numpy(batch) for batch in batches(CALIBRATION_BATCHES, CALIBRATION_BATCH, 1, False)]
    result = lpot_ray.tune(model, conf(tmp_path, "pytorch"), q_dataloader=calibration, eval_func=fidelity)
    assert_faithful_int8(result, 21 if name == "resnet18" else 53, fidelity, min_agreement=0.6)
