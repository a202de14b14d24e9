"""The accuracy-recovery recipes of ``lpot_ray.recipes`` on a torch.export graph module.

Each computes new values for some of the module's parameters, from its graph and weights (and,
for bias correction, from calibration outputs); ``with_parameters`` puts them into a module.
The fp32 model's own tensors are never written: ``ExportedProgram.module()`` shares them.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterable, Optional

from ..recipes import EQUALIZATION_PASSES

# Ops that commute with a positive per-channel scale: equalization may look through them.
SCALE_COMMUTING = {"aten.relu.default", "aten.relu_.default", "aten.max_pool2d.default", "aten.avg_pool2d.default",
                   "aten.adaptive_avg_pool2d.default", "aten.dropout.default"}
# Lays a conv's NCHW output out as consecutive blocks of features per channel (N, C*H*W).
FLATTEN = "aten.flatten.using_ints"
WEIGHTED = {"aten.conv2d.default", "aten.linear.default"}


def with_parameters(module: Any, values: dict[str, Any]) -> Any:
    """``module`` with the named parameters replaced by ``values`` (new tensors, not written into
    the old ones, which other modules share)."""
    import torch

    for name, value in values.items():
        owner, _, attribute = name.rpartition(".")
        module.get_submodule(owner)._parameters[attribute] = torch.nn.Parameter(value, requires_grad=False)
    return module


def equalized(module: Any) -> dict[str, Any]:
    """Cross-layer equalization: new weights (and first biases) of each pair of Conv/Linear ops
    joined only by scale-commuting ops, so that each channel between them has the same weight
    range in both. The function is unchanged in fp32: ReLU(x / s) = ReLU(x) / s for s > 0."""
    import torch

    pairs = list(_equalization_pairs(module))
    changed = {name for pair in pairs for name in pair if name is not None}
    values = {name: module.get_parameter(name).detach().clone() for name in changed}
    with torch.no_grad():
        for _ in range(EQUALIZATION_PASSES):
            for first_weight, first_bias, second_weight in pairs:
                w1, w2 = values[first_weight], values[second_weight]
                channels = w1.shape[0]
                per_channel = w2.shape[1] // channels  # 1, or the features a flatten gives each channel
                w2_blocks = w2.reshape(w2.shape[0], channels, per_channel, *w2.shape[2:])
                range1 = w1.abs().reshape(channels, -1).amax(dim=1)
                range2 = w2_blocks.abs().transpose(0, 1).reshape(channels, -1).amax(dim=1)
                scale = torch.where((range1 > 0) & (range2 > 0), (range1 / range2.clamp_min(1e-30)).sqrt(),
                                    torch.ones_like(range1))
                values[first_weight] = w1 / scale.reshape(-1, *([1] * (w1.dim() - 1)))
                if first_bias is not None:
                    values[first_bias] = values[first_bias] / scale
                shape = [1, channels, 1] + [1] * (w2.dim() - 2)
                values[second_weight] = (w2_blocks * scale.reshape(shape)).reshape(w2.shape)
    return values


def equalizable(module: Any) -> bool:
    """Whether the graph has a pair of ops that equalization would rescale."""
    return next(iter(_equalization_pairs(module)), None) is not None


def _equalization_pairs(module: Any) -> Iterable[tuple[str, Optional[str], str]]:
    """(first weight, first bias or None, second weight) of each equalizable pair."""
    readers = _readers(module.graph)
    for node in module.graph.nodes:
        if not _weighted(node) or not _owns_parameters(node, readers):
            continue
        chain, flattened = node, False
        while len(chain.users) == 1:
            (user,) = chain.users
            target = str(user.target)
            if target in SCALE_COMMUTING and user.args[0] is chain:
                chain = user
            elif (target == FLATTEN and user.args[0] is chain and not flattened and _flattens_from_channels(user)
                  and str(node.target) == "aten.conv2d.default"):
                chain, flattened = user, True
            else:
                break
        if len(chain.users) != 1:
            continue
        (consumer,) = chain.users
        if not _weighted(consumer) or not _owns_parameters(consumer, readers) or consumer.args[0] is not chain:
            continue
        if flattened and str(consumer.target) != "aten.linear.default":
            continue
        first, second = _param(module, node.args[1]), _param(module, consumer.args[1])
        channels = first.shape[0]
        if second.dim() < 2 or second.shape[1] % channels or (not flattened and second.shape[1] != channels):
            continue  # the channels don't map one to one (or to blocks) onto the second op's inputs
        yield node.args[1].target, bias_of(node), consumer.args[1].target


def _weighted(node: Any) -> bool:
    """A Conv2d/Linear call with its weight (and bias) as parameters and no groups."""
    if node.op != "call_function" or str(node.target) not in WEIGHTED:
        return False
    if len(node.args) < 2 or getattr(node.args[1], "op", None) != "get_attr":
        return False
    if len(node.args) > 2 and node.args[2] is not None and getattr(node.args[2], "op", None) != "get_attr":
        return False
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return groups == 1


def bias_of(node: Any) -> Optional[str]:
    """The bias parameter of a conv/linear call, where it has one."""
    bias = node.args[2] if len(node.args) > 2 else None
    return bias.target if getattr(bias, "op", None) == "get_attr" else None


def _readers(graph: Any) -> collections.Counter:
    """How many graph nodes read each parameter."""
    return collections.Counter(node.target for node in graph.nodes if node.op == "get_attr")


def _owns_parameters(node: Any, readers: collections.Counter) -> bool:
    """Whether the op's weight (and bias) serve it alone: a parameter another call reads too (a
    module called twice, tied weights) can't be rescaled for one of them."""
    parameters = [arg for arg in node.args[1:3] if getattr(arg, "op", None) == "get_attr"]
    return all(readers[parameter.target] == 1 and len(parameter.users) == 1 for parameter in parameters)


def _flattens_from_channels(node: Any) -> bool:
    """Whether a flatten keeps the batch dimension and joins the rest, channel first."""
    start = node.args[1] if len(node.args) > 1 else 0
    end = node.args[2] if len(node.args) > 2 else -1
    return start == 1 and end == -1


def _param(module: Any, node: Any) -> Any:
    return module.get_parameter(node.target)


def bias_corrections(reference: Any, quantized: Any, ops: dict[str, tuple[str, str, str, int]],
                     batches: Iterable[Any],
                     outputs_of: Callable[[Any, dict[str, str], Any], dict[str, Any]]) -> dict[str, Any]:
    """Fast bias correction: for each op (name -> its graph node's name, its weight and bias
    parameters in ``reference`` and its output's channel dimension), the bias less the mean
    error per output channel that quantizing *this op* brought, on ``batches``: its int8 output
    against its fp32 output for the same input (the input it gets in the int8 model), so that an
    op is not corrected again for the errors of the ops before it. ``outputs_of(module, {key:
    node}, inputs)`` records node outputs."""
    import torch
    import torch.nn.functional as functional

    graph = {node.name: node for node in quantized.graph.nodes}
    recorded = {}  # key -> node name: each op's output and its float input
    for op, (name, _, _, _) in ops.items():
        if name in graph:
            recorded[op], recorded[f"{op} input"] = name, _float_input(graph[name]).name
    errors: dict[str, Any] = {}
    count = 0
    with torch.no_grad():
        for inputs in batches:
            outputs = outputs_of(quantized, recorded, inputs)
            for op in ops:
                if op in outputs and f"{op} input" in outputs:
                    name, weight_name, bias_name, channel = ops[op]
                    node, x = graph[name], outputs[f"{op} input"].float()
                    weight, bias = reference.get_parameter(weight_name), reference.get_parameter(bias_name)
                    if str(node.target) == "aten.conv2d.default":
                        fp32 = functional.conv2d(x, weight, bias, *node.args[3:7])
                    else:
                        fp32 = functional.linear(x, weight, bias)
                    error = _per_channel_mean(outputs[op].float() - fp32, channel)
                    errors[op] = errors[op] + error if op in errors else error
            count += 1
        return {ops[op][2]: reference.get_parameter(ops[op][2]).detach() - error / count
                for op, error in errors.items()}


def _float_input(node: Any) -> Any:
    """The float tensor an int8 op's input is quantized from (before quantize/dequantize)."""
    source = node.args[0]
    while source.op == "call_function" and "quantize" in str(source.target):
        source = source.args[0]
    return source


def _per_channel_mean(error: Any, channel: int) -> Any:
    """Mean over every dimension but ``channel`` (1 for a conv's (N, C, H, W), -1 for a Linear's
    (N, ..., C))."""
    return error.movedim(channel, -1).reshape(-1, error.shape[channel]).mean(dim=0)


def smoothing_groups(module: Any) -> dict[str, list[Any]]:
    """The Linear calls by the node whose output they take (a layer's query, key and value share
    one): each group's input is smoothed once, for all of them."""
    groups: dict[str, list[Any]] = {}
    for node in module.graph.nodes:
        if _weighted(node) and str(node.target) == "aten.linear.default" and hasattr(node.args[0], "name"):
            groups.setdefault(node.args[0].name, []).append(node)
    readers = _readers(module.graph)
    return {name: linears for name, linears in groups.items()
            if all(_owns_parameters(linear, readers) for linear in linears)}


def smoothing_scales(module: Any, alpha: float, batches: Iterable[Any],
                     outputs_of: Callable[[Any, dict[str, str], Any], dict[str, Any]]) -> dict[str, Any]:
    """SmoothQuant's per-input-channel scales for each group of Linear calls (by input node):
    s_j = max|X_j| ** alpha / max|W_:,j| ** (1 - alpha), activations measured on ``batches``."""
    import torch

    groups = smoothing_groups(module)
    ranges: dict[str, Any] = {}
    for inputs in batches:
        for name, output in outputs_of(module, {name: name for name in groups}, inputs).items():
            channel_max = output.detach().abs().reshape(-1, output.shape[-1]).amax(dim=0)
            ranges[name] = torch.maximum(ranges[name], channel_max) if name in ranges else channel_max
    scales = {}
    for name, linears in groups.items():
        if name not in ranges:
            continue
        weight_max = torch.stack([_param(module, linear.args[1]).detach().abs().amax(dim=0)
                                  for linear in linears]).amax(dim=0)
        scale = ranges[name].clamp_min(1e-5) ** alpha / weight_max.clamp_min(1e-5) ** (1 - alpha)
        scales[name] = scale.clamp(1e-4, 1e4)
    return scales


def smoothed(module: Any, scales: dict[str, Any]) -> Any:
    """``module`` with each group's input divided by its scales (a multiply inserted before the
    Linear calls, in fp32) and the Linear weights' input columns multiplied by them: the same
    function, with activation outliers moved into the weights, which are quantized per channel."""
    import torch

    nodes = {node.name: node for node in module.graph.nodes}
    groups = smoothing_groups(module)
    values = {}
    for index, (name, scale) in enumerate(scales.items()):
        source = nodes[name]
        buffer = f"smooth_quant_inverse_scale_{index}"
        module.register_buffer(buffer, (1.0 / scale).to(torch.float32))
        with module.graph.inserting_before(groups[name][0]):  # after every placeholder, before any consumer
            inverse = module.graph.get_attr(buffer)
            divided = module.graph.call_function(torch.ops.aten.mul.Tensor, (source, inverse))
        divided.meta.update({key: source.meta[key] for key in ("val", "tensor_meta") if key in source.meta})
        for linear in groups[name]:
            linear.args = (divided, *linear.args[1:])
            weight = linear.args[1].target
            values[weight] = _param(module, linear.args[1]).detach() * scale
    module.graph.lint()
    module.recompile()
    return with_parameters(module, values)
