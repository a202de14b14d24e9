"""ONNX Runtime: real int8 through onnxruntime.quantization, run by ONNX Runtime's CPU kernels.

The driver serialises the user's ``onnx.ModelProto`` (or ``.onnx`` file) once; workers receive its
bytes. A static trial calls ``quantize_static`` in QOperator format, so the quantized graph itself
holds the integer kernels (QLinearConv, QLinearMatMul, QGemm; the QDQ format lowers to the same
kernels on CPU once ONNX Runtime fuses it, but only inside the session), calibrated by a
``CalibrationDataReader`` over the first ``sampling_size`` calibration samples. A dynamic trial
calls ``quantize_dynamic``: ConvInteger and MatMulInteger (a Gemm becomes a MatMul and an Add
first) with their inputs quantized per batch by DynamicQuantizeLinear. In both, the config's int8
ops are ``nodes_to_quantize`` and its fp32 ops ``nodes_to_exclude``, so nothing the space does not
know of is quantized.

What the space offers, and why:
- the Conv, MatMul and Gemm nodes whose second input is a weight (an initializer); a MatMul of two
  activations is left fp32, as nothing of it is stored int8;
- weights int8, symmetric, per channel: the quantizer takes ``per_channel``, the activation type
  and the calibration method for the whole model, never per node, so only one scheme can be a
  per-op choice; per channel keeps accuracy best;
- activations uint8, asymmetric, per tensor: min/max calibrated (static) or computed per batch
  (dynamic, where DynamicQuantizeLinear makes uint8 only).

Ops are node names (unnamed nodes are named ``<op type>_<index>`` in ``prepare``); the int8 op
list is read back from the quantized graph: an op runs int8 when a node of an integer kernel type
took its place (``<name>_quant``, or ``<name>_MatMul_quant`` for a dynamic Gemm).
"""

from __future__ import annotations

import collections.abc
import contextlib
import hashlib
import logging
import os
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..config import Approach
from ..errors import DataError, MissingFrameworkError, ModelError
from ..recipes import SMOOTH_QUANT, alpha_of, name_of
from ..space import Op, OpCapability, OpScheme, TensorScheme, TuneConfig
from .base import Adaptor, Lowered, take_samples

QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")
WEIGHT = TensorScheme("int8", "sym", "per_channel", "minmax")
STATIC = OpScheme(WEIGHT, TensorScheme("uint8", "asym", "per_tensor", "minmax"))
DYNAMIC = OpScheme(WEIGHT, TensorScheme("uint8", "asym", "per_tensor", "dynamic"))
INTEGER_KERNELS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger"})
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
               "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
               "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}


def import_onnxruntime() -> tuple[Any, Any]:
    """onnx and onnxruntime, with a one-line error when they are missing."""
    try:
        import onnx
        import onnxruntime
        from onnxruntime import quantization  # noqa: F401  (checked here, used below)
    except ImportError:
        raise MissingFrameworkError("onnxrt", "onnxrt") from None
    return onnx, onnxruntime


@dataclass(eq=False)
class OnnxModel:
    """An ONNX model's bytes, callable on numpy batches; its InferenceSession is built lazily,
    once per thread count, on ONNX Runtime's CPU provider."""

    content: bytes = field(repr=False)
    threads: int = 1
    _sessions: dict = field(default_factory=dict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    @property
    def session(self) -> Any:
        with self._lock:
            if self.threads not in self._sessions:
                self._sessions[self.threads] = _session(self.content, self.threads)
            return self._sessions[self.threads]

    def __call__(self, *inputs: Any) -> np.ndarray:
        """The first output for one batch (positional inputs in graph order, or one mapping)."""
        batch = inputs[0] if len(inputs) == 1 else inputs
        return self.session.run([self.session.get_outputs()[0].name], self.feed(batch))[0]

    def outputs(self, batch: Any) -> list[np.ndarray]:
        """Every output for one batch, in graph order."""
        return self.session.run(None, self.feed(batch))

    def feed(self, batch: Any, source: str = "batch") -> dict[str, np.ndarray]:
        """A batch as the session's input mapping, each array in the input's declared type."""
        inputs = self.session.get_inputs()
        if isinstance(batch, collections.abc.Mapping):
            given = {str(name): value for name, value in batch.items()}
            missing = [detail.name for detail in inputs if detail.name not in given]
            if missing:
                raise DataError(f"{source}: the model's input(s) {', '.join(missing)} are not in the batch "
                                f"(its keys: {', '.join(given)})")
            arrays = [given[detail.name] for detail in inputs]
        else:
            arrays = list(batch) if isinstance(batch, (tuple, list)) else [batch]
            if len(arrays) != len(inputs):
                raise DataError(f"{source}: the model takes {len(inputs)} input(s), the batch has {len(arrays)}")
        return {detail.name: _as_array(array, detail, source) for detail, array in zip(inputs, arrays, strict=True)}

    def __getstate__(self) -> dict:  # sessions and locks don't pickle
        return {"content": self.content, "threads": self.threads}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def _session(content: bytes, threads: int) -> Any:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about optimisations not applied: noise per session
    try:
        return onnxruntime.InferenceSession(content, options, providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ModelError(f"model: ONNX Runtime can't load it: {_first_line(error)}") from None


def _as_array(value: Any, detail: Any, source: str) -> np.ndarray:
    """``value`` as numpy in the input's type; a shape the model can't take is named."""
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    array = np.ascontiguousarray(array, dtype=NUMPY_TYPES.get(detail.type, array.dtype))
    expected = tuple(detail.shape)
    if len(expected) != array.ndim or any(isinstance(e, int) and e != s for e, s in zip(expected, array.shape, strict=True)):
        shown = tuple(e if isinstance(e, int) else "batch" if i == 0 else str(e) for i, e in enumerate(expected))
        raise DataError(f"{source}: input {detail.name!r} has shape {array.shape}; the model expects {shown}")
    return array


class OnnxRuntimeAdaptor(Adaptor):
    framework = "onnxrt"
    model_file = "model.onnx"
    approaches = (Approach.STATIC, Approach.DYNAMIC)

    def __init__(self) -> None:
        self.onnx, self.ort = import_onnxruntime()
        self.threads = 1
        # Per fp32 model (equalized or not): SmoothQuant's activation ranges by sampling size,
        # and the smoothed model by (alpha, sampling size).
        self.smoothed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set_threads(self, threads: int) -> int:
        previous, self.threads = self.threads, max(1, int(threads))
        return previous

    # --- driver side -------------------------------------------------------------------------
    def load_file(self, path: str) -> Any:
        """A ``.onnx`` file named by ``model.path``."""
        location = Path(path)
        if not location.is_file():
            raise ModelError(f"model.path: {location}: file not found")
        if location.suffix != ".onnx":
            raise ModelError(f"model.path: {location}: expected a .onnx file")
        return str(location)

    def prepare(self, model: Any, example_inputs: Any) -> bytes:
        proto = self._proto(model)
        _name_nodes(proto)
        content = proto.SerializeToString()
        OnnxModel(content)(example_inputs)  # a batch that does not fit fails here, naming the shapes
        return content

    def _proto(self, model: Any) -> Any:
        onnx = self.onnx
        if isinstance(model, (str, os.PathLike)):
            location = Path(model)
            if not location.is_file():
                raise ModelError(f"model: {location}: not an .onnx file")
            try:
                return onnx.load(str(location))
            except Exception as error:
                raise ModelError(f"model: {location}: not a readable ONNX model ({_first_line(error)})") from None
        if isinstance(model, bytes):
            return onnx.load_from_string(model)
        if not isinstance(model, onnx.ModelProto):
            raise ModelError(f"model: expected an onnx.ModelProto or a .onnx file for framework 'onnxrt', "
                             f"got {type(model).__name__}")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy

    # --- both sides --------------------------------------------------------------------------
    def load(self, payload: bytes) -> OnnxModel:
        return OnnxModel(payload, self.threads)

    def weights_digest(self, model: OnnxModel) -> str:
        return hashlib.sha256(model.content).hexdigest()[:16]

    def capabilities(self, model: OnnxModel) -> list[OpCapability]:
        scheme = DYNAMIC if self.approach == Approach.DYNAMIC else STATIC
        return [OpCapability(op, (scheme,)) for op in self.ops(model)]

    def ops(self, model: OnnxModel) -> list[Op]:
        """The Conv, MatMul and Gemm nodes with a weight, in graph order, with their MACs."""
        onnx = self.onnx
        proto = onnx.shape_inference.infer_shapes(onnx.load_from_string(model.content))
        weights = {tensor.name: tuple(tensor.dims) for tensor in proto.graph.initializer}
        shapes = {info.name: _dims(info) for info in [*proto.graph.value_info, *proto.graph.output]}
        found = []
        for node in proto.graph.node:
            if node.op_type in QUANTIZABLE_OPS and len(node.input) > 1 and node.input[1] in weights:
                weight = weights[node.input[1]]
                found.append(Op(node.name, node.op_type, _macs(node.op_type, weight, shapes.get(node.output[0])),
                                int(np.prod(weight))))
        return found

    def recipes(self, model: OnnxModel) -> tuple[str, ...]:
        """Equalization where the graph has a pair of Conv/Gemm nodes to equalize, SmoothQuant
        where it has MatMul/Gemm nodes with weights (rewrites before ONNX Runtime's quantizer)."""
        from . import onnxrt_recipes

        proto = self.onnx.load_from_string(model.content)
        offered = self.offers_equalization(lambda: onnxrt_recipes.equalizable(proto))
        return offered + ((SMOOTH_QUANT,) if onnxrt_recipes.smoothing_groups(proto) else ())

    def rewritten(self, model: OnnxModel, config: TuneConfig, calibration: Sequence[Any]) -> OnnxModel:
        """The fp32 model the config quantizes: equalized, then smoothed with SmoothQuant's
        alpha, as its recipes say; each rewrite computed once per model (and sampling size)."""
        from . import onnxrt_recipes

        source = self.equalized(model, config, self._equalize)
        alpha = next((alpha_of(recipe) for recipe in config.recipes if name_of(recipe) == SMOOTH_QUANT), None)
        if alpha is None:
            return source
        cache = self.smoothed.setdefault(source, {})
        if (alpha, config.sampling_size) not in cache:
            if config.sampling_size not in cache:  # the activation ranges, shared by every alpha
                cache[config.sampling_size] = self._channel_max(source, take_samples(calibration, config.sampling_size))
            proto = self.onnx.load_from_string(source.content)
            onnxrt_recipes.smooth(proto, onnxrt_recipes.smoothing_scales(proto, alpha, cache[config.sampling_size]))
            cache[(alpha, config.sampling_size)] = OnnxModel(proto.SerializeToString(), self.threads)
        return cache[(alpha, config.sampling_size)]

    def _channel_max(self, model: OnnxModel, batches: Sequence[Any]) -> dict[str, np.ndarray]:
        """max |x| per last-axis channel of each SmoothQuant group's input over ``batches``."""
        from . import onnxrt_recipes

        proto = self.onnx.load_from_string(model.content)
        groups = list(onnxrt_recipes.smoothing_groups(proto))
        inputs = {value.name for value in proto.graph.input}
        watched = [name for name in groups if name not in inputs]  # made outputs; the model's inputs are fed
        known = {value.name for value in proto.graph.output}
        proto.graph.output.extend(self.onnx.helper.make_tensor_value_info(name, self.onnx.TensorProto.FLOAT, None)
                                  for name in watched if name not in known)
        session = OnnxModel(proto.SerializeToString(), self.threads).session
        channel_max: dict[str, np.ndarray] = {}
        with self.calibrating():
            for batch in batches:
                feed = model.feed(batch, "q_dataloader")
                values = {**feed, **dict(zip(watched, session.run(watched, feed), strict=True))}
                for name in groups:
                    value = np.abs(np.asarray(values[name], dtype=np.float64))
                    peak = value.reshape(-1, value.shape[-1]).max(axis=0)
                    channel_max[name] = np.maximum(channel_max[name], peak) if name in channel_max else peak
        self.calibration_passes += 1
        return channel_max

    def _equalize(self, model: OnnxModel) -> OnnxModel:
        from . import onnxrt_recipes

        proto = self.onnx.load_from_string(model.content)
        onnxrt_recipes.equalize(proto)
        return OnnxModel(proto.SerializeToString(), self.threads)

    def quantize(self, model: OnnxModel, config: TuneConfig, calibration: Sequence[Any]) -> OnnxModel:
        if not config.int8_ops:
            return model
        source = self.rewritten(model, config, calibration)
        if self.approach == Approach.DYNAMIC:
            return self._quantized(source, config, None)
        with self.calibrating():
            reader = self._reader(source, take_samples(calibration, config.sampling_size))
            quantized = self._quantized(source, config, reader)
        self.calibration_passes += 1
        return quantized

    def _quantized(self, model: OnnxModel, config: TuneConfig, reader: Any) -> OnnxModel:
        """``quantize_static`` with ``reader`` (``quantize_dynamic`` without one) on a fresh copy of
        the (rewritten) fp32 model: the quantizer edits the proto it is given."""
        from onnxruntime import quantization as q

        gemms = {op.name for op in self.ops(model) if op.op_type == "Gemm"}
        int8 = _with_gemm_names(config.int8_ops, gemms)  # quantize_dynamic turns a Gemm into <name>_MatMul
        fp32 = _with_gemm_names(config.fp32_ops, gemms)
        common = dict(op_types_to_quantize=list(QUANTIZABLE_OPS), per_channel=True, weight_type=q.QuantType.QInt8,
                      nodes_to_quantize=int8, nodes_to_exclude=fp32)
        with tempfile.TemporaryDirectory(prefix="lpot_ray_onnx_") as folder, _quantizer_hints_silenced():
            output = Path(folder) / "quantized.onnx"
            source = self.onnx.load_from_string(model.content)
            if reader is None:
                q.quantize_dynamic(source, output, **common)
            else:
                q.quantize_static(source, output, reader, quant_format=q.QuantFormat.QOperator,
                                  activation_type=q.QuantType.QUInt8, calibrate_method=q.CalibrationMethod.MinMax,
                                  **common)
            return OnnxModel(output.read_bytes(), self.threads)

    def _reader(self, model: OnnxModel, batches: Sequence[Any]) -> Any:
        """A CalibrationDataReader over ``batches``, checked against the model's inputs first."""
        from onnxruntime.quantization import CalibrationDataReader

        feeds = [model.feed(batch, "q_dataloader") for batch in batches]

        class Batches(CalibrationDataReader):
            def __init__(self) -> None:
                self.remaining = iter(feeds)

            def get_next(self) -> dict | None:
                return next(self.remaining, None)

            def rewind(self) -> None:
                self.remaining = iter(feeds)

        return Batches()

    def baseline_model(self, user_model: Any, loaded: OnnxModel) -> OnnxModel:
        """The fp32 model in ONNX Runtime: int8 and fp32 are compared in the same runtime."""
        return loaded

    def predict(self, model: OnnxModel, inputs: Any) -> np.ndarray:
        model.threads = self.threads
        return model(inputs)

    def predict_outputs(self, model: OnnxModel, inputs: Any) -> list:
        model.threads = self.threads
        return model.outputs(inputs)

    def lower(self, model: OnnxModel, ops: Sequence[Op], config: TuneConfig, example_inputs: Any) -> Lowered:
        """The quantized graph already holds ONNX Runtime's integer kernels; read which ops got
        them, and build the session."""
        int8 = int8_nodes(self.onnx.load_from_string(model.content))
        int8_ops = tuple(name for name, _ in config.op_schemes if name in int8)
        fp32_ops = tuple(name for name, _ in config.op_schemes if name not in int8)
        model.threads = self.threads
        model.session  # noqa: B018  (built now, so that the latency measured is the kernels' only)
        return Lowered(model, int8_ops, fp32_ops)

    def lower_fp32(self, model: OnnxModel, example_inputs: Any) -> OnnxModel:
        model.threads = self.threads
        model.session  # noqa: B018
        return model

    def serialize(self, model: OnnxModel, example_inputs: Any) -> bytes:
        return model.content  # a plain .onnx file

    def deserialize(self, payload: bytes) -> OnnxModel:
        return OnnxModel(payload, self.threads)


def int8_nodes(proto: Any) -> set[str]:
    """The original node names an integer kernel took the place of in a quantized graph."""
    names = set()
    for node in proto.graph.node:
        if node.op_type in INTEGER_KERNELS and node.name.endswith("_quant"):
            name = node.name.removesuffix("_quant")
            names.add(name.removesuffix("_MatMul") if node.op_type == "MatMulInteger" else name)
            names.add(name)
    return names


def _with_gemm_names(names: Sequence[str], gemms: set[str]) -> list[str]:
    return [*names, *(f"{name}_MatMul" for name in names if name in gemms)]


def _name_nodes(proto: Any) -> None:
    """Give unnamed nodes a name (``<op type>_<index>``): ops are known by node name."""
    taken = {node.name for node in proto.graph.node}
    for index, node in enumerate(proto.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _dims(info: Any) -> tuple:
    return tuple(dim.dim_value if dim.HasField("dim_value") else None for dim in info.type.tensor_type.shape.dim)


def _macs(op_type: str, weight: tuple, output: tuple | None) -> int:
    """Multiply-accumulates per sample: the weight's elements times the output positions that
    reuse them (a Conv's spatial positions, a MatMul's rows past the batch); 1 where unknown."""
    positions = 1
    if output and op_type == "Conv":
        positions = int(np.prod([dim or 1 for dim in output[2:]]))
    elif output and op_type == "MatMul":
        positions = int(np.prod([dim or 1 for dim in output[1:-1]]))
    return int(np.prod(weight)) * positions


class _HintFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextlib.contextmanager
def _quantizer_hints_silenced() -> Iterator[None]:
    """Hide the quantizer's advice to pre-process the model, logged on the root logger each call."""
    hint = _HintFilter()
    root = logging.getLogger()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
