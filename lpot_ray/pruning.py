"""LPOT's pruning: weights zeroed by magnitude while the model trains.

``Pruning(conf)`` is LPOT 1.x's entry point. A pruner's schedule is plain arithmetic
(``PrunerPlan.sparsity_at``) and its masks are numpy (``magnitude_mask``), so both are tested
without a framework; the adaptor reads and masks the weights (``Adaptor.weights``). The training
is the user's ``train_func(model)``, which calls the hooks LPOT's examples call
(``on_epoch_begin(epoch)``, ``on_step_begin(step)``, ``on_step_end()``, ``on_epoch_end()``; the
``on_batch_*`` names too), or LPOT's ``pruning.train`` from the YAML alone.

Pruning is one training run, not a search: it runs in the calling process, not on Ray workers.
A pruned model is then quantized like any other (``lpot_ray.tune``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import numpy as np

from . import inputs, registry
from .config import Config, PrunerSection, WeightCompression, load_config
from .criterion import Criterion
from .data import build_loader
from .errors import ConfigError

log = logging.getLogger("lpot_ray")

BASIC_MAGNITUDE, PATTERN_LOCK = "basic_magnitude", "pattern_lock"


class Weights(Protocol):
    """A framework's view of a model's prunable weights (conv and linear), by parameter name."""

    def names(self) -> tuple[str, ...]: ...

    def read(self, name: str) -> np.ndarray: ...

    def set_mask(self, name: str, keep: np.ndarray) -> None:
        """From now on ``name`` keeps only its weights where ``keep`` is True; applied at once."""

    def apply_masks(self) -> None:
        """Zero the masked weights again (an optimizer step has moved them)."""


@dataclass(frozen=True)
class PrunerPlan:
    """One pruner with its schedule resolved against ``weight_compression``'s defaults."""

    prune_type: str
    names: tuple[str, ...]
    per_channel: bool
    initial_sparsity: float
    target_sparsity: float
    start_epoch: int
    end_epoch: int
    update_frequency: float

    @classmethod
    def resolve(cls, pruner: PrunerSection, defaults: WeightCompression, names: tuple[str, ...]) -> "PrunerPlan":
        def own_or_default(key: str) -> Any:
            value = getattr(pruner, key)
            return getattr(defaults, key) if value is None else value

        return cls(prune_type=pruner.prune_type, names=names, per_channel=pruner.method == "per_channel",
                   initial_sparsity=own_or_default("initial_sparsity"), target_sparsity=own_or_default("target_sparsity"),
                   start_epoch=own_or_default("start_epoch"), end_epoch=own_or_default("end_epoch"),
                   update_frequency=pruner.update_frequency)

    def sparsity_at(self, epoch: int) -> float:
        """LPOT 1.x's schedule (its ``Pruner.update_sparsity``): none before ``start_epoch``;
        from ``initial_sparsity`` toward ``target_sparsity`` in a step every ``update_frequency``
        epochs, reaching it in ``end_epoch`` when the frequency divides the span, and kept after.
        As in LPOT, a pruner whose start and end epochs are one prunes to ``initial_sparsity``."""
        if self.start_epoch == self.end_epoch:
            return self.initial_sparsity
        if epoch < self.start_epoch:
            return 0.0
        if epoch > self.end_epoch:
            return self.target_sparsity
        reached = math.floor((epoch - self.start_epoch) / self.update_frequency) * self.update_frequency
        return self.initial_sparsity + (self.target_sparsity - self.initial_sparsity) * reached / (self.end_epoch - self.start_epoch)

    def recomputes_in(self, epoch: int) -> bool:
        """A magnitude pruner recomputes its masks in each epoch of its schedule; pattern lock keeps
        the zeros the model came with."""
        return self.prune_type == BASIC_MAGNITUDE and self.start_epoch <= epoch <= self.end_epoch


def magnitude_mask(weight: np.ndarray, sparsity: float, per_channel: bool = False) -> np.ndarray:
    """True where a weight is kept: the ``round(n * sparsity)`` smallest in magnitude are pruned,
    over the whole tensor or within each output channel (the first dimension)."""
    magnitudes = np.abs(weight).reshape(weight.shape[0] if per_channel else 1, -1)
    pruned = int(round(magnitudes.shape[1] * sparsity))
    keep = np.ones(magnitudes.shape, dtype=bool)
    if pruned:
        smallest = np.argsort(magnitudes, axis=1, kind="stable")[:, :pruned]
        np.put_along_axis(keep, smallest, False, axis=1)
    return keep.reshape(weight.shape)


def plans_for(config: Config, weights: Weights) -> list[PrunerPlan]:
    """Each ``!Pruner`` of the configuration with its weights found in the model; a name the
    model lacks, or a weight two pruners claim, is a ConfigError naming it."""
    compression = config.pruning.approach.weight_compression
    available = weights.names()
    plans, claimed = [], {}
    for index, pruner in enumerate(compression.pruners):
        where = f"`pruning.approach.weight_compression.pruners.{index}.names`"
        names = pruner.names if pruner.names is not None else available
        missing = [name for name in names if name not in available]
        if missing:
            raise ConfigError(f"{where}: {', '.join(map(repr, missing))} not among the model's conv and linear weights "
                              f"({_some(available)})")
        for name in names:
            if name in claimed:
                raise ConfigError(f"{where}: {name!r} is pruned by pruner {claimed[name]} too; name each weight once")
            claimed[name] = index
        plan = PrunerPlan.resolve(pruner, compression, tuple(names))
        where = f"`pruning.approach.weight_compression.pruners.{index}`"
        if plan.start_epoch > plan.end_epoch:
            raise ConfigError(f"{where}: start_epoch {plan.start_epoch} is after end_epoch {plan.end_epoch}; "
                              "it would never prune")
        if plan.initial_sparsity > plan.target_sparsity:
            raise ConfigError(f"{where}: initial_sparsity {plan.initial_sparsity} is above target_sparsity "
                              f"{plan.target_sparsity}; the sparsity only rises")
        plans.append(plan)
    return plans


def _some(names: Sequence[str], shown: int = 6) -> str:
    listed = ", ".join(names[:shown])
    return f"{listed}, ... ({len(names)} in all)" if len(names) > shown else listed or "none"


class Pruners:
    """The hooks a training loop calls, applying every plan's masks to the weights."""

    def __init__(self, plans: list[PrunerPlan], weights: Weights):
        self.plans, self.weights = plans, weights
        self.epochs_begun = 0
        for plan in plans:
            if plan.prune_type == PATTERN_LOCK:
                for name in plan.names:
                    weights.set_mask(name, weights.read(name) != 0)

    def on_epoch_begin(self, epoch: int) -> None:
        self.epochs_begun += 1
        for plan in self.plans:
            if plan.recomputes_in(epoch):
                sparsity = plan.sparsity_at(epoch)
                for name in plan.names:
                    self.weights.set_mask(name, magnitude_mask(self.weights.read(name), sparsity, plan.per_channel))

    def on_step_begin(self, step: int = 0) -> None:
        self.weights.apply_masks()

    def on_step_end(self) -> None:
        self.weights.apply_masks()

    def on_epoch_end(self) -> None:
        self.weights.apply_masks()

    def sparsity(self) -> dict[str, float]:
        """The fraction of zeros in each pruned weight."""
        return {name: float(np.mean(self.weights.read(name) == 0)) for plan in self.plans for name in plan.names}


@dataclass
class PruningResult:
    """The pruned model (the one passed, trained in place), how sparse each pruned weight is, and
    its accuracy beside the unpruned model's where an evaluation was given."""

    model: Any
    sparsity: dict[str, float]
    accuracy: Optional[float] = None
    baseline_accuracy: Optional[float] = None
    passed: Optional[bool] = None  # the tuning's accuracy criterion, against the unpruned model
    sizes: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def overall_sparsity(self) -> float:
        """Zeros over all pruned weights, each counted by its size."""
        total = sum(self.sizes.values())
        return sum(self.sparsity[name] * size for name, size in self.sizes.items()) / total if total else 0.0


class Pruning:
    """LPOT's ``Pruning(conf)``: set ``model``, then ``train_func`` (LPOT 1.x also calls it
    ``pruning_func``) or the YAML's ``pruning.train``, and ``eval_func`` or ``eval_dataloader``
    (or the YAML's) to measure accuracy; calling it prunes the model while it trains."""

    def __init__(self, conf: Union[Config, dict, str, os.PathLike]):
        self.config = load_config(conf)
        if self.config.pruning is None:
            raise ConfigError("configuration: Pruning needs a `pruning` section "
                              "(`pruning.approach.weight_compression.pruners`)")
        self.model: Any = None
        self.train_func: Optional[Callable[[Any], Any]] = None
        self.train_dataloader: Any = None
        self.eval_func: Optional[Callable[[Any], float]] = None
        self.eval_dataloader: Any = None
        self._pruners: Optional[Pruners] = None

    @property
    def pruning_func(self) -> Optional[Callable[[Any], Any]]:
        return self.train_func

    @pruning_func.setter
    def pruning_func(self, function: Optional[Callable[[Any], Any]]) -> None:
        self.train_func = function

    # --- the hooks a train_func calls ------------------------------------------------------------
    def on_epoch_begin(self, epoch: int) -> None:
        self._active().on_epoch_begin(epoch)

    def on_step_begin(self, step: int = 0) -> None:
        self._active().on_step_begin(step)

    def on_step_end(self) -> None:
        self._active().on_step_end()

    def on_epoch_end(self) -> None:
        self._active().on_epoch_end()

    on_batch_begin, on_batch_end = on_step_begin, on_step_end

    def _active(self) -> Pruners:
        if self._pruners is None:
            raise ConfigError("Pruning: a hook was called while this Pruning object is not running; its hooks "
                              "work only inside the train_func it calls (pruner() runs it): call the hooks of the "
                              "object you called")
        return self._pruners

    # --- running ---------------------------------------------------------------------------------
    def __call__(self) -> PruningResult:
        config = self.config
        if self.model is None:
            raise ConfigError("Pruning.model: set the model to prune first")
        adaptor = registry.adaptors.get(config.model.framework)()
        weights = adaptor.weights(self.model)
        plans = plans_for(config, weights)  # a mistake in the pruners is named before any evaluation
        train = self._training(adaptor)
        evaluation = self._evaluation()
        baseline = evaluation.measure(adaptor, self.model).value if evaluation is not None else None
        self._pruners = pruners = Pruners(plans, weights)
        try:
            train(self.model)
        finally:
            self._pruners = None
        if pruners.epochs_begun == 0 and any(plan.prune_type == BASIC_MAGNITUDE for plan in pruners.plans):
            raise ConfigError("Pruning.train_func: it never called on_epoch_begin(epoch), so no weight was pruned; "
                              "call the Pruning object's hooks from the training loop (see README, Pruning)")
        weights.apply_masks()
        sparsity = pruners.sparsity()
        accuracy = evaluation.measure(adaptor, self.model).value if evaluation is not None else None
        passed = None
        if baseline is not None:
            criterion = Criterion.from_config(baseline, config.tuning.accuracy_criterion,
                                              inputs.higher_is_better(config, evaluation))
            passed = criterion.passes(accuracy)
        sizes = {name: int(weights.read(name).size) for name in sparsity}
        result = PruningResult(self.model, sparsity, accuracy, baseline, passed, sizes)
        log.info("pruned %d weights to %.1f%% zeros%s", len(sparsity), 100 * result.overall_sparsity,
                 f"; accuracy {accuracy:.4f} (unpruned {baseline:.4f})" if baseline is not None else "")
        return result

    def _training(self, adaptor: Any) -> Callable[[Any], Any]:
        """The user's train_func, else the YAML's ``pruning.train`` run with this object's hooks."""
        if self.train_func is not None:
            if not callable(self.train_func):
                raise ConfigError(f"Pruning.train_func: expected a function model -> None, got {type(self.train_func).__name__}")
            return self.train_func
        section = self.config.pruning.train
        if section is None:
            raise ConfigError("Pruning: set train_func(model), a training loop that calls the Pruning object's hooks, "
                              "or give `pruning.train` in the YAML")
        if section.dataloader is None and self.train_dataloader is None:
            raise ConfigError("`pruning.train.dataloader`: training from the YAML needs the data to train on; give it, "
                              "or set Pruning.train_dataloader")
        loader = self.train_dataloader
        if loader is None:
            loader = build_loader(section.dataloader, "pruning.train.dataloader", framework=self.config.model.framework)
        return adaptor.training_from_yaml(section, hooks=self, loader=loader)

    def _evaluation(self) -> Any:
        """What measures accuracy, if anything was given: an evaluation is optional when pruning."""
        _, eval_dataloader = inputs.yaml_loaders(self.config, None, self.eval_dataloader, self.eval_func)
        if self.eval_func is None and (eval_dataloader is None or self.config.evaluation.accuracy.metric is None):
            return None
        return inputs.evaluation_from(self.config, eval_dataloader, self.eval_func)
