"""MXNet: real int8 on CPU through MXNet's own quantization pass and its oneDNN (MKLDNN) kernels.

A Gluon ``HybridBlock`` is hybridized, run once and exported; a symbol model is the
``(symbol, arg_params, aux_params)`` triple of ``mx.model.load_checkpoint``. Both travel as a zip
of MXNet's own ``model-symbol.json`` and ``model-0000.params``, which is also how a quantized
model is saved, so ``mx.gluon.SymbolBlock.imports`` reads it without lpot_ray.

Why this path: ``quantize_net_v2`` exports and calibrates the whole graph with one activation
algorithm each call. The same public steps are used one level down instead: the fp32 graph is
fused for oneDNN (``MKLDNN_QUANTIZE``: conv+relu and dense+relu become ``_sg_mkldnn_*`` nodes),
``quantize_graph`` rewrites it with the config's fp32 ops excluded by their fused node's name
(``exclude_layers``; excluding by layer name covers an op-type fallback too, since the space puts
every op of that type in fp32, so ``exclude_operators`` is not needed), and ``calib_graph`` sets
thresholds computed here. That allows two things ``quantize_net_v2`` can't do: calibration
statistics are collected once per tensor and sampling size and reused by every later config
(``calibration_passes`` counts the forward passes spent), and the activation algorithm is chosen
per tensor: a tensor takes the algorithm of the int8 op that produces it, else of the first int8
op that consumes it ("minmax" is MXNet's naive calibration, "kl" its entropy calibration).

In MXNet an int8 op requantizes its own output from calibrated thresholds, even when the next op
runs fp32; so an outlier between two ops is fixed only when both of them fall back.

What does not work: weight granularity is a single ``quantize_granularity`` for the whole graph,
while the space chooses per op; only ``per_channel`` is offered (it lowers to int8 for convolution
and dense ops alike, is at least as accurate as ``per_tensor`` and as fast on oneDNN). Channel-wise
oneDNN ops keep fp32 weights in the file and quantize them when first run, so a saved model is
not smaller than the fp32 one. Only CPU. No bf16 is offered (MXNet's AMP bf16 conversion is not
wired in) and no dynamic quantization: static only.

Measured: ``lower`` hybridizes the quantized graph with static memory and reads the int8 ops
from it (``_sg_mkldnn_conv`` / ``_sg_mkldnn_fully_connected`` with ``quantized`` set, or
``_contrib_quantized_*``); ``lower_fp32`` runs the fp32 graph with the same oneDNN fusion and
hybridization, for a fair latency comparison.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import tempfile
import warnings
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..evaluation import as_numpy
from ..errors import DataError, MissingFrameworkError, ModelError
from ..space import Op, OpCapability, OpScheme, TensorScheme, TuneConfig
from .base import Adaptor, Lowered, take_samples

SYMBOL_FILE = "model-symbol.json"
PARAMS_FILE = "model-0000.params"
INPUTS_FILE = "inputs.json"  # input names and per-sample shapes, in the fp32 payload only

QUANTIZABLE_OPS = ("Convolution", "FullyConnected")
WEIGHT = TensorScheme("int8", "sym", "per_channel", "minmax")
ACTIVATIONS = [TensorScheme("int8", "sym", "per_tensor", algorithm) for algorithm in ("minmax", "kl")]
HISTOGRAM_BINS = 8001  # MXNet's entropy calibration default
_INT8_NODE_OPS = ("_sg_mkldnn_conv", "_sg_mkldnn_fully_connected")


def import_mxnet() -> Any:
    """mxnet, with numpy's removed ``np.bool`` restored and its import noise silenced."""
    if "bool" not in np.__dict__:
        np.bool = bool  # MXNet 1.x still reads np.bool, which numpy 1.24 removed
    os.environ.setdefault("MXNET_SUBGRAPH_VERBOSE", "0")  # "Subgraph backend MKLDNN is activated" per bind
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mxnet
    except ImportError:
        raise MissingFrameworkError("mxnet", "mxnet") from None
    return mxnet


@dataclass(eq=False)  # compared by identity: caches are keyed on the object
class MXNetModel:
    """An fp32 symbol model: the exported graph, its parameters and its inputs' sample shapes."""

    symbol: Any
    arg_params: dict
    aux_params: dict
    input_shapes: dict = field(default_factory=dict)  # input name -> shape of one sample
    block: Any = field(default=None, repr=False)  # its SymbolBlock, built on first use

    @property
    def input_names(self) -> list[str]:
        return input_names(self.symbol, self.arg_params, self.aux_params)


@dataclass
class QuantizedModel:
    """A quantized symbol model and the SymbolBlock that runs it."""

    symbol: Any
    arg_params: dict
    aux_params: dict
    block: Any = None

    def __call__(self, *inputs: Any) -> Any:
        return self.block(*inputs)


class MXNetAdaptor(Adaptor):
    framework = "mxnet"
    model_file = SYMBOL_FILE

    _threads: Optional[int] = None  # MXNet has no getter for its OpenMP thread count

    def __init__(self) -> None:
        self.mx = import_mxnet()
        # Per fp32 model: {(tensor, "minmax" | "kl", sampling size): (low, high)}.
        self.calibration_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.fused_graphs: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # per fp32 model

    def set_threads(self, threads: int) -> int:
        previous = MXNetAdaptor._threads or int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1))
        MXNetAdaptor._threads = max(1, int(threads))
        self.mx.base._LIB.MXSetNumOMPThreads(ctypes.c_int(MXNetAdaptor._threads))
        return previous

    # --- driver side -------------------------------------------------------------------------
    def load_file(self, path: str) -> Any:
        """``prefix-symbol.json`` and its ``prefix-0000.params``, for tuning from a YAML alone."""
        file = Path(path)
        if not file.is_file():
            raise ModelError(f"model.path: {file}: file not found")
        if not file.name.endswith("-symbol.json"):
            raise ModelError(f"model.path: {file}: expected an MXNet 'prefix-symbol.json' file")
        params = file.with_name(file.name[: -len("-symbol.json")] + "-0000.params")
        if not params.is_file():
            raise ModelError(f"model.path: {file}: its parameters {params.name} are not beside it")
        try:
            return self.mx.model.load_checkpoint(str(file)[: -len("-symbol.json")], 0)
        except Exception as error:  # MXNetError, JSON errors...
            raise ModelError(f"model.path: {file}: not an MXNet checkpoint ({_first_line(error)})") from None

    def prepare(self, model: Any, example_inputs: Any) -> bytes:
        inputs = as_arrays(example_inputs)
        if isinstance(model, tuple) and len(model) == 3:
            symbol, arg_params, aux_params = model
            if not isinstance(symbol, self.mx.sym.Symbol):
                raise ModelError(f"model: expected (symbol, arg_params, aux_params), got a {type(symbol).__name__} symbol")
        elif isinstance(model, self.mx.gluon.HybridBlock):
            symbol, arg_params, aux_params = self._export(model, inputs)
        else:
            raise ModelError(f"model: expected a Gluon HybridBlock or (symbol, arg_params, aux_params) for framework "
                             f"'mxnet', got {type(model).__name__}")
        names = input_names(symbol, arg_params, aux_params)
        if len(names) != len(inputs):
            raise DataError(f"calibration loader: the model takes {len(names)} inputs ({', '.join(names)}), "
                            f"a batch gives {len(inputs)}")
        fp32 = MXNetModel(symbol, arg_params, aux_params, {n: list(a.shape[1:]) for n, a in zip(names, inputs, strict=True)})
        check_shapes(fp32, inputs)
        return pack(symbol, arg_params, aux_params, {INPUTS_FILE: json.dumps(fp32.input_shapes)})

    def _export(self, block: Any, inputs: list[np.ndarray]) -> tuple:
        """hybridize, one forward on the example batch, ``export``: the block as a symbol model."""
        mx = self.mx
        name = type(block).__name__
        check_block_input(block, inputs)
        try:
            block.hybridize()
            for output in _as_list(block(*[mx.nd.array(array) for array in inputs])):
                output.wait_to_read()
        except Exception as error:
            raise ModelError(f"model: {name} fails to run hybridized: {_first_line(error)}") from None
        with tempfile.TemporaryDirectory() as folder:
            try:
                block.export(os.path.join(folder, "model"), 0)
                return mx.model.load_checkpoint(os.path.join(folder, "model"), 0)
            except Exception as error:
                raise ModelError(f"model: {name} can't be exported as an MXNet symbol: {_first_line(error)}") from None

    # --- both sides --------------------------------------------------------------------------
    def load(self, payload: bytes) -> MXNetModel:
        symbol, arg_params, aux_params, extra = unpack(self.mx, payload)
        return MXNetModel(symbol, arg_params, aux_params, json.loads(extra.get(INPUTS_FILE, "{}")))

    def weights_digest(self, model: MXNetModel) -> str:
        digest = hashlib.sha256()
        for prefix, params in (("arg:", model.arg_params), ("aux:", model.aux_params)):
            for name, array in sorted(params.items()):
                digest.update((prefix + name).encode())
                digest.update(array.asnumpy().tobytes())
        return digest.hexdigest()[:16]

    def capabilities(self, model: MXNetModel) -> list[OpCapability]:
        output_shapes = self._output_shapes(model)
        schemes = tuple(OpScheme(WEIGHT, activation) for activation in ACTIVATIONS)
        capabilities = []
        for node in graph_nodes(model.symbol):
            if node["op"] in QUANTIZABLE_OPS:
                weight = _weight_of(node, model)
                shape = output_shapes.get(node["name"] + "_output")
                per_output = int(np.prod(weight.shape[1:])) if weight is not None else 0
                macs = int(np.prod(shape[1:])) * per_output if shape else 0
                op = Op(node["name"], node["op"], macs, 0 if weight is None else int(np.prod(weight.shape)))
                capabilities.append(OpCapability(op, schemes))
        return capabilities

    def _output_shapes(self, model: MXNetModel) -> dict[str, tuple]:
        """Every internal output's shape for a batch of one sample."""
        internals = model.symbol.get_internals()
        shapes = {name: (1, *shape) for name, shape in model.input_shapes.items()}
        if not shapes:
            return {}
        with contextlib.suppress(Exception):
            _, out_shapes, _ = internals.infer_shape_partial(**shapes)
            return dict(zip(internals.list_outputs(), out_shapes, strict=True))
        return {}

    def recipes(self, model: MXNetModel) -> tuple[str, ...]:
        """Equalization where the graph has a pair of Convolution / FullyConnected layers to
        equalize (a rewrite of their parameters before fusion and calibration)."""
        from . import mxnet_recipes

        return self.offers_equalization(
            lambda: mxnet_recipes.equalizable(json.loads(model.symbol.tojson()), model.arg_params))

    def rewritten(self, model: MXNetModel, config: TuneConfig) -> MXNetModel:
        """The fp32 model the config quantizes: equalized if it names equalization."""
        return self.equalized(model, config, self._equalize)

    def _equalize(self, model: MXNetModel) -> MXNetModel:
        from . import mxnet_recipes

        rewritten, _ = mxnet_recipes.equalize(json.loads(model.symbol.tojson()), model.arg_params)
        arg_params = {**model.arg_params, **{name: self.mx.nd.array(array) for name, array in rewritten.items()}}
        return MXNetModel(model.symbol, arg_params, model.aux_params, model.input_shapes)

    def quantize(self, model: MXNetModel, config: TuneConfig, calibration: Sequence[Any]) -> QuantizedModel:
        mx = self.mx
        model = self.rewritten(model, config)
        graph = self._fused(model)
        excluded = sorted({graph.fused_name[name] for name in config.fp32_ops})
        with _quiet():
            qsym, qargs, aux, collector = mx.contrib.quantization.quantize_graph(
                sym=graph.symbol, arg_params=model.arg_params, aux_params=model.aux_params,
                excluded_sym_names=excluded, calib_mode="naive", quantized_dtype="auto",
                quantize_granularity="channel-wise")
            algorithms = {tensor: graph.algorithm_of(tensor, config) for tensor in collector.include_layer}
            collector.min_max_dict = self._thresholds(model, graph, algorithms, calibration, config.sampling_size)
            qsym, qargs, aux = mx.contrib.quantization.calib_graph(
                qsym=qsym, arg_params=model.arg_params, aux_params=model.aux_params, collector=collector,
                calib_mode="naive", quantized_dtype="auto", logger=None)
            qsym = fit_sums_to_their_buffers(mx, qsym.get_backend_symbol("MKLDNN_QUANTIZE"), model.input_names)
        return QuantizedModel(qsym, qargs, aux, symbol_block(mx, qsym, qargs, aux))

    def _fused(self, model: MXNetModel) -> "FusedGraph":
        """The model's graph fused for oneDNN, built once per model."""
        if model not in self.fused_graphs:
            with _quiet():
                self.fused_graphs[model] = FusedGraph.build(model.symbol.get_backend_symbol("MKLDNN_QUANTIZE"))
        return self.fused_graphs[model]

    def _thresholds(self, model: MXNetModel, graph: "FusedGraph", algorithms: dict[str, str],
                    calibration: Sequence[Any], sampling_size: int) -> dict[str, tuple[float, float]]:
        """Each tensor's (low, high) by its algorithm, calibrating only what the cache lacks."""
        cache = self.calibration_cache.setdefault(model, {})
        missing = {tensor: algorithm for tensor, algorithm in algorithms.items()
                   if (tensor, algorithm, sampling_size) not in cache}
        if missing:
            statistics = self._collect(model, graph, sorted(missing), calibration, sampling_size, "kl" in missing.values())
            for tensor, (low, high, histogram) in statistics.items():
                cache[(tensor, "minmax", sampling_size)] = (low, high)
                if histogram is not None:
                    cache[(tensor, "kl", sampling_size)] = entropy_threshold(self.mx, tensor, low, histogram)
        return {tensor: cache[(tensor, algorithm, sampling_size)] for tensor, algorithm in algorithms.items()}

    def _collect(self, model: MXNetModel, graph: "FusedGraph", tensors: list[str], calibration: Sequence[Any],
                 sampling_size: int, histograms: bool) -> dict[str, tuple]:
        """Min, max and (for kl) a histogram of ``tensors`` over the first ``sampling_size`` samples."""
        mx = self.mx
        internals = graph.symbol.get_internals()
        block = symbol_block(mx, mx.sym.Group([internals[name] for name in tensors]), model.arg_params, model.aux_params,
                             model.input_names)
        low = dict.fromkeys(tensors, np.inf)
        high = dict.fromkeys(tensors, -np.inf)
        hist: dict[str, Any] = {}
        with self.calibrating():
            for inputs in take_samples(calibration, sampling_size):
                arrays = as_arrays(inputs)
                check_shapes(model, arrays)
                outputs = _as_list(block(*[mx.nd.array(array) for array in arrays]))
                self.calibration_passes += 1
                for name, output in zip(tensors, outputs, strict=True):
                    values = output.asnumpy()
                    batch_low, batch_high = float(values.min()), float(values.max())
                    low[name], high[name] = min(low[name], batch_low), max(high[name], batch_high)
                    if histograms:
                        hist[name] = _add_histogram(mx, hist.get(name), values, batch_low, batch_high)
        return {name: (low[name], high[name], hist.get(name)) for name in tensors}

    def inspect_tensors(self, model: MXNetModel, config: TuneConfig, calibration: Sequence[Any]) -> dict[str, float]:
        mx = self.mx
        graph = self._fused(model)
        names = model.input_names
        internals = graph.symbol.get_internals()
        source = self.rewritten(model, config)
        reference_block = symbol_block(mx, mx.sym.Group([internals[graph.fused_name[op] + "_output"] for op in config.int8_ops]),
                                       source.arg_params, source.aux_params, names)
        alone = {}
        for name in config.int8_ops:
            quantized = self.quantize(model, config.with_fallback(set(config.int8_ops) - {name}), calibration)
            alone[name] = op_output_block(mx, quantized, graph.fused_name[name], names)
        signal = dict.fromkeys(alone, 0.0)
        noise = dict.fromkeys(alone, 0.0)
        for inputs in take_samples(calibration, config.sampling_size):
            arrays = [mx.nd.array(array) for array in as_arrays(inputs)]
            references = _as_list(reference_block(*arrays))
            for (name, block), reference in zip(alone.items(), references, strict=True):
                expected = reference.asnumpy()
                output = _as_float(mx, block(*arrays))
                signal[name] += float((expected ** 2).mean())
                noise[name] += float(((output - expected) ** 2).mean())
        return {name: noise[name] / max(signal[name], 1e-12) for name in alone}

    def predict(self, model: Any, inputs: Any) -> np.ndarray:
        mx = self.mx
        block = model if isinstance(model, QuantizedModel) else self._fp32_block(model)
        output = _as_list(block(*[mx.nd.array(array) for array in as_arrays(inputs)]))[0]
        return output.asnumpy()

    def baseline_model(self, user_model: Any, loaded: Any) -> Any:
        """The exported graph: what the quantized models are derived from and run beside."""
        return loaded

    def _fp32_block(self, model: Any) -> Any:
        """The fp32 model's SymbolBlock, built once per model."""
        if not isinstance(model, MXNetModel):
            return model  # already a block: a lowered fp32 model
        if model.block is None:
            model.block = symbol_block(self.mx, model.symbol, model.arg_params, model.aux_params, model.input_names)
        return model.block

    def user_model(self, model: Any) -> Any:
        """A callable on numpy arrays or NDArrays, returning an NDArray."""
        predict_block = model.block if isinstance(model, QuantizedModel) else self._fp32_block(model)
        return UserModel(predict_block, self.mx)

    def lower(self, model: QuantizedModel, ops: Sequence[Op], config: TuneConfig, example_inputs: Any) -> Lowered:
        block = symbol_block(self.mx, model.symbol, model.arg_params, model.aux_params, static=True)
        block(*[self.mx.nd.array(array) for array in as_arrays(example_inputs)])
        int8 = set(int8_ops_of(model.symbol))
        int8_ops = tuple(name for name, _ in config.op_schemes if name in int8)
        fp32_ops = tuple(name for name, _ in config.op_schemes if name not in int8)
        return Lowered(QuantizedModel(model.symbol, model.arg_params, model.aux_params, block), int8_ops, fp32_ops)

    def lower_fp32(self, model: MXNetModel, example_inputs: Any) -> Any:
        with _quiet():
            fused = model.symbol.get_backend_symbol("MKLDNN")
        block = symbol_block(self.mx, fused, model.arg_params, model.aux_params,
                             model.input_names, static=True)
        block(*[self.mx.nd.array(array) for array in as_arrays(example_inputs)])
        return block

    def serialize(self, model: QuantizedModel, example_inputs: Any) -> bytes:
        return pack(model.symbol, model.arg_params, model.aux_params)

    def deserialize(self, payload: bytes) -> QuantizedModel:
        symbol, arg_params, aux_params, _ = unpack(self.mx, payload)
        return QuantizedModel(symbol, arg_params, aux_params, symbol_block(self.mx, symbol, arg_params, aux_params))

    def save_model(self, payload: bytes, folder: Path) -> None:
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            for name in (SYMBOL_FILE, PARAMS_FILE):
                (folder / name).write_bytes(archive.read(name))

    def read_model(self, folder: Path) -> bytes:
        missing = [name for name in (SYMBOL_FILE, PARAMS_FILE) if not (folder / name).is_file()]
        if missing:
            raise ModelError(f"{folder}: no {' or '.join(missing)} in this saved mxnet model")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for name in (SYMBOL_FILE, PARAMS_FILE):
                archive.writestr(name, (folder / name).read_bytes())
        return buffer.getvalue()


class UserModel:
    """What a user's eval_func calls: numpy arrays or NDArrays in, an NDArray out."""

    def __init__(self, block: Any, mx: Any):
        self.block, self.mx = block, mx

    def __call__(self, *inputs: Any) -> Any:
        arrays = [array if isinstance(array, self.mx.nd.NDArray) else self.mx.nd.array(np.asarray(array)) for array in inputs]
        return self.block(*arrays)


# --- the fused graph and what it tells about ops and tensors ---------------------------------
@dataclass
class FusedGraph:
    """The fp32 graph fused for oneDNN, where quantization happens, and its map to the layers."""

    symbol: Any
    fused_name: dict[str, str]  # layer (op) name -> the fused node that holds it
    producer: dict[str, list[str]]  # tensor name -> the layers of the node that outputs it
    consumers: dict[str, list[str]]  # tensor name -> the nodes that read it, in graph order
    node_outputs: dict[str, str]  # node name -> its output tensor

    @classmethod
    def build(cls, symbol: Any) -> "FusedGraph":
        nodes = json.loads(symbol.tojson())["nodes"]
        fused_name, producer, consumers, node_outputs = {}, {}, {}, {}
        for node in nodes:
            output = node["name"] if node["op"] == "null" else node["name"] + "_output"
            node_outputs[node["name"]] = output
            layers = [inner["name"] for graph in node.get("subgraphs", []) for inner in graph["nodes"]
                      if inner["op"] in QUANTIZABLE_OPS]
            if node["op"] in QUANTIZABLE_OPS:
                layers.append(node["name"])
            for layer in layers:
                fused_name[layer] = node["name"]
            producer[output] = layers
            for source, *_ in node.get("inputs", []):
                consumers.setdefault(node_outputs[nodes[source]["name"]], []).append(node["name"])
        return cls(symbol, fused_name, producer, consumers, node_outputs)

    def algorithm_of(self, tensor: str, config: TuneConfig) -> str:
        """The activation algorithm of the int8 op that produces ``tensor``, else of the first int8
        op reading it (through ops that are not quantizable, such as pooling)."""
        schemes = {name: scheme for name, scheme in config.op_schemes if not scheme.is_fp32}
        for layer in self.producer.get(tensor, []):
            if layer in schemes:
                return schemes[layer].activation.algorithm
        seen, frontier = set(), list(self.consumers.get(tensor, []))
        while frontier:
            node = frontier.pop(0)
            if node in seen:
                continue
            seen.add(node)
            output = self.node_outputs[node]
            for layer in self.producer.get(output, []):
                if layer in schemes:
                    return schemes[layer].activation.algorithm
            if not self.producer.get(output):
                frontier += self.consumers.get(output, [])
        return "minmax"


def graph_nodes(symbol: Any) -> list[dict]:
    return json.loads(symbol.tojson())["nodes"]


def fit_sums_to_their_buffers(mx: Any, symbol: Any, names: list[str]) -> Any:
    """The quantized graph with each int8 conv+sum whose sum operand is int8 but whose output is
    uint8 (a ReLU after the sum) given twice its calibrated output range.

    oneDNN adds the sum in place: the conv writes its output into the operand's buffer, which
    keeps the operand's int8 type, so a uint8 output saturates at 127, half its range (a residual
    block whose shortcut is a conv+BN without ReLU, as in ResNet v1's downsampling blocks). With
    the range doubled, the output's values fit in 0..127, which its consumers read as uint8 at the
    doubled range's scale: the resolution of a signed int8 tensor, and no clipping.
    """
    spec = json.loads(symbol.tojson())
    nodes = spec["nodes"]
    if not any(_is_quantized_sum(node) for node in nodes):
        return symbol
    types = _output_types(symbol, names)
    widened = [node for node in nodes if _sum_into_int8(node, nodes, types)]
    for node in widened:
        node["attrs"]["max_calib_range"] = repr(2 * float(node["attrs"]["max_calib_range"]))
    return mx.sym.load_json(json.dumps(spec)) if widened else symbol


def _is_quantized_sum(node: dict) -> bool:
    attrs = node.get("attrs") or {}
    return (node["op"] == "_sg_mkldnn_conv" and _true(attrs.get("quantized")) and _true(attrs.get("with_sum"))
            and "max_calib_range" in attrs)


def _sum_into_int8(node: dict, nodes: list[dict], types: dict[str, Any]) -> bool:
    """A quantized conv+sum writing a uint8 output into an int8 sum operand."""
    if not _is_quantized_sum(node):
        return False
    source, index, _ = node["inputs"][len(node["inputs"]) - 5]  # sum, then data and sum min/max
    return types.get((nodes[source]["name"], index)) == np.int8 and types.get((node["name"], 0)) == np.uint8


def _output_types(symbol: Any, names: list[str]) -> dict[tuple[str, int], Any]:
    """Every output's dtype, keyed by (node name, output index) as the graph's inputs refer to them."""
    internals = symbol.get_internals()
    with _quiet():
        _, types, _ = internals.infer_type(**dict.fromkeys(names, "float32"))
    spec = json.loads(internals.tojson())
    heads = [(spec["nodes"][node]["name"], index) for node, index, *_ in spec["heads"]]
    return dict(zip(heads, types, strict=True))


def _true(value: Any) -> bool:
    return str(value).lower() == "true"


def int8_ops_of(symbol: Any) -> list[str]:
    """The layers that run int8 in a quantized graph, read from its nodes."""
    int8 = []
    for node in graph_nodes(symbol):
        attrs = node.get("attrs") or {}
        quantized = node["op"] in _INT8_NODE_OPS and str(attrs.get("quantized", "")).lower() == "true"
        if quantized:
            int8 += [inner["name"] for graph in node.get("subgraphs", []) for inner in graph["nodes"]
                     if inner["op"] in QUANTIZABLE_OPS]
        elif node["op"] in ("_contrib_quantized_conv", "_contrib_quantized_fully_connected"):
            int8.append(node["name"].removeprefix("quantized_"))
    return int8


def input_names(symbol: Any, arg_params: dict, aux_params: dict) -> list[str]:
    return [name for name in symbol.list_arguments() if name not in arg_params and name not in aux_params]


def _weight_of(node: dict, model: MXNetModel) -> Any:
    """A layer's weight: its second input (``data, weight, bias``) in the graph."""
    nodes = graph_nodes(model.symbol)
    inputs = node.get("inputs", [])
    if len(inputs) < 2:
        return None
    return model.arg_params.get(nodes[inputs[1][0]]["name"])


# --- data ------------------------------------------------------------------------------------
def as_arrays(inputs: Any) -> list[np.ndarray]:
    """A batch's inputs as float32 numpy arrays (NDArrays and tensors too)."""
    items = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    return [np.ascontiguousarray(as_numpy(item), dtype=np.float32) for item in items]


def check_shapes(model: MXNetModel, arrays: list[np.ndarray]) -> None:
    """A DataError naming the shape given and the shape expected unless the batch fits."""
    names = model.input_names
    for name, array in zip(names, arrays, strict=False):
        expected_sample = model.input_shapes.get(name)
        if expected_sample is not None and list(array.shape[1:]) != list(expected_sample):
            raise DataError(f"calibration batch of shape {tuple(array.shape)} does not fit the model, which takes "
                            f"(batch, {', '.join(map(str, expected_sample))}) as input {name!r}")
    shapes = {name: array.shape for name, array in zip(names, arrays, strict=False)}
    params = {name: value.shape for name, value in {**model.arg_params, **model.aux_params}.items()}
    try:
        with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # MXNet prints every shape on failure
            model.symbol.infer_shape(**shapes, **params)
    except Exception as error:
        given = ", ".join(str(tuple(shape)) for shape in shapes.values())
        expected = _expected_shape(model, names)
        raise DataError(f"calibration batch of shape {given} does not fit the model, which takes {expected} "
                        f"({_first_line(error)})") from None


def check_block_input(block: Any, arrays: list[np.ndarray]) -> None:
    """Before the first hybridized call: a wrong-shaped batch is a DataError, not a model error."""
    import mxnet as mx

    try:
        with _quiet():
            symbol = block(*[mx.sym.var(f"data{i}" if len(arrays) > 1 else "data") for i in range(len(arrays))])
            symbol = _as_list(symbol)[0]
        params = {p.name: p.shape for p in block.collect_params().values() if p.shape and all(d > 0 for d in p.shape)}
        args = {name: shape for name, shape in params.items() if name in symbol.list_arguments()}
        aux = {name: shape for name, shape in params.items() if name in symbol.list_auxiliary_states()}
    except Exception:
        return  # the forward pass will say what is wrong
    model = MXNetModel(symbol, {k: _Shaped(v) for k, v in args.items()}, {k: _Shaped(v) for k, v in aux.items()})
    check_shapes(model, arrays)


@dataclass
class _Shaped:
    shape: tuple


def _expected_shape(model: MXNetModel, names: list[str]) -> str:
    """The input shape the first conv or dense layer reading an input implies, as a string."""
    nodes = graph_nodes(model.symbol)
    for node in nodes:
        inputs = node.get("inputs", [])
        if node["op"] not in QUANTIZABLE_OPS or len(inputs) < 2 or nodes[inputs[0][0]]["name"] not in names:
            continue
        weight = model.arg_params.get(nodes[inputs[1][0]]["name"])
        if weight is None:
            break
        attrs = node.get("attrs") or {}
        if node["op"] == "Convolution":
            channels = weight.shape[1] * int(attrs.get("num_group", 1))
            return f"(batch, {channels}, ...)"
        return f"(batch, ...) with {weight.shape[1]} features per sample"
    return "another shape"


# --- calibration -----------------------------------------------------------------------------
def _add_histogram(mx: Any, histogram: Optional[tuple], values: np.ndarray, low: float, high: float) -> tuple:
    """MXNet's entropy-calibration histogram of a tensor, grown batch by batch."""
    threshold = max(abs(low), abs(high))
    if histogram is None:
        counts, edges = np.histogram(values, bins=HISTOGRAM_BINS, range=(-threshold, threshold))
        return counts, edges, low, high, threshold
    return mx.contrib.quantization.combine_histogram(histogram, values, low, high, threshold)


def entropy_threshold(mx: Any, tensor: str, low: float, histogram: tuple) -> tuple[float, float]:
    """The KL-divergence-minimising (low, high) of a histogram, as MXNet's entropy mode computes."""
    thresholds = mx.contrib.quantization._get_optimal_thresholds({tensor: histogram}, "auto")
    found_low, found_high = thresholds[tensor]
    return float(found_low), float(found_high)


# --- running graphs --------------------------------------------------------------------------
def symbol_block(mx: Any, symbol: Any, arg_params: dict, aux_params: dict, names: Optional[list[str]] = None,
                 static: bool = False) -> Any:
    """A hybridized SymbolBlock of ``symbol`` with its parameters loaded (int8 ones stay int8);
    ``static`` allocates its memory once, for measured runs."""
    names = names or input_names(symbol, arg_params, aux_params)
    with _quiet():
        block = mx.gluon.SymbolBlock(symbol, [mx.sym.var(name) for name in names])
    block.collect_params().load_dict(_params_dict(arg_params, aux_params), ctx=mx.cpu(), cast_dtype=True,
                                     dtype_source="saved", allow_missing=False, ignore_extra=True)
    # Static memory, but not static shapes: with ``static_shape`` a graph whose conv adds a residual
    # sum in place fails on its second call (the sum's buffer is left in oneDNN's layout).
    block.hybridize(static_alloc=static)
    return block


def op_output_block(mx: Any, model: QuantizedModel, fused: str, names: list[str]) -> Any:
    """A block giving one quantized op's output (int8 with its range, or float)."""
    internals = model.symbol.get_internals()
    outputs = internals.list_outputs()
    for prefix in (f"quantized_{fused}_output", f"{fused}_output"):
        selected = [i for i, name in enumerate(outputs) if name in (prefix, prefix + "_min", prefix + "_max")]
        if selected:
            return symbol_block(mx, mx.sym.Group([internals[i] for i in selected]), model.arg_params, model.aux_params, names)
    raise ModelError(f"quantized graph has no output of {fused}")


def _as_float(mx: Any, outputs: Any) -> np.ndarray:
    outputs = _as_list(outputs)
    if len(outputs) == 3 and outputs[0].dtype in (np.int8, np.uint8):
        return mx.nd.contrib.dequantize(*outputs, out_type="float32").asnumpy()
    return outputs[0].asnumpy()


def _as_list(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _params_dict(arg_params: dict, aux_params: dict) -> dict:
    return {**{f"arg:{k}": v for k, v in arg_params.items()}, **{f"aux:{k}": v for k, v in aux_params.items()}}


# --- bytes -----------------------------------------------------------------------------------
def pack(symbol: Any, arg_params: dict, aux_params: dict, extra: Optional[dict[str, str]] = None) -> bytes:
    """MXNet's own checkpoint files (symbol JSON and params) in a zip."""
    import mxnet as mx

    with tempfile.TemporaryDirectory() as folder:
        params = os.path.join(folder, PARAMS_FILE)
        mx.nd.save(params, _params_dict(arg_params, aux_params))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr(SYMBOL_FILE, symbol.tojson())
            archive.write(params, PARAMS_FILE)
            for name, text in (extra or {}).items():
                archive.writestr(name, text)
    return buffer.getvalue()


def unpack(mx: Any, payload: bytes) -> tuple[Any, dict, dict, dict[str, str]]:
    """The inverse of ``pack``: (symbol, arg_params, aux_params, other files)."""
    with zipfile.ZipFile(io.BytesIO(payload)) as archive, tempfile.TemporaryDirectory() as folder:
        archive.extractall(folder)
        symbol, arg_params, aux_params = mx.model.load_checkpoint(os.path.join(folder, "model"), 0)
        extra = {name: archive.read(name).decode() for name in archive.namelist() if name not in (SYMBOL_FILE, PARAMS_FILE)}
    return symbol, arg_params, aux_params, extra


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """MXNet warns that it can't decide the type of a SymbolBlock's inputs: noise here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = next((line for line in lines if "Check failed" in line or "Error" in line), lines[0] if lines else "")
    return message[:300] or type(error).__name__
