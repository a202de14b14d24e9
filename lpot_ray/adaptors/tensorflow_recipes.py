"""Cross-layer equalization (``lpot_ray.recipes``) on a float TFLite flatbuffer, with numpy: the
same rewrite as the PyTorch and ONNX ones, on the weight buffers of CONV_2D and FULLY_CONNECTED
ops, before the calibrator and the quantizer see the model.

TFLite lays weights out channel-last where they read channels: a CONV_2D weight is
[out, kh, kw, in], a FULLY_CONNECTED one [out, in], and a Keras ``Flatten`` of an NHWC map is a
RESHAPE whose features run channel-fastest. A ReLU is usually fused into the op before it
(``fusedActivationFunction``), which commutes with a positive scale; RELU6 and others do not.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from ..recipes import equalize_arrays

WEIGHTED = {"CONV_2D", "FULLY_CONNECTED"}
# Ops that commute with a positive per-channel scale (with no fused activation, or a ReLU).
SCALE_COMMUTING = {"RELU", "MAX_POOL_2D", "AVERAGE_POOL_2D"}
SHAPE_ONLY = {"SHAPE"}  # reads a tensor's shape, not its values: no obstacle to rescaling it


class Pair(NamedTuple):
    """Two ops to equalize, by tensor index: the first's weight and bias, the second's weight."""

    first: int
    bias: Optional[int]
    second: int


def equalize(content: bytes) -> tuple[bytes, int]:
    """The flatbuffer with each channel between two equalizable ops given the same weight range
    in both, and the number of pairs rewritten."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    subgraph = model.subgraphs[0]
    pairs = list(_pairs(model))
    touched = {index for pair in pairs for index in pair if index is not None}
    arrays = {index: _array(model, subgraph.tensors[index]).astype(np.float64) for index in touched}
    equalize_arrays(arrays, pairs, channels_last=True)
    for index in touched:
        buffer = model.buffers[subgraph.tensors[index].buffer]
        buffer.data = np.frombuffer(arrays[index].astype(np.float32).tobytes(), dtype=np.uint8)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), len(pairs)


def equalizable(content: bytes) -> bool:
    """Whether the flatbuffer has a pair of ops that equalization would rescale."""
    from tensorflow.lite.tools import flatbuffer_utils

    return next(_pairs(flatbuffer_utils.read_model_from_bytearray(bytearray(content))), None) is not None


def _pairs(model: Any) -> Iterator[Pair]:
    """Each pair of weighted ops joined only by scale-commuting ops (and a flatten after a
    CONV_2D), the first's activation commuting too, each weight read by its op alone."""
    subgraph = model.subgraphs[0]
    names = _op_names(model)
    readers: dict[int, list[Any]] = {}
    for op in subgraph.operators:
        for index in op.inputs:
            if index >= 0:
                readers.setdefault(int(index), []).append(op)
    outputs = {int(index) for index in subgraph.outputs}
    uses = collections.Counter(tensor.buffer for graph in model.subgraphs for tensor in graph.tensors)
    shared = {buffer for buffer, count in uses.items() if count > 1}

    def only_reader(op: Any) -> Optional[Any]:
        tensor = int(op.outputs[0])
        users = [user for user in readers.get(tensor, []) if names[user.opcodeIndex] not in SHAPE_ONLY]
        return users[0] if len(users) == 1 and tensor not in outputs and int(users[0].inputs[0]) == tensor else None

    for op in subgraph.operators:
        if not _weighted(model, op, names, readers, shared) or not _commutes(op):
            continue
        chain, flattened = op, False
        while (user := only_reader(chain)) is not None:
            kind = names[user.opcodeIndex]
            if kind in SCALE_COMMUTING and _commutes(user):
                chain = user
            elif kind == "RESHAPE" and names[op.opcodeIndex] == "CONV_2D" and not flattened and _flattens(subgraph, user):
                chain, flattened = user, True
            else:
                break
        consumer = only_reader(chain)
        if consumer is None or not _weighted(model, consumer, names, readers, shared):
            continue
        if flattened != (names[consumer.opcodeIndex] == "FULLY_CONNECTED" and names[op.opcodeIndex] == "CONV_2D"):
            continue
        first, second = subgraph.tensors[int(op.inputs[1])], subgraph.tensors[int(consumer.inputs[1])]
        channels, features = int(first.shape[0]), int(second.shape[-1])
        if features % channels or (not flattened and features != channels):
            continue
        bias = int(op.inputs[2]) if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
        yield Pair(int(op.inputs[1]), bias, int(consumer.inputs[1]))


def _weighted(model: Any, op: Any, names: list[str], readers: dict[int, list[Any]], shared: set[int]) -> bool:
    """A CONV_2D or FULLY_CONNECTED op whose weight and bias are float constants it alone reads,
    each in a buffer no other tensor uses (``shared``: the converter may give equal constants one)."""
    if names[op.opcodeIndex] not in WEIGHTED or len(op.inputs) < 2:
        return False
    parameters = [int(index) for index in op.inputs[1:3] if index >= 0]
    tensors = model.subgraphs[0].tensors
    return all(_is_float_constant(model, tensors[index]) and len(readers.get(index, [])) == 1
               and tensors[index].buffer not in shared for index in parameters)


def _commutes(op: Any) -> bool:
    """No fused activation, or a ReLU: both commute with a positive scale."""
    from tensorflow.lite.python import schema_py_generated as schema

    activation = getattr(op.builtinOptions, "fusedActivationFunction", schema.ActivationFunctionType.NONE)
    return activation in (schema.ActivationFunctionType.NONE, schema.ActivationFunctionType.RELU)


def _flattens(subgraph: Any, reshape: Any) -> bool:
    """A RESHAPE of an NHWC map to [batch, features]."""
    source, target = subgraph.tensors[int(reshape.inputs[0])], subgraph.tensors[int(reshape.outputs[0])]
    return len(source.shape) == 4 and len(target.shape) == 2


def _op_names(model: Any) -> list[str]:
    """The builtin name of each operator code (newer codes are in ``builtinCode`` only)."""
    from tensorflow.lite.python import schema_py_generated as schema

    by_value = {value: name for name, value in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    return [by_value.get(max(code.builtinCode, code.deprecatedBuiltinCode), "") for code in model.operatorCodes]


def _is_float_constant(model: Any, tensor: Any) -> bool:
    """A float32 tensor whose values the flatbuffer holds (not one an op computes)."""
    from tensorflow.lite.python import schema_py_generated as schema

    data = model.buffers[tensor.buffer].data if tensor.buffer < len(model.buffers) else None
    return data is not None and len(data) > 0 and tensor.type == schema.TensorType.FLOAT32


def _array(model: Any, tensor: Any) -> np.ndarray:
    """A float constant tensor's values (``_is_float_constant``)."""
    data = model.buffers[tensor.buffer].data
    return np.frombuffer(bytes(data), dtype=np.float32).reshape(tuple(int(dim) for dim in tensor.shape))
