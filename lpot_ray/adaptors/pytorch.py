"""PyTorch: real int8 on CPU through torchao's PT2E flow and the X86 inductor quantizer.

A batch is a tensor, a tuple or list of them (positional arguments) or a mapping of them (a
tokenizer's batch, called as ``model(**batch)``). The model is exported once (``torch.export``
with a dynamic batch dimension and every other dimension the model lets vary, such as a sequence
length, dynamic too) and travels as ``torch.export.save`` bytes; its outputs keep their structure
(a transformers ``ModelOutput``, a dict, a tuple) through quantization and compilation. A candidate config becomes one X86InductorQuantizer with a
per-module QuantizationConfig for each int8 op (no global config, so an op not listed stays fp32).
Calibration statistics are cached per observed graph node and observer kind: a fallback trial
loads them into its fresh observers instead of running calibration again. Evaluation runs the
converted (reference, dequantize → fp32 op → quantize) model; ``lower`` compiles it with inductor
and freezing, which is where the int8 oneDNN kernels appear, and reads the int8 op list from the
generated code.

bf16 (offered only on a CPU with AVX-512 BF16 or AMX, see ``lpot_ray.cpu``): after conversion, a
bf16 op's graph node gets its input cast to bfloat16, its weight and bias stored in bfloat16 and
its output cast back to float32; inductor then lowers it to oneDNN's bf16 convolution or matmul,
and the bf16 op list is read from the generated code too (kernels whose operands are bfloat16).
"""

from __future__ import annotations

import collections.abc
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import importlib
import itertools
import json
import logging
import os
import pickle
import re
import threading
import warnings
import weakref
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..config import Approach, TrainSection
from ..cpu import bf16_unavailable_reason
from ..errors import DataError, MissingFrameworkError, ModelError
from ..recipes import CROSS_LAYER_EQUALIZATION, FAST_BIAS_CORRECTION, SMOOTH_QUANT, alpha_of, name_of
from ..space import BF16, Op, OpCapability, OpScheme, TensorScheme, TuneConfig
from .base import Adaptor, Lowered, take_samples
from . import pytorch_pruning, pytorch_recipes
from .pytorch_recipes import bias_of



def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled kernels unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise:
    the user's cache folder, not torch's default under /tmp (gone at reboot, often in memory), so
    that a resumed or repeated tuning of a model compiles in a fraction of the time."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lpot_ray" / "torchinductor"


def import_torch():
    """torch and the torchao PT2E pieces, with a one-line error when they are missing."""
    # torchao logs about CUDA-only kernels and a deprecated pytree call on import: noise on a CPU.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    try:
        import torch
        from torchao.quantization import pt2e
        from torchao.quantization.pt2e import quantize_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer
    except ImportError:
        raise MissingFrameworkError("pytorch", "torch") from None
    return torch, pt2e, quantize_pt2e, x86_inductor_quantizer


log = logging.getLogger("lpot_ray")
VARYING_DIMS = "lpot_ray.varying_dims"  # a quantized module's meta key: {input: dims that varied in calibration}
QUANTIZABLE_MODULES = {"Conv2d": "conv2d", "Linear": "linear"}
TRAINED_KEPT = 4  # quantization-aware trainings kept per model for configs with the same int8 set
WEIGHT = TensorScheme("int8", "sym", "per_channel", "minmax")
ACTIVATIONS = [TensorScheme("uint8", "asym", "per_tensor", algorithm) for algorithm in ("minmax", "kl", "percentile")]
PERCENTILE = 99.999  # of the calibration values inside a percentile range (ONNX Runtime's and Neural Compressor's default)
# Activations quantized with ranges computed per batch at run time: X86's dynamic path (Linear only).
DYNAMIC = {"Linear": OpScheme(WEIGHT, TensorScheme("uint8", "asym", "per_tensor", "dynamic"))}

# Kernel calls in inductor's generated code, per op type: the int8 ones and every one.
_KERNELS = {
    "Conv2d": (r"onednn\.qconv\w*pointwise", r"onednn\.qconv\w*pointwise|_convolution_pointwise|extern_kernels\.convolution"),
    "Linear": (r"onednn\.qlinear\w*pointwise",
               r"onednn\.qlinear\w*pointwise|_linear_pointwise|_mkl_linear|extern_kernels\.(?:addmm|mm)\("),
}


Call = tuple[tuple, dict]  # one call of a model: its positional arguments and its keywords


def as_call(inputs: Any) -> Call:
    """A batch's inputs as a call of the model: a mapping (a tokenizer's batch) gives keywords,
    ``model(**batch)``; a tuple or list gives positional arguments, anything else the one
    argument. Numpy arrays become tensors, float64 ones float32 (numpy's and scikit-learn's
    default float is torch models' double)."""
    if isinstance(inputs, collections.abc.Mapping):
        return (), {str(name): _as_tensor(value) for name, value in inputs.items()}
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return tuple(_as_tensor(arg) for arg in args), {}


def _as_tensor(value: Any) -> Any:
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32 if value.dtype == np.float64 else None))
    return value


def _call_tensors(call: Call) -> list:
    return [*call[0], *call[1].values()]


def _dynamic_shapes(torch: Any, call: Call, lengths: bool) -> Any:
    """torch.export's ``dynamic_shapes`` for ``call``: the first dimension of every input is one
    shared batch dimension; with ``lengths``, every other dimension of more than one element is
    left to export (``Dim.AUTO``: dynamic unless the model fixes it, as BERT's sequence length is
    not). A tokenizer pads each batch to its own length and an eval_func's batches are never seen
    here, so every length the model itself accepts must run."""
    batch = torch.export.Dim("batch", min=1)

    def spec(tensor: Any) -> Optional[dict]:
        if tensor.dim() == 0:
            return None
        others = range(1, tensor.dim()) if lengths else ()
        return {0: batch, **{dim: torch.export.Dim.AUTO for dim in others if tensor.shape[dim] > 1}}

    args, kwargs = call
    if kwargs:
        return {name: spec(tensor) for name, tensor in kwargs.items()}
    return tuple(spec(arg) for arg in args)


def _varying_dims(calls: Sequence[Call]) -> dict[str, set[int]]:
    """Dimensions other than the batch whose size differs across ``calls``, per input."""
    shapes = ShapeRecord()
    for call in calls:
        shapes.learn(call)
    return shapes.dynamic


@functools.cache
def percentile_observer(histogram_observer: type) -> type:
    """An observer whose range leaves out the ``100 - PERCENTILE`` % of calibration values
    farthest out, half at each end, read from the histogram torchao's HistogramObserver keeps:
    a few stray values (a corrupt sample, a rare spike) no longer stretch the int8 grid of a
    whole tensor. Built on first use, since torch is imported lazily."""
    import torch

    class PercentileObserver(histogram_observer):
        def calculate_qparams(self):
            total = float(self.histogram.sum())
            if total == 0 or not bool(self.max_val > self.min_val):
                return super().calculate_qparams()
            cumulative = torch.cumsum(self.histogram, 0)
            tail = total * (1 - PERCENTILE / 100) / 2
            low = int(torch.searchsorted(cumulative, torch.tensor(tail, dtype=cumulative.dtype), right=True))
            high = int(torch.searchsorted(cumulative, torch.tensor(total - tail, dtype=cumulative.dtype)))
            width = (self.max_val - self.min_val) / self.bins
            return self._calculate_qparams(self.min_val + width * low, self.min_val + width * min(high + 1, self.bins))

    return PercentileObserver


class PyTorchAdaptor(Adaptor):
    framework = "pytorch"
    model_file = "model.pt2"
    approaches = (Approach.STATIC, Approach.DYNAMIC, Approach.QAT)

    def __init__(self) -> None:
        self.torch, self.pt2e, self.quantize_pt2e, self.x86 = import_torch()
        # Per fp32 model and recipe rewrite: observer states by (observed node, observer kind, sampling size).
        self.calibration_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Per fp32 model: what recipes computed (equalized weights, smoothing scales).
        self.recipe_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Per fp32 model: [(int8 op schemes trained for, trained parameters, fake-quant states)].
        self.trained_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.trainings = 0  # q_func calls: once per set of int8 op schemes
        # Per fp32 model: the lengths that varied across its calibration batches (for lower_fp32).
        self.varying_dims: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def training_from_yaml(cls, section: TrainSection, hooks: Any = None, loader: Any = None) -> "YamlTraining":
        return YamlTraining(section, hooks, loader)

    def weights(self, model: Any) -> "pytorch_pruning.TorchWeights":
        if not isinstance(model, self.torch.nn.Module):
            raise ModelError(f"model: expected a torch.nn.Module for framework 'pytorch', got {type(model).__name__}")
        return pytorch_pruning.TorchWeights(model)

    def set_threads(self, threads: int) -> int:
        previous = self.torch.get_num_threads()
        self.torch.set_num_threads(max(1, int(threads)))
        return previous

    # --- driver side -------------------------------------------------------------------------
    def warm_up_lowering(self) -> None:
        """Inductor's first compile in a process probes which vector instructions the CPU runs
        by building and loading small programs in subprocesses (about 1.5 s); that probe touches
        no tracing state, so it runs in a thread now. Nothing else of inductor's set-up is
        thread-safe beside a trial's tracing."""
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        threading.Thread(target=pick_vec_isa, name="lpot-ray-inductor-probe", daemon=True).start()

    def load_file(self, path: str) -> Any:
        """A model saved with ``torch.export.save`` (``.pt2``), for tuning from a YAML alone."""
        file = Path(path)
        if not file.is_file():
            raise ModelError(f"model.path: {file}: file not found")
        _import_output_types(str(file))
        try:
            with weights_only_unpickling(self.torch):
                module = self.torch.export.load(str(file)).module()
        except Exception as error:  # a zip of something else, a pickle, a truncated file...
            if unsafe_pickle(error):
                raise ModelError(f"model.path: {file}: {PICKLED_OBJECTS}; lpot_ray loads only weights and the graph "
                                 "(save the model with torch.export.save)") from None
            raise ModelError(f"model.path: {file}: not a torch.export .pt2 file ({type(error).__name__}: {error})") from None
        self.pt2e.allow_exported_model_train_eval(module)
        return module

    def prepare(self, model: Any, example_inputs: Any) -> bytes:
        torch = self.torch
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"model: expected a torch.nn.Module for framework 'pytorch', got {type(model).__name__}")
        call = as_call(example_inputs)
        if not _call_tensors(call) or not all(isinstance(arg, torch.Tensor) for arg in _call_tensors(call)):
            raise DataError("calibration loader: batches must be tensors or numpy arrays, tuples or lists of them, or "
                            "dicts of them by argument name (a tokenizer's output), alone or followed by labels")
        model.eval()
        try:
            return self._export(model, call)
        except Exception as error:  # torch raises many kinds here; the user needs the reason
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            hint = ""
            if "Constraints violated" in str(error) or "Guard failed" in str(error):
                hint = ("; lpot_ray needs a dynamic batch dimension: export the model with "
                        "dynamic_shapes={0: torch.export.Dim('batch')} for its input")
            raise ModelError(f"model: torch.export could not export {type(model).__name__}: {first_line}{hint}") from error

    def _export(self, model: Any, call: Call) -> bytes:
        """``torch.export`` with a dynamic batch dimension and, where the model allows them, dynamic
        lengths (a model export can't trace so is exported with the batch dynamic only), saved to
        bytes (models travel so)."""
        torch = self.torch
        args, kwargs = call
        try:
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(torch, call, lengths=True))
        except Exception:
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=_dynamic_shapes(torch, call, lengths=False))
        buffer = io.BytesIO()
        torch.export.save(exported, buffer)
        return buffer.getvalue()

    # --- both sides --------------------------------------------------------------------------
    def load(self, payload: bytes) -> Any:
        _import_output_types(payload)
        program = self.torch.export.load(io.BytesIO(payload))
        _separate_repeated_calls(program.graph)
        return program

    def weights_digest(self, model: Any) -> str:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict.items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def capabilities(self, model: Any) -> list[OpCapability]:
        module = model.module()
        params = dict(module.named_parameters())
        bf16 = self.bf16_schemes()
        capabilities = []
        for path, op_type, node in _quantizable_nodes(module):
            weight = params.get(f"{path}.weight")
            op = Op(path, op_type, _macs(node, weight), 0 if weight is None else weight.numel())
            capabilities.append(OpCapability(op, self._int8_schemes(op_type) + bf16))
        return capabilities

    def _int8_schemes(self, op_type: str) -> tuple[OpScheme, ...]:
        """Static: calibrated by min/max or KL; dynamic: X86's dynamic path, Linear only;
        quantization-aware training: moving min/max while the model trains."""
        if self.approach == Approach.DYNAMIC:
            return (DYNAMIC[op_type],) if op_type in DYNAMIC else ()
        activations = ACTIVATIONS[:1] if self.approach == Approach.QAT else ACTIVATIONS
        return tuple(OpScheme(WEIGHT, activation) for activation in activations)

    def bf16_schemes(self) -> tuple[OpScheme, ...]:
        """``(BF16,)`` where this CPU computes bf16 natively, else nothing (``quantization.use_bf16``
        then says why)."""
        return (BF16,) if bf16_unavailable_reason() is None else ()

    def recipes(self, model: Any) -> tuple[str, ...]:
        """Where activations are quantized: equalization where the graph has a pair to equalize,
        SmoothQuant where it has Linear ops; where they are calibrated, bias correction too (its
        error is measured on the calibration batches) if an op has a bias."""
        if self.approach == Approach.QAT:
            return ()
        module = model.module()
        try:
            offered = [CROSS_LAYER_EQUALIZATION] if pytorch_recipes.equalizable(module) else []
            if pytorch_recipes.smoothing_groups(module):
                offered.append(SMOOTH_QUANT)
        except Exception as error:  # a graph the recipes don't understand: tune without them
            log.warning("recipes: equalization and SmoothQuant are off for this model (%s: %s)", type(error).__name__, error)
            offered = []
        if self.approach == Approach.STATIC and any(bias_of(node) for _, _, node in _quantizable_nodes(module)):
            offered.append(FAST_BIAS_CORRECTION)
        return tuple(offered)

    def fp32_module(self, model: Any, config: TuneConfig, calibration: Sequence[Any]) -> Any:
        """The fp32 graph module, rewritten by the config's function-preserving recipes: what its
        int8 form is quantized from and compared with. A new module each time (quantizing
        rewrites the graph), sharing the model's tensors except those a recipe replaced; what a
        recipe computes is kept per model."""
        module, cache = model.module(), self.recipe_cache.setdefault(model, {})
        equalize = CROSS_LAYER_EQUALIZATION in config.recipes
        if equalize:
            if CROSS_LAYER_EQUALIZATION not in cache:
                cache[CROSS_LAYER_EQUALIZATION] = pytorch_recipes.equalized(module)
            module = pytorch_recipes.with_parameters(module, cache[CROSS_LAYER_EQUALIZATION])
        for recipe in config.recipes:
            if name_of(recipe) == SMOOTH_QUANT:
                key = (recipe, equalize, config.sampling_size)  # measured on the module as it is by then
                if key not in cache:
                    cache[key] = pytorch_recipes.smoothing_scales(module, alpha_of(recipe),
                                                                  take_samples(calibration, config.sampling_size),
                                                                  _node_outputs)
                module = pytorch_recipes.smoothed(module, cache[key])
        return module

    def quantize(self, model: Any, config: TuneConfig, calibration: Sequence[Any]) -> Any:
        preserving = tuple(recipe for recipe in config.recipes if recipe != FAST_BIAS_CORRECTION)
        quantized = self._quantized(model, self.fp32_module(model, config, calibration), config, calibration, preserving)
        if FAST_BIAS_CORRECTION not in config.recipes:
            return quantized
        reference = self.fp32_module(model, config, calibration)
        ops = {path: (node.name, node.args[1].target, bias_of(node), 1 if op_type.startswith("Conv") else -1)
               for path, op_type, node in _quantizable_nodes(reference) if path in config.int8_ops and bias_of(node)}
        biases = pytorch_recipes.bias_corrections(reference, quantized, ops, take_samples(calibration, config.sampling_size),
                                                  _node_outputs)
        # The corrected biases are this config's own (they follow its int8 ops): so are their statistics.
        return self._quantized(model, pytorch_recipes.with_parameters(reference, biases), config, calibration,
                               (config.recipes, config.op_schemes))

    def _quantized(self, model: Any, module: Any, config: TuneConfig, calibration: Sequence[Any],
                   rewritten_by: Any) -> Any:
        """``module`` (the fp32 ``model``'s graph, its weights rewritten by recipes) prepared,
        calibrated and converted; activation statistics are cached per model and ``rewritten_by``
        (what determines the rewritten weights)."""
        quantizer = self.x86.X86InductorQuantizer()
        for name, scheme in config.op_schemes:
            if scheme.dtype == "int8":
                quantizer.set_module_name_qconfig(name, self.quantization_config(scheme))
        prepared = self.quantize_pt2e.prepare_pt2e(module, quantizer)
        cache = self.calibration_cache.setdefault(model, {}).setdefault(rewritten_by, {})
        self._calibrate(prepared, calibration, config.sampling_size, cache)
        return self._converted(model, prepared, config, calibration)

    def quantize_aware(self, model: Any, config: TuneConfig, q_func: Any, calibration: Sequence[Any]) -> Any:
        """Quantization-aware training through torchao's ``prepare_qat_pt2e``.

        Training is what costs, so a worker trains once per set of int8 op schemes and a config
        with the same set (differing only in bf16, say) reuses its trained weights and fake-quant
        ranges. A fallback config trains anew: weights trained under fake quantization of an op
        are not weights for that op in fp32 (measured: 0.87 against a 0.98 baseline on a CNN).
        """
        int8 = {name: scheme for name, scheme in config.op_schemes if scheme.dtype == "int8"}
        prepared = self._prepare_qat(model, int8)
        cache = self.trained_cache.setdefault(model, [])
        trained = next((entry for entry in cache if entry[0] == int8), None)
        if trained is None:
            with self.torch.no_grad():  # ranges from the example batches first, in case training is short
                for inputs in take_samples(calibration, config.sampling_size):
                    args, kwargs = as_call(inputs)
                    prepared(*args, **kwargs)
            self.pt2e.move_exported_model_to_train(prepared)
            returned = q_func(prepared)
            prepared = returned if isinstance(returned, self.torch.nn.Module) else prepared
            self.trainings += 1
            self.pt2e.move_exported_model_to_eval(prepared)
            cache.append((int8, _parameters(prepared), _fake_quant_states(prepared)))
            del cache[:-TRAINED_KEPT]  # a copy of the weights each: the latest few sets only
        else:
            _, parameters, states = trained
            prepared.load_state_dict(parameters, strict=False)
            for key, module in _fake_quant_modules(prepared).items():
                if key in states:
                    module.load_state_dict(states[key])
            self.pt2e.move_exported_model_to_eval(prepared)
        return self._converted(model, prepared, config, calibration)

    def _converted(self, model: Any, prepared: Any, config: TuneConfig, calibration: Sequence[Any]) -> Any:
        """The int8 model from a calibrated or trained one, bf16 ops cast, the fp32 weights int8
        ones replaced dropped; it and the adaptor (for the fp32 ``model``) remember the lengths
        that varied in the calibration batches, which a compiled form takes as dynamic from its
        first compile."""
        converted = self.quantize_pt2e.convert_pt2e(prepared)
        _to_bf16(converted, set(config.bf16_ops))
        _drop_unreferenced_tensors(converted)
        self.pt2e.allow_exported_model_train_eval(converted)
        varying = self.varying_dims[model] = _varying_dims([as_call(inputs) for inputs in calibration])
        converted.meta[VARYING_DIMS] = varying
        return converted

    def _prepare_qat(self, model: Any, int8: dict[str, OpScheme]) -> Any:
        quantizer = self.x86.X86InductorQuantizer()
        for name, scheme in int8.items():
            quantizer.set_module_name_qconfig(name, self.quantization_config(scheme, is_qat=True))
        # A copy: training must not change the fp32 model that later trials start from.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # copying a pytree spec: torch's own deprecation
            module = copy.deepcopy(model.module())
        return self.quantize_pt2e.prepare_qat_pt2e(module, quantizer)

    def quantization_config(self, scheme: OpScheme, is_qat: bool = False):
        """torchao's QuantizationConfig for one op scheme."""
        obs = self.pt2e
        if self.approach == Approach.DYNAMIC:
            return self.x86.get_default_x86_inductor_quantization_config(is_dynamic=True)
        default = self.x86.get_default_x86_inductor_quantization_config(is_qat=is_qat)
        if is_qat:  # fake-quantized while training: ranges are moving min/max (the only QAT scheme)
            return default
        activation_observer = {"minmax": obs.MinMaxObserver, "kl": obs.HistogramObserver,
                               "percentile": percentile_observer(obs.HistogramObserver)}[scheme.activation.algorithm]
        activation = dataclasses.replace(default.input_activation, observer_or_fake_quant_ctr=activation_observer)
        weight = default.weight
        if scheme.weight.granularity == "per_tensor":
            weight = dataclasses.replace(
                weight, observer_or_fake_quant_ctr=obs.MinMaxObserver,
                qscheme=self.torch.per_tensor_symmetric, ch_axis=None,
            )
        return dataclasses.replace(default, input_activation=activation, output_activation=activation, weight=weight)

    def _calibrate(self, prepared: Any, calibration: Sequence[Any], sampling_size: int, cache: dict) -> None:
        observers = {}
        for node in prepared.graph.nodes:
            if node.op == "call_module" and node.target.startswith("activation_post_process"):
                observer = getattr(prepared, node.target)
                observed = node.args[0].name
                observers[(observed, type(observer).__name__, str(getattr(observer, "qscheme", "")), sampling_size)] = observer
        if observers and all(key in cache for key in observers):
            for key, observer in observers.items():
                observer.load_state_dict(cache[key])
            return
        with self.calibrating(), self.torch.no_grad():
            for inputs in take_samples(calibration, sampling_size):
                args, kwargs = as_call(inputs)
                prepared(*args, **kwargs)
                self.calibration_passes += 1
        for key, observer in observers.items():
            cache[key] = {k: v.clone() for k, v in observer.state_dict().items()}

    def inspect_tensors(self, model: Any, config: TuneConfig, calibration: Sequence[Any]) -> dict[str, float]:
        fp32 = self.fp32_module(model, config, calibration)
        nodes = {path: node.name for path, _, node in _quantizable_nodes(fp32)}
        quantized_alone = {name: self.quantize(model, config.with_fallback(set(config.int8_ops) - {name}), calibration)
                           for name in config.int8_ops}
        signal = dict.fromkeys(quantized_alone, 0.0)
        noise = dict.fromkeys(quantized_alone, 0.0)
        for inputs in take_samples(calibration, config.sampling_size):  # one batch of op outputs at a time
            reference = _node_outputs(fp32, nodes, inputs)
            for name, quantized in quantized_alone.items():
                output = _node_outputs(quantized, {name: nodes[name]}, inputs)[name]
                signal[name] += float((reference[name] ** 2).mean())
                noise[name] += float(((output - reference[name]) ** 2).mean())
        return {name: noise[name] / max(signal[name], 1e-12) for name in quantized_alone}

    def reference(self, loaded: Any) -> Any:
        return loaded.module()

    def predict(self, model: Any, inputs: Any) -> np.ndarray:
        args, kwargs = as_call(inputs)
        with self.torch.no_grad():
            output = model(*args, **kwargs)
        return _first_tensor(output).detach().float().numpy()

    def lower(self, model: Any, ops: Sequence[Op], config: TuneConfig, example_inputs: Any) -> Lowered:
        from torch._inductor.utils import run_and_get_code

        compiled = self._compile(model, getattr(model, "meta", {}).get(VARYING_DIMS))
        args, kwargs = as_call(example_inputs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # inductor's own tensor-copy warning while lowering
            _, code = run_and_get_code(compiled, *args, **kwargs)
        op_types = {op.name: op.op_type for op in ops}
        int8_ops = _ops_from_code("\n".join(code), op_types, config, "int8")
        bf16_ops = _ops_from_code("\n".join(code), op_types, config, "bf16")
        fp32_ops = tuple(name for name, _ in config.op_schemes if name not in int8_ops + bf16_ops)
        return Lowered(compiled, int8_ops, fp32_ops, bf16_ops)

    def lower_fp32(self, model: Any, example_inputs: Any) -> Any:
        compiled = self._compile(model.module(), self.varying_dims.get(model))
        args, kwargs = as_call(example_inputs)
        compiled(*args, **kwargs)
        return compiled

    def _compile(self, module: Any, varying: Optional[dict[str, set[int]]] = None) -> "CompiledModel":
        # Static shapes but for the lengths seen varying (CompiledModel marks them dynamic):
        # inductor's dynamic-batch int8 conv lowering gets strides wrong in this release.
        return CompiledModel(self.torch.compile(module, dynamic=False), self._inductor_settings, varying)

    def _inductor_settings(self):
        import torch._inductor.config as inductor_config

        # Freezing turns weights into constants: only then does inductor fuse the q/dq pattern
        # into int8 oneDNN kernels.
        return inductor_config.patch(freezing=True)

    def serialize(self, model: Any, example_inputs: Any) -> bytes:
        return self._export(model, as_call(example_inputs))

    def deserialize(self, payload: bytes) -> Any:
        """A saved quantized model (``lpot_ray.load``, the benchmark mode): weights only, like ``load_file``."""
        _import_output_types(payload)
        try:
            with weights_only_unpickling(self.torch):
                module = self.torch.export.load(io.BytesIO(payload)).module()
        except Exception as error:
            if unsafe_pickle(error):
                raise ModelError(f"saved model: {PICKLED_OBJECTS}; lpot_ray loads only weights and the graph") from None
            raise
        self.pt2e.allow_exported_model_train_eval(module)
        return module


class ShapeRecord:
    """Which dimensions of a model's inputs vary across its calls, batch aside: the first shape
    of each input (by its place in the call) and every other dimension found different since."""

    def __init__(self, dynamic: Optional[dict[str, set[int]]] = None):
        self.first: dict[str, tuple[int, ...]] = {}
        self.dynamic: dict[str, set[int]] = {path: set(dims) for path, dims in (dynamic or {}).items()}

    def learn(self, call: Call) -> None:
        for path, tensor in _tensor_leaves(call):
            first = self.first.setdefault(path, tuple(tensor.shape))
            if len(first) == tensor.dim():
                changed = {dim for dim in range(1, tensor.dim()) if tensor.shape[dim] != first[dim]}
                if changed:
                    self.dynamic.setdefault(path, set()).update(changed)


class CompiledModel:
    """A compiled model callable like the module it came from (positional arguments or keywords,
    the same output structure); eval()/train() are no-ops.

    Inductor compiles for static shapes (see ``_compile``) but for the dimensions other than the
    batch found varying, in the calibration batches (``varying``) or in the calls so far: those
    are marked dynamic, so one compile serves every sequence length, and a length first seen
    varying after the first compile costs one more. Every new batch size would cost a compile of
    seconds, so a batch of another size runs in chunks of the largest size compiled so far, the
    last one padded with copies of its last sample and the padding's outputs dropped (each
    sample's output is its own in inference); a batch more than ``MAX_CHUNKS`` times that size
    is compiled for once instead and becomes the chunk size. Outputs whose first dimension is not
    the batch (a sequence-first model) fall back to a call of the batch's own size.
    """

    MAX_CHUNKS = 8

    def __init__(self, compiled: Any, settings: Any, varying: Optional[dict[str, set[int]]] = None):
        self.compiled = compiled
        self.settings = settings
        self.batch_size: Optional[int] = None  # the largest batch compiled for
        self.shapes = ShapeRecord(varying)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        call = (args, kwargs)
        self.shapes.learn(call)
        size = _common_batch_size(call)
        with torch.no_grad(), self.settings():
            if size is None or self.batch_size is None or size == self.batch_size or size > self.MAX_CHUNKS * self.batch_size:
                self.batch_size = max(self.batch_size or 0, size or 0) or None
                return self._run(call)
            chunks = []
            for start in range(0, size, self.batch_size):
                part = _sliced(call, start, self.batch_size)
                length = _common_batch_size(part)
                trimmed = _trimmed(self._run(_padded(part, self.batch_size)), length, self.batch_size)
                if trimmed is None:
                    return self._run(call)
                chunks.append(trimmed)
            return _concatenated(chunks)

    def _run(self, call: Call) -> Any:
        args, kwargs = _marked_dynamic(call, self.shapes.dynamic)
        return self.compiled(*args, **kwargs)

    def eval(self) -> "CompiledModel":
        return self

    def train(self, mode: bool = True) -> "CompiledModel":
        return self


def _tensor_leaves(call: Call) -> Iterator[tuple[str, Any]]:
    """(place in the call, tensor) of every tensor argument."""
    from torch.utils._pytree import keystr, tree_flatten_with_path

    for path, leaf in tree_flatten_with_path(call)[0]:
        if _batched(leaf):
            yield keystr(path), leaf


def _map_batched(call: Call, function: Any) -> Call:
    """``call`` with ``function(place, tensor)`` in place of each tensor argument."""
    from torch.utils._pytree import keystr, tree_map_with_path

    return tree_map_with_path(lambda path, leaf: function(keystr(path), leaf) if _batched(leaf) else leaf, call)


def _marked_dynamic(call: Call, dynamic: dict[str, set[int]]) -> Call:
    """The call's tensors marked dynamic in the given dimensions (on aliases: the caller's
    tensors are left unmarked)."""
    import torch

    def mark(path: str, tensor: Any) -> Any:
        dims = dynamic.get(path)
        if not dims:
            return tensor
        alias = tensor.detach()
        torch._dynamo.maybe_mark_dynamic(alias, sorted(dim for dim in dims if dim < alias.dim()))
        return alias

    return _map_batched(call, mark) if dynamic else call


def _common_batch_size(call: Call) -> Optional[int]:
    """The first dimension shared by every tensor argument, or None if they disagree."""
    sizes = {tensor.shape[0] for _, tensor in _tensor_leaves(call)}
    return sizes.pop() if len(sizes) == 1 else None


def _batched(arg: Any) -> bool:
    import torch

    return isinstance(arg, torch.Tensor) and arg.dim() > 0


def _sliced(call: Call, start: int, size: int) -> Call:
    return _map_batched(call, lambda _, tensor: tensor[start:start + size])


def _padded(call: Call, size: int) -> Call:
    """Every tensor argument padded to ``size`` samples with copies of its last one."""
    import torch

    return _map_batched(call, lambda _, arg: torch.cat([arg, arg[-1:].expand(size - len(arg), *arg.shape[1:])]))


def _concatenated(chunks: list) -> Any:
    """The chunks' outputs joined into one batch (tensors in any nesting; anything without a
    batch dimension taken from the first chunk)."""
    import torch
    from torch.utils._pytree import tree_flatten, tree_unflatten

    flat = [tree_flatten(chunk)[0] for chunk in chunks]
    leaves = [torch.cat([chunk[index] for chunk in flat]) if _batched(first) else first for index, first in enumerate(flat[0])]
    return tree_unflatten(leaves, tree_flatten(chunks[0])[1])


def _trimmed(outputs: Any, size: int, padded: int) -> Any:
    """The outputs of the first ``size`` samples, or None if an output's first dimension is not
    the padded batch (then the padding can't be told apart from the samples)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    leaves, spec = tree_flatten(outputs)
    batched = [_batched(leaf) for leaf in leaves]
    if not any(batched) or any(flag and leaf.shape[0] != padded for leaf, flag in zip(leaves, batched, strict=True)):
        return None
    return tree_unflatten([leaf[:size] if flag else leaf for leaf, flag in zip(leaves, batched, strict=True)], spec)


def _first_tensor(output: Any) -> Any:
    """The first tensor a model returns (logits, for a classifier's ModelOutput, dict or tuple)."""
    import torch
    from torch.utils._pytree import tree_flatten

    tensor = next((leaf for leaf in tree_flatten(output)[0] if isinstance(leaf, torch.Tensor)), None)
    if tensor is None:
        raise ModelError(f"the model returned {type(output).__name__}, holding no tensor to measure")
    return tensor


def _placeholder_values(module: Any, call: Call) -> list:
    """A call's tensors in the order of the graph's inputs (keywords by the names exported)."""
    spec = getattr(module, "_in_spec", None)
    if spec is None:
        return list(call[0])
    from torch.fx._pytree import tree_flatten_spec

    return tree_flatten_spec(call, spec)


def _import_output_types(model_file: Any) -> None:
    """Import the transformers modules defining the output classes a saved model returns: torch
    rebuilds an output (a ``ModelOutput``) only as a type registered in this process, and
    transformers registers each class when its module is imported. Only transformers' own modules
    are imported, whatever the file names; ``model_file`` is the bytes or a path."""
    for module in _output_type_modules(model_file):
        if module.split(".", 1)[0] == "transformers":
            with contextlib.suppress(ImportError):
                importlib.import_module(module)


def _output_type_modules(model_file: Any) -> set[str]:
    """The modules of the non-builtin types in a ``torch.export`` archive's input and output specs."""
    try:
        with zipfile.ZipFile(io.BytesIO(model_file) if isinstance(model_file, bytes) else model_file) as archive:
            texts = [archive.read(name) for name in archive.namelist() if "/models/" in name and name.endswith(".json")]
    except (OSError, zipfile.BadZipFile):
        return set()  # not an archive: torch.export.load names the problem
    modules: set[str] = set()
    for text in texts:
        with contextlib.suppress(ValueError):
            for spec in _spec_strings(json.loads(text)):
                modules |= {name.rpartition(".")[0] for name in _spec_types(json.loads(spec)) if "." in name}
    return modules


def _spec_strings(document: Any) -> Iterator[str]:
    """The serialized pytree specs (``in_spec``, ``out_spec``) anywhere in an exported program."""
    if isinstance(document, dict):
        for key, value in document.items():
            if key in ("in_spec", "out_spec") and isinstance(value, str):
                yield value
            else:
                yield from _spec_strings(value)
    elif isinstance(document, list):
        for value in document:
            yield from _spec_strings(value)


def _spec_types(spec: Any) -> Iterator[str]:
    """The type names in a serialized pytree spec."""
    if isinstance(spec, dict):
        if isinstance(spec.get("type"), str):
            yield spec["type"]
        for value in spec.values():
            yield from _spec_types(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from _spec_types(value)


@contextlib.contextmanager
def weights_only_unpickling(torch: Any) -> Iterator[None]:
    """While a model file loads, unpickle with torch's weights-only unpickler and refuse plain
    pickles: ``torch.export.load`` otherwise unpickles weights, constants and example inputs with
    ``weights_only=False`` or ``pickle.loads``, and a crafted file runs whatever code it holds."""
    from unittest import mock

    from torch.export.pt2_archive import _package

    load = torch.load

    def weights_only_load(*args: Any, **kwargs: Any) -> Any:
        return load(*args, **{**kwargs, "weights_only": True})

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError(PICKLED_OBJECTS)

    with _UNPICKLING, mock.patch.object(torch, "load", weights_only_load), \
            mock.patch.object(_package, "pickle", mock.NonCallableMock(loads=refuse)), \
            mock.patch.object(torch._C, "_pickle_load_obj", refuse):
        yield


_UNPICKLING = threading.Lock()  # the patches above are process-wide: one model file at a time
PICKLED_OBJECTS = "holds pickled Python objects beyond tensors, which could run code"


def unsafe_pickle(error: BaseException) -> bool:
    """Whether loading failed because the file holds more than weights (torch's own wording)."""
    return isinstance(error, pickle.UnpicklingError) or "Weights only load failed" in str(error)


def _drop_unreferenced_tensors(module: Any) -> None:
    """Remove the fp32 weights that convert left behind beside their folded int8 copies, so a
    saved quantized model holds int8 weights only."""
    referenced = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name in [name for name, _ in module.named_parameters()] + [name for name, _ in module.named_buffers()]:
        if name not in referenced:
            owner_path, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            owner._parameters.pop(attribute, None)
            owner._buffers.pop(attribute, None)


def _parameters(module: Any) -> dict[str, Any]:
    return {name: tensor.detach().clone() for name, tensor in module.named_parameters()}


def _fake_quant_modules(prepared: Any) -> dict[tuple[str, str], Any]:
    """Fake-quant modules keyed by the graph node they observe (names survive re-preparing)."""
    modules = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target.startswith("activation_post_process"):
            module = getattr(prepared, node.target)
            modules[(node.args[0].name, type(module).__name__)] = module
    return modules


def _fake_quant_states(prepared: Any) -> dict[tuple[str, str], dict]:
    return {key: {k: v.clone() for k, v in module.state_dict().items()} for key, module in _fake_quant_modules(prepared).items()}


def _quantizable_nodes(module: Any) -> Iterator[tuple[str, str, Any]]:
    """(module path, module class name, graph node) of each quantizable module's first call."""
    seen = set()
    for node in module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        path, type_name = list(stack.values())[-1]
        op_type = type_name.rsplit(".", 1)[-1]
        if QUANTIZABLE_MODULES.get(op_type) == str(node.target).split(".")[1] and path not in seen:
            seen.add(path)
            yield path, op_type, node


def _separate_repeated_calls(graph: Any) -> None:
    """Give each call of a module called more than once (torchvision's residual blocks call one
    ``self.relu`` twice) a source name of its own: the quantizer groups the nodes of one module
    path into one pattern, and one ReLU with two outputs is a pattern it refuses ("Input
    partition has more than one output node"). Only calls of modules other than the quantizable
    ones are renamed, so an op with weights keeps its one name however often it is called."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (path, type_name) = list(stack.items())[-1]
        call = key.rpartition("@")[2] if "@" in key else ""
        if call.isdigit() and type_name.rsplit(".", 1)[-1] not in QUANTIZABLE_MODULES:
            stack[key] = (f"{path}@{call}", type_name)


def _node_outputs(module: Any, nodes: dict[str, str], inputs: Any) -> dict[str, Any]:
    """Op -> the output of its graph node for one batch (node names survive quantization)."""
    import torch
    import torch.fx

    wanted = {node_name: op for op, node_name in nodes.items()}
    outputs: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node: Any) -> Any:
            result = super().run_node(node)
            if node.name in wanted:
                outputs[wanted[node.name]] = result.detach().clone()
            return result

    with torch.no_grad():
        Recorder(module).run(*_placeholder_values(module, as_call(inputs)))
    return outputs


def _macs(node: Any, weight: Any) -> int:
    """Multiply-accumulates of one conv/linear call for a single sample."""
    value = node.meta.get("val")
    if value is None or weight is None:
        return 0
    per_output = int(np.prod(weight.shape[1:]))
    output_elements = 1
    for dim in list(value.shape)[1:]:  # a dynamic length counts as in the example batch
        with contextlib.suppress(TypeError):
            output_elements *= int(getattr(getattr(dim, "node", None), "hint", None) or dim)
    return output_elements * per_output


def _to_bf16(module: Any, names: set[str]) -> None:
    """Make the named ops compute in bf16: input cast to bfloat16 before the op, weight and bias
    stored in bfloat16 (so the saved model holds them so), output cast back to float32 so the
    ops around it are untouched. Freezing then hands inductor a bf16 op with bf16 constants,
    which it lowers to oneDNN's bf16 kernel."""
    if not names:
        return
    import torch

    to_copy = torch.ops.aten._to_copy.default
    graph = module.graph
    for path, _, node in list(_quantizable_nodes(module)):
        if path not in names:
            continue
        args = list(node.args)
        with graph.inserting_before(node):
            args[0] = graph.call_function(to_copy, (args[0],), {"dtype": torch.bfloat16})
            for position in (1, 2):  # weight, bias
                if position < len(args) and args[position] is not None:
                    args[position] = _bf16_constant(module, graph, args[position])
        node.args = tuple(args)
        with graph.inserting_after(node):
            output = graph.call_function(to_copy, (node,), {"dtype": torch.float32})
        node.replace_all_uses_with(output, delete_user_cb=lambda user, cast=output: user is not cast)
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()


def _bf16_constant(module: Any, graph: Any, node: Any) -> Any:
    """A bfloat16 copy of a weight or bias, as a new attribute read by a new node (another user
    of the fp32 tensor, if any, keeps it)."""
    import torch

    if node.op != "get_attr":  # computed in the graph: cast it where it is used
        return graph.call_function(torch.ops.aten._to_copy.default, (node,), {"dtype": torch.bfloat16})
    owner_path, _, attribute = node.target.rpartition(".")
    tensor = getattr(module.get_submodule(owner_path) if owner_path else module, attribute)
    name = f"{node.target.replace('.', '_')}_bf16"
    module.register_buffer(name, tensor.detach().to(torch.bfloat16))
    return graph.get_attr(name)


def _ops_from_code(code: str, op_types: dict[str, str], config: TuneConfig, dtype: str) -> tuple[str, ...]:
    """Which ops the config puts in ``dtype`` ("int8" or "bf16") inductor really lowered so.

    An int8 op is an int8 kernel call; a bf16 op a float kernel call with a bfloat16 operand.
    Kernels of one op type are called in graph order, so when the code has one call per op of
    that type, the i-th call is the i-th op. Otherwise an op type counts only if the number of
    matching calls covers every op the config puts in ``dtype``.
    """
    lines = _call_lines(code)
    bf16_buffers = _bf16_buffers(code) if dtype == "bf16" else set()
    found: list[str] = []
    ops_by_type: dict[str, list[tuple[str, OpScheme]]] = {}
    for name, scheme in config.op_schemes:
        ops_by_type.setdefault(op_types[name], []).append((name, scheme))
    for op_type, ops in ops_by_type.items():
        int8_pattern, any_pattern = _KERNELS[op_type]
        calls = []
        for match in re.finditer(any_pattern, lines):
            is_int8 = bool(re.match(int8_pattern, match.group(0)))
            if dtype == "int8":
                calls.append(is_int8)
            else:
                operands = set(re.findall(r"\w+", lines[match.end():].split("\n", 1)[0]))
                calls.append(not is_int8 and bool(operands & bf16_buffers))
        wanted = [name for name, scheme in ops if scheme.dtype == dtype]
        if len(calls) == len(ops):
            found += [name for (name, scheme), hit in zip(ops, calls, strict=True) if hit and scheme.dtype == dtype]
        elif sum(calls) >= len(wanted):
            found += wanted
    return tuple(name for name, _ in config.op_schemes if name in found)


def _bf16_buffers(code: str) -> set[str]:
    """Names of the bfloat16 buffers in inductor's generated code."""
    names = set(re.findall(r"^\s*(\w+) = empty_strided_cpu\(.*torch\.bfloat16\)\s*$", code, re.M))
    return names | set(re.findall(r"^(\w+) = None\s+# device\(type='cpu'\) torch\.bfloat16", code, re.M))


def _call_lines(code: str) -> str:
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("#") and "assert_size_stride" not in line)



@dataclass(frozen=True)
class YamlTraining:
    """LPOT's ``quantization.train`` (or ``pruning.train``) as a training function; called on a
    model, it builds the training loader (unless given one), the optimizer and the criterion the
    section names, and trains in place. For quantization it is plain data (the YAML section), so it
    travels to Ray workers like any q_func. For pruning, which runs in the calling process,
    ``hooks`` (the pruner's) are called around each epoch and step, and the model is trained in
    train mode; a prepared QAT graph keeps the mode its quantizer set."""

    section: TrainSection
    hooks: Any = None
    loader: Any = None

    def __call__(self, model: Any) -> None:
        import torch

        from ..data import build_loader
        from ..evaluation import split_batch

        loader = self.loader if self.loader is not None else build_loader(self.section.dataloader, "quantization.train.dataloader")
        optimizer = self._optimizer(torch, model.parameters())
        criterion = self._criterion(torch)
        hooks = self.hooks or _NoHooks()
        if self.hooks is not None:
            model.train()
        try:
            for epoch in range(self.section.start_epoch, self.section.end_epoch):
                hooks.on_epoch_begin(epoch)
                for step, batch in enumerate(itertools.islice(loader, self.section.iteration)):
                    hooks.on_step_begin(step)
                    inputs, labels = split_batch(batch)
                    args, kwargs = as_call(inputs)
                    optimizer.zero_grad()
                    loss = criterion(_first_tensor(model(*args, **kwargs)), torch.as_tensor(labels).long())
                    loss.backward()
                    optimizer.step()
                    hooks.on_step_end()
                hooks.on_epoch_end()
        finally:
            if self.hooks is not None:
                model.eval()

    def _optimizer(self, torch: Any, parameters: Any) -> Any:
        (name, params), = self.section.optimizer.items()
        params = dict(params)
        learning_rate = params.pop("learning_rate", 0.01)
        if name == "SGD":
            return torch.optim.SGD(parameters, lr=learning_rate, **params)
        betas = (params.pop("beta_1", 0.9), params.pop("beta_2", 0.999))
        eps = params.pop("epsilon", 1e-8)
        return torch.optim.Adam(parameters, lr=learning_rate, betas=betas, eps=eps, **params)

    def _criterion(self, torch: Any) -> Any:
        (_, params), = self.section.criterion.items()
        reduction = str(params.get("reduction", "mean")).lower()
        return torch.nn.CrossEntropyLoss(reduction="sum" if reduction == "sum" else "mean")


class _NoHooks:
    """What a training without pruning calls around its epochs and steps: nothing."""

    def on_epoch_begin(self, epoch: int) -> None: ...

    def on_step_begin(self, step: int) -> None: ...

    def on_step_end(self) -> None: ...

    def on_epoch_end(self) -> None: ...
