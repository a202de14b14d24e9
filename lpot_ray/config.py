"""LPOT's YAML schema, validated with precise errors.

A configuration is read from a YAML file (``yaml_file.read_yaml``: safe and bounded) or given
as a dict, and validated by pydantic models that forbid unknown keys. Errors are rewritten into one ``ConfigError`` whose lines each
name the key path, the value found and what is allowed. Keys that LPOT 1.x knows but lpot_ray
does not implement yet are reported as such, so an LPOT user knows the key is not a typo.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from . import lpot_compat
from .errors import ConfigError
from .recipes import RECIPES, SMOOTH_QUANT_ALPHAS
from .yaml_file import read_yaml

DTYPES = ("int8", "uint8", "fp32", "bf16")
SCHEMES = ("sym", "asym")
GRANULARITIES = ("per_channel", "per_tensor")
ALGORITHMS = ("minmax", "kl", "percentile", "dynamic")  # dynamic: activation ranges computed per batch at run time


class Approach(str, enum.Enum):
    """How activation ranges are found: the quantization mode a tuning runs in."""

    STATIC = "post_training_static_quant"  # calibrated once on sample batches
    DYNAMIC = "post_training_dynamic_quant"  # computed per batch at run time: no calibration
    QAT = "quant_aware_training"  # learnt while the user's q_func trains the fake-quantized model

    @property
    def calibrates(self) -> bool:
        """Whether the approach needs calibration batches, not only an example batch."""
        return self is Approach.STATIC

    def __str__(self) -> str:
        return self.value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # NaN passes no comparison


class ModelSection(_Section):
    name: str = "model"
    framework: str
    path: Optional[str] = None  # a model file, for tuning from the command line


class TensorRestriction(_Section):
    """What the user allows for one tensor; each field a value or a list of values."""

    dtype: Optional[tuple[str, ...]] = None
    scheme: Optional[tuple[str, ...]] = None
    granularity: Optional[tuple[str, ...]] = None
    algorithm: Optional[tuple[str, ...]] = None

    @field_validator("dtype", "scheme", "granularity", "algorithm", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:
        value = lpot_compat.as_list(value)
        return tuple(value) if isinstance(value, list) else value

    @field_validator("dtype", "scheme", "granularity", "algorithm")
    @classmethod
    def _known_values(cls, values: Optional[tuple[str, ...]], info: ValidationInfo) -> Optional[tuple[str, ...]]:
        choices = {"dtype": DTYPES, "scheme": SCHEMES, "granularity": GRANULARITIES, "algorithm": ALGORITHMS}[info.field_name]
        for value in values or ():
            if value not in choices:
                which = f"has {value!r}, which is not" if len(values) > 1 else "must be"
                raise ValueError(f"{which} one of {', '.join(choices)}")
        return values


class OpRestriction(_Section):
    weight: Optional[TensorRestriction] = None
    activation: Optional[TensorRestriction] = None


def _one_entry(value: Optional[dict], what: str) -> Optional[dict]:
    if value is not None and len(value) != 1:
        raise ValueError(f"must name exactly one {what}, e.g. {{digits: {{split: evaluation}}}}")
    return value


class DataloaderSection(_Section):
    """LPOT's dataloader: a dataset, optional per-sample transforms and filter, a batch size."""

    batch_size: int = Field(1, ge=1)
    dataset: dict[str, Any]
    transform: Optional[dict[str, Any]] = None
    filter: Optional[dict[str, Any]] = None

    @field_validator("dataset")
    @classmethod
    def _one_dataset(cls, value: dict) -> dict:
        return _one_entry(value, "dataset")

    @field_validator("filter")
    @classmethod
    def _one_filter(cls, value: Optional[dict]) -> Optional[dict]:
        return _one_entry(value, "filter")


class PostprocessSection(_Section):
    transform: dict[str, Any]


class CalibrationSection(_Section):
    sampling_size: tuple[int, ...] = (100,)
    dataloader: Optional[DataloaderSection] = None

    @field_validator("sampling_size", mode="before")
    @classmethod
    def _positive_sizes(cls, value: Any) -> Any:
        value = lpot_compat.as_list(value)
        sizes = value if isinstance(value, list) else [value]
        sizes = [int(size) if isinstance(size, str) and size.isdigit() else size for size in sizes]
        if not sizes or not all(isinstance(size, int) and not isinstance(size, bool) and size >= 1 for size in sizes):
            raise ValueError("must be a positive integer or a list of them")
        return tuple(sizes)


OPTIMIZERS = {"SGD": {"learning_rate", "momentum", "nesterov", "weight_decay"},
              "Adam": {"learning_rate", "beta_1", "beta_2", "epsilon", "amsgrad", "weight_decay"}}
CRITERIA = {"CrossEntropyLoss": {"reduction"}}


class TrainSection(_Section):
    """LPOT's ``quantization.train``: quantization-aware training from the YAML alone (PyTorch),
    epochs ``start_epoch`` to ``end_epoch`` over ``dataloader``, at most ``iteration`` batches
    each, with one optimizer and one criterion."""

    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(1, ge=1)
    iteration: Optional[int] = Field(None, ge=1)
    dataloader: Optional[DataloaderSection] = None  # optional in LPOT too: a q_func brings its own data
    optimizer: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"SGD": {"learning_rate": 0.01}})
    criterion: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"CrossEntropyLoss": {}})

    @field_validator("optimizer", "criterion", mode="before")
    @classmethod
    def _one_known(cls, value: Any, info: Any) -> Any:
        known = OPTIMIZERS if info.field_name == "optimizer" else CRITERIA
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError(f"expected one of {', '.join(known)} with its parameters, e.g. {{{next(iter(known))}: {{}}}}")
        (name, params), = value.items()
        if name not in known:
            raise ValueError(f"unknown {info.field_name} {name!r}; known: {', '.join(known)}")
        params = params or {}
        unknown = set(params) - known[name]
        if unknown:
            raise ValueError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known[name]))}")
        return {name: params}

    @model_validator(mode="after")
    def _epochs_in_order(self) -> "TrainSection":
        if self.end_epoch <= self.start_epoch:
            raise ValueError(f"end_epoch {self.end_epoch} must be after start_epoch {self.start_epoch}")
        return self


# LPOT's pruners that lpot_ray implements (``lpot_ray.pruning``), and those it lacks.
PRUNE_TYPES = ("basic_magnitude", "pattern_lock")
LPOT_ONLY_PRUNE_TYPES = ("gradient_sensitivity", "group_lasso")


class PrunerSection(_Section):
    """One LPOT ``!Pruner``: which weights (unset: every conv and linear weight), how, and its
    own schedule where it differs from ``weight_compression``'s."""

    prune_type: str = "basic_magnitude"
    names: Optional[tuple[str, ...]] = None
    method: Literal["per_tensor", "per_channel"] = "per_tensor"
    initial_sparsity: Optional[float] = Field(None, ge=0, lt=1)
    target_sparsity: Optional[float] = Field(None, ge=0, lt=1)
    start_epoch: Optional[int] = Field(None, ge=0)
    end_epoch: Optional[int] = Field(None, ge=0)
    update_frequency: float = Field(1.0, gt=0)
    parameters: Optional[dict[str, Any]] = None  # read only by LPOT's gradient_sensitivity and group_lasso

    @field_validator("prune_type")
    @classmethod
    def _implemented(cls, value: str) -> str:
        if value in LPOT_ONLY_PRUNE_TYPES:
            raise ValueError(f"is an LPOT option lpot_ray does not support yet; it prunes with {' and '.join(PRUNE_TYPES)}")
        if value not in PRUNE_TYPES:
            raise ValueError(f"is not a pruner; expected one of {', '.join(PRUNE_TYPES)}")
        return value

    @field_validator("names", mode="before")
    @classmethod
    def _unique_names(cls, value: Any) -> Any:
        value = lpot_compat.as_list(value)
        return tuple(dict.fromkeys(value)) if isinstance(value, list) else value


class WeightCompression(_Section):
    """LPOT's ``pruning.approach.weight_compression``: the schedule every pruner follows unless
    it sets its own, and the pruners."""

    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    target_sparsity: float = Field(0.97, ge=0, lt=1)
    start_epoch: int = Field(0, ge=0)
    end_epoch: int = Field(4, ge=0)
    pruners: tuple[PrunerSection, ...]

    @field_validator("pruners")
    @classmethod
    def _some(cls, value: tuple[PrunerSection, ...]) -> tuple[PrunerSection, ...]:
        if not value:
            raise ValueError("names no pruner; give at least one !Pruner")
        return value


class PruningApproach(_Section):
    weight_compression: WeightCompression


class PruningSection(_Section):
    """LPOT's ``pruning``: weights zeroed by magnitude while the model trains (``lpot_ray.Pruning``),
    by the user's training function or by ``train`` from the YAML alone."""

    approach: PruningApproach
    train: Optional[TrainSection] = None


class SmoothQuantArgs(_Section):
    alpha: tuple[float, ...] = SMOOTH_QUANT_ALPHAS  # Neural Compressor's key; a list is searched

    @field_validator("alpha", mode="before")
    @classmethod
    def _alphas(cls, value: Any) -> Any:
        alphas = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else lpot_compat.as_list(value)
        if isinstance(alphas, list):  # LPOT's list string: '0.5, 0.75'
            with contextlib.suppress(ValueError):
                alphas = [float(alpha) if isinstance(alpha, str) else alpha for alpha in alphas]
        if not isinstance(alphas, (list, tuple)) or not alphas or not all(
                isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0 < alpha < 1 for alpha in alphas):
            raise ValueError("must be a number in (0, 1) or a list of them, e.g. 0.5")
        return tuple(float(alpha) for alpha in alphas)


class RecipesSection(_Section):
    """Which accuracy-recovery recipes the search may use (``lpot_ray.recipes``): unset, it tries
    each one the adaptor offers with and without; true, always; false, never."""

    cross_layer_equalization: Optional[bool] = None
    smooth_quant: Optional[bool] = None
    smooth_quant_args: SmoothQuantArgs = SmoothQuantArgs()
    fast_bias_correction: Optional[bool] = None

    def wanted(self) -> dict[str, Optional[bool]]:
        return {name: getattr(self, name) for name in RECIPES}


class QuantizationSection(_Section):
    approach: Approach = Approach.STATIC
    recipes: RecipesSection = RecipesSection()
    # bf16 where the CPU computes it natively. true: a per-op choice between int8 and fp32 in the
    # search; unset: not searched, but the chosen config's fp32 fallback ops are compiled in bf16
    # too at the end and kept so if that passes and runs faster (on small models the casts around
    # a bf16 op cost more than its kernel saves); false: never.
    use_bf16: Optional[bool] = None
    train: Optional[TrainSection] = None  # quant_aware_training without a q_func
    calibration: CalibrationSection = CalibrationSection()
    model_wise: OpRestriction = OpRestriction()
    op_wise: dict[str, OpRestriction] = Field(default_factory=dict)

    @field_validator("recipes", mode="before")
    @classmethod
    def _all_off_for_false(cls, value: Any) -> Any:
        """``recipes: false`` turns every recipe off (the search then falls back ops at once)."""
        if value is False:
            return dict.fromkeys(RECIPES, False)
        if value is True:
            raise ValueError(f"expected false (no recipe) or a mapping of recipe names ({', '.join(RECIPES)}) to "
                             "true (always) or false (never); unset, each is tried with and without")
        return value

    @field_validator("op_wise")
    @classmethod
    def _valid_patterns(cls, value: dict[str, OpRestriction]) -> dict[str, OpRestriction]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"op name pattern {pattern!r} is not a valid regular expression ({error})") from None
        return value


class AccuracySection(_Section):
    metric: Optional[dict[str, Any]] = None
    dataloader: Optional[DataloaderSection] = None
    postprocess: Optional[PostprocessSection] = None

    @field_validator("metric")
    @classmethod
    def _one_metric(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        if value is not None and len(value) != 1:
            raise ValueError("must name exactly one metric, e.g. {topk: 1}")
        return value


class InstanceConfigs(_Section):
    """LPOT's ``evaluation.performance.configs``: benchmark instances run at once, each on its
    own cores (``cores_per_instance`` defaults to the usable cores shared out evenly)."""

    cores_per_instance: Optional[int] = Field(None, ge=1)
    num_of_instance: int = Field(1, ge=1)


class PerformanceSection(_Section):
    """LPOT's ``evaluation.performance``: ``warmup`` untimed batches, then ``iteration`` timed
    ones (-1: one pass over the dataloader) in each instance."""

    warmup: int = Field(5, ge=0)
    iteration: int = -1
    configs: InstanceConfigs = InstanceConfigs()
    dataloader: Optional[DataloaderSection] = None
    postprocess: Optional[PostprocessSection] = None

    @field_validator("iteration")
    @classmethod
    def _iterations(cls, value: int) -> int:
        if value == 0 or value < -1:
            raise ValueError("must be -1 (one pass over the dataloader) or a positive number of batches")
        return value


class EvaluationSection(_Section):
    accuracy: AccuracySection = AccuracySection()
    performance: Optional[PerformanceSection] = None


class StrategySection(_Section):
    name: str = "basic"


class AccuracyCriterion(_Section):
    relative: Optional[float] = None
    absolute: Optional[float] = None
    higher_is_better: bool = True

    @field_validator("relative")
    @classmethod
    def _relative_range(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    @field_validator("absolute")
    @classmethod
    def _absolute_range(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and value < 0:
            raise ValueError("must be >= 0")
        return value

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            if raw.get("relative") is not None and raw.get("absolute") is not None:
                raise ValueError("give either relative or absolute, not both")
            if raw.get("relative") is None and raw.get("absolute") is None:
                return {**raw, "relative": 0.01}
        return raw


class ExitPolicy(_Section):
    timeout: float = Field(0, ge=0)
    max_trials: int = Field(100, ge=1)
    performance_only: bool = False  # LPOT's: quantize with the default config, no accuracy tuning
    # Seconds a trial (and the fp32 baseline) may run before it is recorded failed and its worker
    # freed. None: derived from the baseline's evaluation time; 0: no limit. lpot_ray's own key.
    trial_timeout: Optional[float] = Field(None, ge=0)
    # Stop a trial whose verdict alone matters (basic's and mse's fallback prefixes) once the
    # criterion is out of reach, exactly: verdicts stay those of full evaluations. lpot_ray's own key.
    early_stopping: bool = True


class WorkspaceSection(_Section):
    path: str = "./lpot_ray_workspace"
    resume: Optional[str] = None


class MultiObjectives(_Section):
    """LPOT's ``tuning.multi_objectives``: several objectives and their weights."""

    objective: tuple[str, ...]
    weight: Optional[tuple[float, ...]] = None

    @model_validator(mode="after")
    def _weights_match(self) -> "MultiObjectives":
        if not self.objective:
            raise ValueError("objective must name at least one objective")
        if self.weight is not None:
            if len(self.weight) != len(self.objective):
                raise ValueError(f"weight has {len(self.weight)} values for {len(self.objective)} objectives")
            if any(weight < 0 for weight in self.weight) or sum(self.weight) <= 0:
                raise ValueError("weight values must be >= 0 with a positive sum")
        return self


class TuningSection(_Section):
    strategy: StrategySection = StrategySection()
    accuracy_criterion: AccuracyCriterion = AccuracyCriterion()
    objective: str = "performance"
    multi_objectives: Optional[MultiObjectives] = None
    exit_policy: ExitPolicy = ExitPolicy()
    random_seed: int = 1978
    workspace: WorkspaceSection = WorkspaceSection()


class RaySection(_Section):
    address: Optional[str] = None
    workers: Optional[int] = Field(None, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)  # custom Ray resources, e.g. {accelerator_x: 1}
    worker_start_timeout: float = Field(300, gt=0)  # seconds a worker may wait for a node before it is dropped

    @field_validator("resources_per_worker")
    @classmethod
    def _custom_resources(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if name in ("CPU", "GPU"):
                raise ValueError(f"names {name}, which Ray counts itself; use cpus_per_worker for CPUs (GPUs are not used)")
            if not name.strip():
                raise ValueError("has an empty resource name")
            if amount <= 0:
                raise ValueError(f"gives {name!r} {amount}; each amount must be > 0")
        return value


class Config(_Section):
    """A whole tuning configuration, LPOT-compatible."""

    version: str = "1.0"

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: Any) -> Any:
        text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        if text not in ("1", "1.0"):
            raise ValueError("is not an LPOT 1.x configuration version; lpot_ray reads version 1.0")
        return "1.0"
    model: ModelSection
    device: Literal["cpu"] = "cpu"
    quantization: QuantizationSection = QuantizationSection()
    pruning: Optional[PruningSection] = None
    evaluation: EvaluationSection = EvaluationSection()
    tuning: TuningSection = TuningSection()
    ray: RaySection = RaySection()


def load_config(source: Union[Config, dict, str, os.PathLike]) -> Config:
    """Read a configuration from a YAML path, a dict or an existing ``Config``."""
    if isinstance(source, Config):
        return source
    origin = "configuration"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"{path}: configuration file not found")
        source = read_yaml(path)
    if not isinstance(source, dict):
        raise ConfigError(f"{origin}: must be a mapping of sections, got {type(source).__name__}")
    source = lpot_compat.adapt(source, origin)
    try:
        return Config.model_validate(source)
    except ValidationError as error:
        raise ConfigError(_describe(error, origin)) from None


def _describe(error: ValidationError, origin: str) -> str:
    lines = []
    for problem in error.errors():
        path = ".".join(str(part) for part in problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            lines.append(f"`{path}` is not a known key{_allowed_keys(problem['loc'])}")
        elif problem["type"] == "missing":
            lines.append(f"`{path}` is required")
        else:
            lines.append(f"`{path}`: {problem['input']!r} {message[0].lower()}{message[1:]}")
    return f"{origin}: " + "; ".join(lines)


def _allowed_keys(loc: tuple) -> str:
    """The keys the section holding ``loc``'s last key accepts (walking op_wise's patterns too)."""
    section: Any = Config
    parts = list(loc[:-1])
    while parts:
        part = parts.pop(0)
        fields = getattr(section, "model_fields", None)
        if fields is None or part not in fields:
            return ""
        annotation = fields[part].annotation
        if typing.get_origin(annotation) is dict:  # op_wise: the next part is a pattern
            annotation = typing.get_args(annotation)[1]
            parts = parts[1:]
        section = next((arg for arg in typing.get_args(annotation) or (annotation,) if hasattr(arg, "model_fields")), annotation)
    fields = getattr(section, "model_fields", None)
    return f"; allowed here: {', '.join(fields)}" if fields else ""
