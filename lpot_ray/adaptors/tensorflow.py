"""TensorFlow: real int8 through the TFLite converter's quantizer, run by the LiteRT interpreter.

The driver converts the user's Keras model or SavedModel once to a float TFLite flatbuffer, and
that flatbuffer is what workers receive: they need no Keras and no SavedModel. A trial calibrates
the flatbuffer on the calibration batches (the converter's own calibrator, which records each
tensor's min/max; cached per sampling size, so a fallback trial does not calibrate again) and
quantizes the calibrated model with ``mlir_quantize``, the call behind the converter's
``QuantizationDebugger.get_nondebug_quantized_model``: the config's fp32 ops are its
``denylisted_nodes`` (their output tensors). The converter is not restricted to
``TFLITE_BUILTINS_INT8``, so inputs and outputs stay float and a denylisted op runs in float between
a dequantize and a quantize. A trial's conversion takes milliseconds.

What the space offers, and why:
- weights int8, symmetric, per channel: the converter sets weight granularity for the whole model
  (``disable_per_channel``), never per op, so only its per-channel default can be a per-op choice;
- activations int8, asymmetric, per tensor, min/max: the only statistics its calibrator records.

Dynamic range quantization (``post_training_dynamic_quant``): the converter with
``Optimize.DEFAULT`` and no representative dataset stores int8 weights (per channel, for
convolutions and dense layers alike) and LiteRT runs those ops with hybrid kernels that quantize
their float inputs per batch at run time (dense layers asymmetrically, as the converter sets
``asymmetric_quantize_inputs``; convolutions symmetrically). The converter has no per-op denylist
for it, so the driver converts a second time, to the dynamic-range flatbuffer, which travels
beside the float one; a trial's fallback ops get their float weights back by editing that
flatbuffer (``flatbuffer_utils``: the weight tensor becomes FLOAT32 with the float model's buffer
for the same tensor name and no quantization), and LiteRT then picks the float kernel for them.
Only ops whose weights the converter quantizes are offered (it leaves weights under 1024
elements float).

bf16 is not offered: TFLite's float kernels run fp32 (XNNPACK's fp16 path is for ARM), and the
converter's bf16 support is not a per-op choice LiteRT runs on x86.

Ops are Keras layer names (a SavedModel's ops are named by their weights' path); the int8 op list
is read back from the quantized flatbuffer (an op runs int8 when its input or, for a hybrid op,
its weight tensor is int8). On a
CPU without AVX-512 VNNI, LiteRT's XNNPACK int8 kernels are not always faster than its float ones:
the latency measured for the chosen config is reported as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import re
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..config import Approach
from ..errors import DataError, MissingFrameworkError, ModelError
from ..space import Op, OpCapability, OpScheme, TensorScheme, TuneConfig
from .base import Adaptor, Lowered, take_samples

# TFLite builtin op -> the Keras layer type users know it by.
QUANTIZABLE_OPS = {"CONV_2D": "Conv2D", "DEPTHWISE_CONV_2D": "DepthwiseConv2D", "FULLY_CONNECTED": "Dense"}
SCHEME = OpScheme(TensorScheme("int8", "sym", "per_channel", "minmax"), TensorScheme("int8", "asym", "per_tensor", "minmax"))
# Dynamic range quantization: int8 per-channel weights, inputs quantized per batch by the hybrid kernel.
DYNAMIC_WEIGHT = TensorScheme("int8", "sym", "per_channel", "minmax")
DYNAMIC = {
    "CONV_2D": OpScheme(DYNAMIC_WEIGHT, TensorScheme("int8", "sym", "per_tensor", "dynamic")),
    "DEPTHWISE_CONV_2D": OpScheme(DYNAMIC_WEIGHT, TensorScheme("int8", "sym", "per_tensor", "dynamic")),
    "FULLY_CONNECTED": OpScheme(DYNAMIC_WEIGHT, TensorScheme("int8", "asym", "per_tensor", "dynamic")),
}


def import_tensorflow():
    """tensorflow, with its C++ start-up logging quietened; a one-line error when it is missing."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        with _native_stderr_silenced():  # which CPU instructions this build does not use, and more
            import tensorflow as tf
        from ai_edge_litert.interpreter import Interpreter  # noqa: F401  (checked here, used below)
    except ImportError:
        raise MissingFrameworkError("tensorflow", "tensorflow") from None
    return tf


def _interpreter(content: bytes, threads: int = 1, input_shapes: Sequence[tuple] = (),
                 preserve_all_tensors: bool = False) -> Any:
    """A LiteRT interpreter, allocated for ``input_shapes`` when they are given."""
    from ai_edge_litert.interpreter import Interpreter

    with _native_stderr_silenced(), warnings.catch_warnings():  # "Created ... XNNPACK delegate"; "for debugging"
        warnings.simplefilter("ignore")
        interpreter = Interpreter(model_content=content, num_threads=threads,
                                  experimental_preserve_all_tensors=preserve_all_tensors)
        if input_shapes:
            for detail, shape in zip(interpreter.get_input_details(), input_shapes, strict=True):
                interpreter.resize_tensor_input(detail["index"], shape)
            interpreter.allocate_tensors()
    return interpreter


_stderr_lock = threading.Lock()


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Hide what TFLite's C++ code prints on stderr for every conversion and interpreter."""
    with _stderr_lock:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr to silence
            yield
            return
        try:
            with open(os.devnull, "wb") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@dataclass(frozen=True)
class GraphOp:
    """One quantizable op of a flatbuffer: where its tensors are and what it computes."""

    name: str  # the Keras layer (or weight path) it came from
    builtin: str
    input_index: int
    weight_index: int
    output_index: int
    weight_name: str
    output_name: str


@dataclass(eq=False)
class TFLiteModel:
    """A TFLite flatbuffer, callable on numpy batches like the model it came from.

    ``op_names`` maps each quantizable op's weight tensor to its Keras layer name, so that ops keep
    their names through quantization. Interpreters are built lazily, one per input shape.
    """

    content: bytes = field(repr=False)
    op_names: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    dynamic: bytes = field(default=b"", repr=False)  # the dynamic-range flatbuffer, for that approach
    _interpreters: dict = field(default_factory=dict, repr=False)
    _lock: Any = field(default_factory=threading.Lock, repr=False)

    def __call__(self, *inputs: Any) -> np.ndarray:
        """The first output for one batch (inputs: numpy arrays or tensors, in input order)."""
        arrays = [np.ascontiguousarray(np.asarray(array, dtype=np.float32)) for array in inputs]
        with self._lock:
            interpreter = self._interpreter_for(tuple(array.shape for array in arrays))
            for detail, array in zip(interpreter.get_input_details(), arrays, strict=True):
                interpreter.set_tensor(detail["index"], array)
            interpreter.invoke()
            return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()

    def _interpreter_for(self, shapes: tuple) -> Any:
        key = (shapes, self.threads)
        if key not in self._interpreters:
            self.check_input_shapes(shapes)
            self._interpreters[key] = _interpreter(self.content, self.threads, shapes)
        return self._interpreters[key]

    def check_input_shapes(self, shapes: tuple, source: str = "batch") -> None:
        """A batch the model can't take is a DataError naming the shapes given and expected."""
        details = _interpreter(self.content).get_input_details()
        if len(details) != len(shapes):
            raise DataError(f"{source}: the model takes {len(details)} input(s), the batch has {len(shapes)}")
        for detail, shape in zip(details, shapes, strict=True):
            expected = tuple(int(dim) for dim in detail["shape_signature"])
            if len(expected) != len(shape) or any(e not in (-1, s) for e, s in zip(expected, shape, strict=True)):
                raise DataError(f"{source}: input {detail['name']!r} has shape {shape}; the model expects "
                                f"{tuple('batch' if e == -1 else e for e in expected)}")

    def ops(self) -> list[GraphOp]:
        """The quantizable ops, in execution order."""
        interpreter = _interpreter(self.content)
        tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
        found = []
        for op in interpreter._get_ops_details():  # the only way LiteRT lists ops
            if op["op_name"] not in QUANTIZABLE_OPS:
                continue
            data, weight, output = int(op["inputs"][0]), int(op["inputs"][1]), int(op["outputs"][0])
            weight_name = tensors[weight]["name"]
            found.append(GraphOp(self.op_names.get(weight_name, _weight_path(weight_name)), op["op_name"],
                                 data, weight, output, weight_name, tensors[output]["name"]))
        return found

    def tensor_details(self) -> dict[int, dict]:
        return {detail["index"]: detail for detail in _interpreter(self.content).get_tensor_details()}

    def __getstate__(self) -> dict:  # interpreters and locks don't pickle
        return {"content": self.content, "op_names": self.op_names, "threads": self.threads, "dynamic": self.dynamic}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


class TensorFlowAdaptor(Adaptor):
    framework = "tensorflow"
    model_file = "model.tflite"
    approaches = (Approach.STATIC, Approach.DYNAMIC)

    def __init__(self) -> None:
        self.tf = import_tensorflow()
        self.threads = 1
        # Per fp32 model: calibrated flatbuffers keyed by sampling size.
        self.calibration_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set_threads(self, threads: int) -> int:
        previous, self.threads = self.threads, max(1, int(threads))
        return previous

    # --- driver side -------------------------------------------------------------------------
    def load_file(self, path: str) -> Any:
        """A ``.keras`` file or a SavedModel directory named by ``model.path``."""
        location = Path(path)
        if not location.exists():
            raise ModelError(f"model.path: {location}: file or directory not found")
        if location.is_dir() or location.suffix == ".keras":
            return str(location)
        raise ModelError(f"model.path: {location}: expected a .keras file or a SavedModel directory")

    def prepare(self, model: Any, example_inputs: Any) -> bytes:
        content, layer_names = self._convert(model)
        fp32 = TFLiteModel(content, _op_names(content, layer_names))
        fp32(*_as_inputs(example_inputs))  # a batch that does not fit fails here, naming the shapes
        if self.approach == Approach.DYNAMIC:
            fp32.dynamic, _ = self._convert(model, dynamic_range=True)
        return pickle.dumps(fp32)

    def _convert(self, model: Any, dynamic_range: bool = False) -> tuple[bytes, set[str]]:
        """The float (or dynamic-range quantized) flatbuffer and the Keras layer names."""
        converter, layer_names = self._converter(model)
        if dynamic_range:  # no representative dataset: int8 weights, float activations
            converter.optimizations = [self.tf.lite.Optimize.DEFAULT]
        try:
            with contextlib.redirect_stdout(io.StringIO()), _native_stderr_silenced():  # Keras prints its export
                return converter.convert(), layer_names
        except Exception as error:
            raise ModelError(f"model: the TFLite converter could not convert {_describe(model)}: "
                             f"{_first_line(error)}") from error

    def _converter(self, model: Any) -> tuple[Any, set[str]]:
        """The TFLite converter for a Keras model, a ``.keras`` file or a SavedModel directory,
        and the names of the Keras layers with weights (none for a SavedModel)."""
        import keras

        tf = self.tf
        if isinstance(model, (str, os.PathLike)):
            location = Path(model)
            if location.suffix == ".keras" and location.is_file():
                model = _load_keras(location)
            elif location.is_dir():
                return self._saved_model_converter(location), set()
            else:
                raise ModelError(f"model: {location}: not a .keras file or a SavedModel directory")
        if not isinstance(model, keras.Model):
            raise ModelError(f"model: expected a Keras model, a .keras file or a SavedModel directory for framework "
                             f"'tensorflow', got {type(model).__name__}")
        return tf.lite.TFLiteConverter.from_keras_model(model), _keras_layer_names(model)

    def _saved_model_converter(self, location: Path) -> Any:
        tf = self.tf
        try:
            loaded = tf.saved_model.load(str(location))
        except Exception as error:
            raise ModelError(f"model: {location}: not a SavedModel ({_first_line(error)})") from None
        signatures = list(getattr(loaded, "signatures", {}).keys())
        if "serving_default" not in signatures:
            raise ModelError(f"model: {location}: the SavedModel has no 'serving_default' signature "
                             f"(signatures: {', '.join(signatures) or 'none'}); export it with one")
        return tf.lite.TFLiteConverter.from_saved_model(str(location), signature_keys=["serving_default"])

    # --- both sides --------------------------------------------------------------------------
    def load(self, payload: bytes) -> TFLiteModel:
        model = pickle.loads(payload)
        model.threads = self.threads
        return model

    def weights_digest(self, model: TFLiteModel) -> str:
        return hashlib.sha256(model.content).hexdigest()[:16]  # conversion is deterministic

    def capabilities(self, model: TFLiteModel) -> list[OpCapability]:
        tensors = model.tensor_details()
        dynamic = self.approach == Approach.DYNAMIC
        hybrid = _hybrid_ops(model) if dynamic else set()
        capabilities = []
        for graph_op in model.ops():
            weight_shape = tuple(int(dim) for dim in tensors[graph_op.weight_index]["shape"])
            output_shape = tuple(int(dim) for dim in tensors[graph_op.output_index]["shape"])
            op = Op(graph_op.name, QUANTIZABLE_OPS[graph_op.builtin], _macs(graph_op.builtin, weight_shape, output_shape),
                    int(np.prod(weight_shape)))
            if dynamic:  # only the ops whose weights the converter quantized
                schemes = (DYNAMIC[graph_op.builtin],) if graph_op.name in hybrid else ()
            else:
                schemes = (SCHEME,)
            capabilities.append(OpCapability(op, schemes))
        return capabilities

    def recipes(self, model: TFLiteModel) -> tuple[str, ...]:
        """Equalization for static quantization where the flatbuffer has a pair of CONV_2D /
        FULLY_CONNECTED ops to equalize (a rewrite of its weight buffers before calibration)."""
        from . import tensorflow_recipes

        return () if model.dynamic else self.offers_equalization(lambda: tensorflow_recipes.equalizable(model.content))

    def rewritten(self, model: TFLiteModel, config: TuneConfig) -> TFLiteModel:
        """The float model the config quantizes: equalized if it names equalization."""
        from . import tensorflow_recipes

        return self.equalized(model, config, lambda fp32: TFLiteModel(tensorflow_recipes.equalize(fp32.content)[0],
                                                                      fp32.op_names, self.threads))

    def quantize(self, model: TFLiteModel, config: TuneConfig, calibration: Sequence[Any]) -> TFLiteModel:
        from tensorflow.lite.python import convert

        if model.dynamic:  # prepared for dynamic quantization: its space holds dynamic schemes only
            return self._dynamic(model, config)
        calibrated = self._calibrated(self.rewritten(model, config), calibration, config.sampling_size)
        fp32_ops = set(config.fp32_ops)
        denylisted = [graph_op.output_name for graph_op in calibrated.ops() if graph_op.name in fp32_ops]
        with _native_stderr_silenced():
            content = convert.mlir_quantize(calibrated.content, disable_per_channel=False, fully_quantize=False,
                                            denylisted_nodes=denylisted)
        return TFLiteModel(content, model.op_names, self.threads)

    def _dynamic(self, model: TFLiteModel, config: TuneConfig) -> TFLiteModel:
        """The dynamic-range flatbuffer with the config's fp32 ops given their float weights back."""
        hybrid = TFLiteModel(model.dynamic, model.op_names)
        fp32 = set(config.fp32_ops)
        weights = {graph_op.weight_name for graph_op in hybrid.ops() if graph_op.name in fp32}
        content = _with_float_weights(model.dynamic, model.content, weights) if weights else model.dynamic
        return TFLiteModel(content, model.op_names, self.threads)

    def _calibrated(self, model: TFLiteModel, calibration: Sequence[Any], sampling_size: int) -> TFLiteModel:
        """The float flatbuffer with each tensor's min/max over the first ``sampling_size`` samples."""
        from tensorflow.lite.python.optimize import calibrator

        cache = self.calibration_cache.setdefault(model, {})
        if sampling_size not in cache:
            with self.calibrating():
                batches = [list(_as_inputs(inputs)) for inputs in take_samples(calibration, sampling_size)]
                for batch in batches:
                    model.check_input_shapes(tuple(array.shape for array in batch), "q_dataloader")
                with _native_stderr_silenced():
                    with_intermediates = calibrator.add_intermediate_tensors(model.content)
                    content = calibrator.Calibrator(with_intermediates).calibrate(lambda: iter(batches))
            self.calibration_passes += 1
            cache[sampling_size] = TFLiteModel(content, model.op_names, self.threads)
        return cache[sampling_size]

    def inspect_tensors(self, model: TFLiteModel, config: TuneConfig, calibration: Sequence[Any]) -> dict[str, float]:
        """Each int8 op quantized alone; its output against the fp32 op's, as noise/signal energy."""
        batches = [_as_inputs(inputs) for inputs in take_samples(calibration, config.sampling_size)]
        fp32_outputs = {graph_op.name: graph_op.output_index for graph_op in model.ops() if graph_op.name in config.int8_ops}
        reference = _tensors(self.rewritten(model, config).content, batches, self.threads, list(fp32_outputs.values()))
        errors = {}
        for name in config.int8_ops:
            alone = self.quantize(model, config.with_fallback(set(config.int8_ops) - {name}), calibration)
            graph_op = next(graph_op for graph_op in alone.ops() if graph_op.name == name)
            detail = alone.tensor_details()[graph_op.output_index]
            outputs = _tensors(alone.content, batches, self.threads, [graph_op.output_index])
            signal = noise = 0.0
            for output, fp32_tensors in zip(outputs, reference, strict=True):
                quantized = _dequantized(output[graph_op.output_index], detail)
                expected = fp32_tensors[fp32_outputs[name]]
                signal += float((expected ** 2).mean())
                noise += float(((quantized - expected) ** 2).mean())
            errors[name] = noise / max(signal, 1e-12)
        return errors

    def baseline_model(self, user_model: Any, loaded: TFLiteModel) -> TFLiteModel:
        """The fp32 flatbuffer: int8 and fp32 are compared in the same interpreter."""
        return loaded

    def predict(self, model: TFLiteModel, inputs: Any) -> np.ndarray:
        model.threads = self.threads
        return model(*_as_inputs(inputs))

    def lower(self, model: TFLiteModel, ops: Sequence[Op], config: TuneConfig, example_inputs: Any) -> Lowered:
        """The flatbuffer already holds the int8 kernels LiteRT runs; read which ops got them (int8
        inputs, or int8 weights for a hybrid op)."""
        int8 = _int8_ops(model)
        int8_ops = tuple(name for name, _ in config.op_schemes if name in int8)
        fp32_ops = tuple(name for name, _ in config.op_schemes if name not in int8)
        return Lowered(model, int8_ops, fp32_ops)

    def lower_fp32(self, model: TFLiteModel, example_inputs: Any) -> TFLiteModel:
        return model

    def serialize(self, model: TFLiteModel, example_inputs: Any) -> bytes:
        return model.content  # a plain .tflite file

    def deserialize(self, payload: bytes) -> TFLiteModel:
        return TFLiteModel(payload, threads=self.threads)


def _int8_ops(model: TFLiteModel) -> set[str]:
    tensors = model.tensor_details()
    return {graph_op.name for graph_op in model.ops()
            if np.int8 in (tensors[graph_op.input_index]["dtype"], tensors[graph_op.weight_index]["dtype"])}


def _hybrid_ops(model: TFLiteModel) -> set[str]:
    """The ops the dynamic-range conversion gave int8 weights (it leaves small weights float)."""
    return _int8_ops(TFLiteModel(model.dynamic, model.op_names))


def _with_float_weights(dynamic: bytes, float_content: bytes, weight_names: set[str]) -> bytes:
    """The dynamic-range flatbuffer with the named weight tensors float again: type FLOAT32, the
    float model's data for the same tensor name, no quantization. A hybrid kernel is chosen by its
    weight type, so LiteRT then runs those ops with its float kernels."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(dynamic))
    source = flatbuffer_utils.read_model_from_bytearray(bytearray(float_content))
    originals = {tensor.name: tensor for subgraph in source.subgraphs for tensor in subgraph.tensors}
    users = [tensor.buffer for subgraph in model.subgraphs for tensor in subgraph.tensors]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
            if name not in weight_names or tensor.type != schema.TensorType.INT8:
                continue
            original = originals[tensor.name]
            buffer = schema.BufferT()
            buffer.data = source.buffers[original.buffer].data
            if users.count(tensor.buffer) == 1:  # its own buffer: replace the int8 bytes
                model.buffers[tensor.buffer] = buffer
            else:
                model.buffers.append(buffer)
                tensor.buffer = len(model.buffers) - 1
            tensor.type = original.type
            tensor.quantization = original.quantization
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def _load_keras(location: Path) -> Any:
    import keras

    try:
        return keras.models.load_model(location)
    except Exception as error:
        raise ModelError(f"model: {location}: not a readable .keras file ({_first_line(error)})") from None


def _keras_layer_names(model: Any) -> set[str]:
    return {layer.name for layer in model._flatten_layers(include_self=False) if getattr(layer, "kernel", None) is not None}


def _op_names(content: bytes, layer_names: set[str]) -> dict[str, str]:
    """Weight tensor name -> Keras layer name, for each quantizable op of a converted model.

    The converter names a weight after its layer's path, e.g. ``digits_cnn_1/conv1_1/convolution``
    for layer ``conv1`` (Keras adds the ``_1`` while tracing), so a weight belongs to the deepest
    path component that is, or with one ``_N`` suffix removed is, a layer's name. A weight the
    converter folded a BatchNorm into is named after several ops joined by ``;``, the BatchNorm's
    first (``block_1_depthwise_BN_1/batchnorm/mul_1;block_1_depthwise_1/depthwise;...``): each
    path is tried in turn, and a BatchNorm has no kernel, so the convolution's layer is found.
    """
    names = {}
    for graph_op in TFLiteModel(content).ops():
        name = _layer_of(graph_op.weight_name, layer_names)
        if name is not None:
            names[graph_op.weight_name] = name
    return names


def _layer_of(weight_name: str, layer_names: set[str]) -> str | None:
    for path in weight_name.split(";"):
        for component in reversed(path.split("/")):
            matches = [name for name in (component, re.sub(r"_\d+$", "", component)) if name in layer_names]
            if matches:
                return matches[0]
    return None


def _weight_path(tensor_name: str) -> str:
    """An op's name without Keras: its weight tensor's path minus the last component."""
    path = tensor_name.split(";")[0]
    return path.rsplit("/", 1)[0] if "/" in path else path


def _macs(builtin: str, weight_shape: tuple, output_shape: tuple) -> int:
    """Multiply-accumulates per sample: output elements x inputs per output element."""
    output_elements = int(np.prod(output_shape[1:]))
    if builtin == "DEPTHWISE_CONV_2D":  # weights [1, kh, kw, channels]: one filter per channel
        return output_elements * int(np.prod(weight_shape[1:3]))
    return output_elements * int(np.prod(weight_shape[1:]))


def _as_inputs(inputs: Any) -> tuple[np.ndarray, ...]:
    """A batch's inputs as float32 numpy arrays in input order."""
    arrays = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(np.ascontiguousarray(np.asarray(array, dtype=np.float32)) for array in arrays)


def _tensors(content: bytes, batches: list[tuple[np.ndarray, ...]], threads: int, indices: list[int]) -> list[dict[int, np.ndarray]]:
    """The tensors ``indices`` (intermediate ones included) of a run on each batch; one
    interpreter per input shape, and only the wanted tensors copied out."""
    interpreters: dict[tuple, Any] = {}
    runs = []
    for inputs in batches:
        shapes = tuple(array.shape for array in inputs)
        if shapes not in interpreters:
            interpreters[shapes] = _interpreter(content, threads, shapes, preserve_all_tensors=True)
        interpreter = interpreters[shapes]
        for detail, array in zip(interpreter.get_input_details(), inputs, strict=True):
            interpreter.set_tensor(detail["index"], array)
        interpreter.invoke()
        runs.append({index: interpreter.get_tensor(index).copy() for index in indices})
    return runs


def _dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    if values.dtype == np.float32:
        return values
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale


def _describe(model: Any) -> str:
    return str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
