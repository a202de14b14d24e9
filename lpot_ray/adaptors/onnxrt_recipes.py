"""Cross-layer equalization (``lpot_ray.recipes``) on an ONNX graph, with numpy: the same rewrite
as the PyTorch one, on the initializers of Conv and Gemm nodes, before ONNX Runtime's quantizer
sees the model."""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np

from ..recipes import EQUALIZATION_PASSES, equalization_scales

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
    for _ in range(EQUALIZATION_PASSES):
        for first, bias, second in pairs:
            w1, w2 = arrays[first], arrays[second]
            channels = w1.shape[0]
            # the second op's input channels: Conv [out, in, ...]; Gemm with transB [out, in],
            # each channel a block of in / channels features after a Flatten
            w2_blocks = w2.reshape(w2.shape[0], channels, -1)
            scale = equalization_scales(w1, w2_blocks.transpose(1, 0, 2))
            arrays[first] = w1 / scale.reshape(-1, *([1] * (w1.ndim - 1)))
            if bias is not None:
                arrays[bias] = arrays[bias] / scale
            arrays[second] = (w2_blocks * scale.reshape(1, channels, 1)).reshape(w2.shape)
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
    consumers: dict[str, list[Any]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
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


def _attribute(node: Any, name: str, default: Any) -> Any:
    from onnx import helper

    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default
