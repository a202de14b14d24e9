"""Cross-layer equalization and SmoothQuant (``lpot_ray.recipes``) on an ONNX graph, with numpy:
the same rewrites as the PyTorch ones, on the initializers of Conv, Gemm and MatMul nodes (and a
Mul node inserted for SmoothQuant), before ONNX Runtime's quantizer sees the model."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from ..recipes import equalize_arrays

# Ops that commute with a positive per-channel scale, so equalization may look through them.
SCALE_COMMUTING = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "Dropout", "Identity"}


def equalize(proto: Any) -> int:
    """Rewrite ``proto``'s initializers in place so that each channel between two equalizable
    ops has the same weight range in both; the number of pairs rewritten."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    pairs = list(_pairs(proto, initializers))
    touched = {name for pair in pairs for name in pair if name is not None}
    arrays = {name: numpy_helper.to_array(initializers[name]).astype(np.float64) for name in touched}
    equalize_arrays(arrays, pairs)  # Conv [out, in, ...]; Gemm (transB) [out, in], a block per channel after a Flatten
    for name in touched:
        tensor = initializers[name]
        tensor.CopyFrom(numpy_helper.from_array(arrays[name].astype(numpy_helper.to_array(tensor).dtype), name))
    return len(pairs)


def equalizable(proto: Any) -> bool:
    """Whether the graph has a pair of nodes that equalization would rescale."""
    return next(_pairs(proto, {tensor.name: tensor for tensor in proto.graph.initializer}), None) is not None


def _pairs(proto: Any, initializers: dict[str, Any]) -> Iterator[tuple[str, Optional[str], str]]:
    """(first weight, first bias or None, second weight) of each pair of
    Conv/Gemm nodes joined only by scale-commuting nodes (and a Flatten after a Conv), each
    weight read by its node alone."""
    consumers = _consumers(proto)
    outputs = {output.name for output in proto.graph.output}

    def only_consumer(node: Any) -> Optional[Any]:
        users = consumers.get(node.output[0], [])
        return users[0] if len(users) == 1 and node.output[0] not in outputs else None

    for node in proto.graph.node:
        if not _weighted(node, initializers, consumers):
            continue
        chain, flattened = node, False
        while (user := only_consumer(chain)) is not None and user.input[0] == chain.output[0]:
            if user.op_type in SCALE_COMMUTING and len(user.output) == 1:
                chain = user
            elif (user.op_type == "Flatten" and node.op_type == "Conv" and not flattened
                  and _attribute(user, "axis", 1) == 1):
                chain, flattened = user, True
            else:
                break
        consumer = only_consumer(chain)
        if (consumer is None or consumer.input[0] != chain.output[0]
                or not _weighted(consumer, initializers, consumers)):
            continue
        if flattened and consumer.op_type != "Gemm":
            continue
        first, second = initializers[node.input[1]], initializers[consumer.input[1]]
        channels = first.dims[0]
        if len(second.dims) < 2 or second.dims[1] % channels or (not flattened and second.dims[1] != channels):
            continue
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        yield node.input[1], bias, consumer.input[1]


def _weighted(node: Any, initializers: dict[str, Any], consumers: dict[str, list[Any]]) -> bool:
    """A Conv (no groups) or a Gemm with a [out, in] weight (transB), its weight and bias
    initializers read by this node alone."""
    if node.op_type == "Conv":
        if _attribute(node, "group", 1) != 1:
            return False
    elif node.op_type != "Gemm" or _attribute(node, "transB", 0) != 1 or _attribute(node, "transA", 0) != 0:
        return False
    parameters = [name for name in node.input[1:3] if name]
    return (len(node.input) > 1 and all(name in initializers for name in parameters)
            and all(len(consumers.get(name, [])) == 1 for name in parameters))


def _consumers(proto: Any) -> dict[str, list[Any]]:
    """The nodes that read each tensor, by tensor name."""
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


# --- SmoothQuant --------------------------------------------------------------------------------
def smoothing_groups(proto: Any) -> dict[str, list[Any]]:
    """The MatMul and Gemm nodes with a weight initializer read by them alone, by the tensor
    they multiply (a layer's query, key and value share one): each group's input is smoothed once."""
    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    consumers = _consumers(proto)
    groups: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        if _smoothable(node, initializers, consumers) and node.input[0] not in initializers:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def smoothing_scales(proto: Any, alpha: float, channel_max: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SmoothQuant's per-input-channel scales of each group (by input tensor):
    s_j = max|X_j| ** alpha / max|W_j,:| ** (1 - alpha), ``channel_max`` giving max|X_j|."""
    from onnx import numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    scales = {}
    for name, nodes in smoothing_groups(proto).items():
        if name not in channel_max:
            continue
        rows = [_input_rows(node, numpy_helper.to_array(initializers[node.input[1]])) for node in nodes]
        weight_max = np.max([np.abs(weight).max(axis=1) for weight in rows], axis=0)
        scale = np.maximum(channel_max[name], 1e-5) ** alpha / np.maximum(weight_max, 1e-5) ** (1 - alpha)
        scales[name] = np.clip(scale, 1e-4, 1e4)
    return scales


def smooth(proto: Any, scales: dict[str, np.ndarray]) -> None:
    """Rewrite ``proto`` in place: each group's input divided by its scales (a Mul node before
    the group, in fp32) and the weight rows that multiply them scaled up by as much: the same
    function, activation outlier channels moved into the weights, which are quantized per channel."""
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in proto.graph.initializer}
    groups = smoothing_groups(proto)
    nodes = list(proto.graph.node)
    for index, (name, scale) in enumerate(scales.items()):
        inverse = f"smooth_quant_inverse_scale_{index}"
        proto.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        divided = f"{name}_smoothed_{index}"
        first = min(nodes.index(node) for node in groups[name])
        nodes.insert(first, helper.make_node("Mul", [name, inverse], [divided], name=f"SmoothQuant_{index}"))
        for node in groups[name]:
            node.input[0] = divided
            tensor = initializers[node.input[1]]
            weight = numpy_helper.to_array(tensor)
            transposed = node.op_type == "Gemm" and _attribute(node, "transB", 0) == 1
            scaled = weight * (scale[None, :] if transposed else scale[:, None])
            tensor.CopyFrom(numpy_helper.from_array(scaled.astype(weight.dtype), tensor.name))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)


def _smoothable(node: Any, initializers: dict[str, Any], consumers: dict[str, list[Any]]) -> bool:
    """A MatMul, or a Gemm without transA, whose 2-D weight initializer only it reads."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in initializers:
        return False
    if node.op_type == "Gemm" and _attribute(node, "transA", 0) != 0:
        return False
    return len(initializers[node.input[1]].dims) == 2 and len(consumers.get(node.input[1], [])) == 1


def _input_rows(node: Any, weight: np.ndarray) -> np.ndarray:
    """The weight as [in, out]: row j multiplies the input's channel j."""
    return weight.T if node.op_type == "Gemm" and _attribute(node, "transB", 0) == 1 else weight
