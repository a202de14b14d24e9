"""The contract between lpot_ray and one framework.

The driver uses an adaptor to validate and serialise the user's model (``prepare``), to list what
can be quantized (``capabilities``) and to measure the fp32 baseline. Workers use it to rebuild the
model from bytes (``load``), quantize it for a candidate config, run it on batches, and lower the
chosen config to the framework's real int8 kernels. Framework imports live inside each adaptor.
"""

from __future__ import annotations

import collections.abc
import contextlib
import logging
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from ..config import Approach, TrainSection
from ..errors import ConfigError, DataError, ModelError
from ..recipes import CROSS_LAYER_EQUALIZATION
from ..space import Op, OpCapability, TuneConfig

log = logging.getLogger("lpot_ray")


@dataclass(frozen=True)
class Lowered:
    """A quantized model compiled to the framework's kernels, and what really runs int8 (and
    bf16, for an adaptor that offers it) there."""

    model: Any
    int8_ops: tuple[str, ...]
    fp32_ops: tuple[str, ...]
    bf16_ops: tuple[str, ...] = ()


class Adaptor(ABC):
    """One framework's view of models, quantization and measurement."""

    framework: str = ""
    model_file: str = "model.bin"  # what ``TuneResult.save`` names the quantized model's file
    # The ``quantization.approach`` values this framework can do.
    approaches: tuple[Approach, ...] = (Approach.STATIC,)
    # The tuning's approach (``for_approach`` sets it, in the driver and on every worker):
    # ``capabilities`` offers the schemes of this approach, and an adaptor whose payload depends
    # on it (TensorFlow converts to a dynamic-range model as well) reads it in ``prepare``.
    approach: Approach = Approach.STATIC
    # Forward passes and seconds spent calibrating, summed over this adaptor's life: a trial's
    # share is the difference across it (and proves that cached statistics are reused).
    calibration_passes: int = 0
    calibration_seconds: float = 0.0

    def recipes(self, model: Any) -> tuple[str, ...]:
        """The accuracy-recovery recipes (``lpot_ray.recipes``) that ``quantize`` applies to the
        loaded ``model`` under this adaptor's approach when a config names them, and that can
        change something there (no equalization for a model without a pair to equalize)."""
        return ()

    @staticmethod
    def offers_equalization(finds_a_pair: Callable[[], bool]) -> tuple[str, ...]:
        """``recipes`` of an adaptor whose one recipe is equalization: offered where
        ``finds_a_pair()``; a graph the recipe can't read is tuned without it, with a warning."""
        try:
            return (CROSS_LAYER_EQUALIZATION,) if finds_a_pair() else ()
        except Exception as error:
            log.warning("recipes: equalization is off for this model (%s: %s)", type(error).__name__, error)
            return ()

    _equalized: Optional[weakref.WeakKeyDictionary] = None  # per fp32 model: the model equalized

    def equalized(self, model: Any, config: TuneConfig, equalize: Callable[[Any], Any]) -> Any:
        """The fp32 model as ``config`` quantizes it: ``equalize(model)`` if the config names
        equalization, computed once per model (and so calibrated once), else ``model``."""
        if CROSS_LAYER_EQUALIZATION not in config.recipes:
            return model
        if self._equalized is None:
            self._equalized = weakref.WeakKeyDictionary()
        if model not in self._equalized:
            self._equalized[model] = equalize(model)
        return self._equalized[model]

    @classmethod
    def for_approach(cls, approach: Approach) -> "Adaptor":
        """An adaptor working in ``approach``: how the driver and the workers make theirs."""
        adaptor = cls()
        adaptor.approach = Approach(approach)
        return adaptor

    @classmethod
    def training_from_yaml(cls, section: TrainSection, hooks: Any = None, loader: Any = None) -> Any:
        """A ``q_func`` that trains as LPOT's ``quantization.train`` section says (plain data, so
        that it travels to workers); for pruning, with the pruning hooks and its loader."""
        raise ConfigError(f"`quantization.train`: the {cls.framework} adaptor can't train from the YAML; pass q_func")

    def weights(self, model: Any) -> Any:
        """The model's conv and linear weights as ``pruning.Weights``: read as numpy, masked in place."""
        raise ConfigError(f"`pruning`: the {self.framework} adaptor can't prune models")

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """Time a calibration pass into ``calibration_seconds`` (the adaptor counts the passes)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.calibration_seconds += time.perf_counter() - started

    def set_threads(self, threads: int) -> int:
        """Set the framework's intra-op threads for this process; return the previous count.

        Ray sets OMP_NUM_THREADS=1 in workers, so each worker sets its own ``cpus_per_worker``.
        """
        return threads

    # --- driver side -------------------------------------------------------------------------
    def warm_up_lowering(self) -> None:
        """Start, in the background, the one-off work the driver's first ``lower`` would do, so
        that it overlaps the search instead of lengthening the end of the tuning."""

    # Optional abilities: an adaptor without them says so with the key that asked for them.
    def load_file(self, path: str) -> Any:
        """Read a model from a file named in the YAML (``model.path``)."""
        raise ModelError(f"model.path: the {self.framework} adaptor reads no model files; "
                         "pass the model object to lpot_ray.tune() instead")

    @abstractmethod
    def prepare(self, model: Any, example_inputs: Any) -> bytes:
        """Check the user's model and serialise it for workers (raise ModelError saying why not)."""

    # --- both sides --------------------------------------------------------------------------
    @abstractmethod
    def load(self, payload: bytes) -> Any:
        """Rebuild the fp32 model from ``prepare``'s bytes."""

    @abstractmethod
    def weights_digest(self, model: Any) -> str:
        """A hash of the fp32 weights: part of the history's fingerprint."""

    @abstractmethod
    def capabilities(self, model: Any) -> list[OpCapability]:
        """Quantizable ops in model order and the int8 schemes of ``self.approach`` that really
        lower for each (and bf16 where the framework computes it)."""

    @abstractmethod
    def quantize(self, model: Any, config: TuneConfig, calibration: Sequence[Any]) -> Any:
        """The model quantized per ``config``, calibrated on the first ``sampling_size`` samples."""

    def quantize_aware(self, model: Any, config: TuneConfig, q_func: Any, calibration: Sequence[Any]) -> Any:
        """The model prepared for quantization-aware training per ``config`` (fake-quantized int8
        ops), trained by the user's ``q_func(prepared_model)``, then converted to int8."""
        raise ConfigError(f"`quantization.approach`: the {self.framework} adaptor can't do quant_aware_training")

    def inspect_tensors(self, model: Any, config: TuneConfig, calibration: Sequence[Any]) -> dict[str, float]:
        """Each int8 op's output error against fp32 (normalised MSE), that op alone quantized as
        ``config`` says, so that an op is not blamed for the errors of the ops before it."""
        raise ConfigError(f"`tuning.strategy.name`: the {self.framework} adaptor can't inspect tensors, "
                          "which this strategy needs; choose basic or bayesian")

    @classmethod
    def can_inspect_tensors(cls) -> bool:
        return cls.inspect_tensors is not Adaptor.inspect_tensors

    @abstractmethod
    def predict(self, model: Any, inputs: Any) -> np.ndarray:
        """Run a batch; the output as numpy for the built-in metrics."""

    def baseline_model(self, user_model: Any, loaded: Any) -> Any:
        """What the fp32 baseline is measured on: the user's model, or ``load``'s rebuild of it
        where that is what the quantized models run beside (e.g. the same interpreter)."""
        return user_model

    def predict_outputs(self, model: Any, inputs: Any) -> list:
        """Every output of the model for one batch, for a metric that reads them all (a
        detector's boxes, scores and classes); an adaptor that can't give them gives the first."""
        return [self.predict(model, inputs)]

    def reference(self, loaded: Any) -> Any:
        """The loaded fp32 model in the form ``predict`` runs: what a quantized model's outputs
        are compared with where the metric compares outputs (LPOT's ``compare_label: false``)."""
        return loaded

    def user_model(self, model: Any) -> Any:
        """What a user's ``eval_func`` receives for a quantized ``model``."""
        return model

    @abstractmethod
    def lower(self, model: Any, ops: Sequence[Op], config: TuneConfig, example_inputs: Any) -> Lowered:
        """Compile the quantized model to real int8 kernels and read back which ops run int8."""

    @abstractmethod
    def lower_fp32(self, model: Any, example_inputs: Any) -> Any:
        """The fp32 model compiled the same way, for a fair latency comparison."""

    @abstractmethod
    def serialize(self, model: Any, example_inputs: Any) -> bytes:
        """A quantized model as bytes, to move it between processes or save it."""

    @abstractmethod
    def deserialize(self, payload: bytes) -> Any:
        """The inverse of ``serialize``: a runnable quantized model."""

    def save_model(self, payload: bytes, folder: Path) -> None:
        """Write ``serialize``'s bytes into ``folder`` as the framework's own files, so that its
        tools read the saved model without lpot_ray."""
        (folder / self.model_file).write_bytes(payload)

    def read_model(self, folder: Path) -> bytes:
        """The inverse of ``save_model``: the bytes ``deserialize`` takes."""
        path = folder / self.model_file
        if not path.is_file():
            raise ModelError(f"{folder}: no {self.model_file} in this saved {self.framework} model")
        return path.read_bytes()

    @staticmethod
    def batch_size(inputs: Any) -> int:
        """The samples in one batch's inputs: the length of its first tensor, or of a mapping's
        first value (a tokenizer's batch, whose own length is its number of keys)."""
        if isinstance(inputs, collections.abc.Mapping):
            inputs = next(iter(inputs.values()), ())
        return len(inputs[0] if isinstance(inputs, (tuple, list)) else inputs)


def take_samples(batches: Sequence[Any], sampling_size: int) -> list:
    """The calibration batches holding the first ``sampling_size`` samples (at least one batch)."""
    taken, seen = [], 0
    for inputs in batches:
        if seen >= sampling_size:
            break
        taken.append(inputs)
        seen += Adaptor.batch_size(inputs)
    if not taken:
        raise DataError("calibration loader: yielded no batches")
    return taken
