"""Cross-layer equalization (``lpot_ray.recipes``) on an MXNet symbol model's parameters, with
numpy: the same rewrite as the PyTorch, ONNX and TFLite ones, before oneDNN fusion, calibration
and ``quantize_graph`` see the model.

MXNet lays weights out channel-first like PyTorch: a ``Convolution`` weight is [out, in, kh, kw],
a ``FullyConnected`` one [out, in], and a ``FullyConnected`` with ``flatten`` (its default) reads
an NCHW map as consecutive blocks of features per channel, as a ``Flatten`` lays it out.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple, Optional

import numpy as np

from ..recipes import equalize_arrays

WEIGHTED = {"Convolution", "FullyConnected"}


class Pair(NamedTuple):
    """Two layers to equalize, by parameter name: the first's weight and bias, the second's weight."""

    first: str
    bias: Optional[str]
    second: str


def equalize(graph: dict, arrays: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """The parameters rewritten (only those that change, as numpy) so that each channel between
    two equalizable layers of ``graph`` (a symbol's JSON) has the same weight range in both, and
    the number of pairs. ``arrays``: the parameters by name, MXNet NDArrays or numpy."""
    pairs = list(_pairs(graph, arrays))
    touched = {name for pair in pairs for name in pair if name is not None}
    rewritten = {name: _numpy(arrays[name]).astype(np.float64) for name in touched}
    equalize_arrays(rewritten, pairs)
    return {name: array.astype(np.float32) for name, array in rewritten.items()}, len(pairs)


def equalizable(graph: dict, arrays: dict[str, Any]) -> bool:
    """Whether the graph has a pair of layers that equalization would rescale."""
    return next(_pairs(graph, arrays), None) is not None


def _pairs(graph: dict, arrays: dict[str, Any]) -> Iterator[Pair]:
    """Each pair of ungrouped layers joined only by ReLU, pooling, dropout or a flatten (after a
    convolution), each reading its weights alone and each intermediate output read once."""
    nodes, outputs = graph["nodes"], {head[0] for head in graph.get("heads", [])}
    readers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        for source, *_ in node.get("inputs", []):
            readers.setdefault(source, []).append(index)

    def only_reader(index: int) -> Optional[int]:
        users = readers.get(index, [])
        return users[0] if len(users) == 1 and index not in outputs and nodes[users[0]]["inputs"][0][0] == index else None

    def parameter(node: dict, position: int) -> Optional[str]:
        inputs = node.get("inputs", [])
        if len(inputs) <= position:
            return None
        source = inputs[position][0]
        name = nodes[source]["name"]
        return name if nodes[source]["op"] == "null" and name in arrays and len(readers.get(source, [])) == 1 else None

    def weighted(node: dict) -> bool:
        attrs = node.get("attrs", {})
        has_bias = str(attrs.get("no_bias", "False")).lower() != "true"
        return (node["op"] in WEIGHTED and attrs.get("num_group", "1") == "1" and parameter(node, 1) is not None
                and (not has_bias or parameter(node, 2) is not None))

    for index, node in enumerate(nodes):
        if not weighted(node):
            continue
        chain, flattened = index, False
        while (user := only_reader(chain)) is not None and not weighted(nodes[user]):
            kind, attrs = nodes[user]["op"], nodes[user].get("attrs", {})
            if kind == "Flatten" and node["op"] == "Convolution" and not flattened:
                flattened = True
            elif not _commutes(kind, attrs):
                break
            chain = user
        consumer = only_reader(chain)
        if consumer is None or not weighted(nodes[consumer]):
            continue
        second = nodes[consumer]
        if node["op"] == "Convolution" and second["op"] == "FullyConnected":
            if not flattened and str(second.get("attrs", {}).get("flatten", "True")).lower() != "true":
                continue  # a dense layer over the last axis of a feature map: no block per channel
        elif flattened or (node["op"] == "FullyConnected" and second["op"] == "Convolution"):
            continue
        first_weight, second_weight = arrays[parameter(node, 1)], arrays[parameter(second, 1)]
        channels = first_weight.shape[0]
        features = second_weight.shape[1]
        if features % channels or (second["op"] == "Convolution" and features != channels):
            continue
        yield Pair(parameter(node, 1), parameter(node, 2), parameter(second, 1))


def _numpy(array: Any) -> np.ndarray:
    return array.asnumpy() if hasattr(array, "asnumpy") else np.asarray(array)


def _commutes(kind: str, attrs: dict) -> bool:
    """Ops that commute with a positive per-channel scale."""
    if kind == "Activation":
        return attrs.get("act_type") == "relu"
    if kind == "Pooling":
        return attrs.get("pool_type", "max") in ("max", "avg")
    return kind in ("relu", "Dropout", "_copy", "identity")
