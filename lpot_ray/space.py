"""The quantization search space as plain data.

An adaptor says what each op can do under the tuning's approach (``OpCapability``); the user's ``model_wise`` / ``op_wise``
restrictions narrow that down; the result is a ``TuningSpace``: for every op, the ordered list of
``OpScheme`` choices: int8 schemes first, then bf16 where the adaptor offers it, fp32 fallback
always last (LPOT falls back int8 -> bf16 -> fp32). A candidate is a ``TuneConfig``: one scheme per op
plus the calibration sampling size and the accuracy-recovery recipes applied first (``recipes``),
immutable and identified by a stable ``key``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional

from .config import Approach, OpRestriction, QuantizationSection, TensorRestriction
from .errors import ConfigError, SpaceError
from .recipes import name_of, order, recipe_sets


# Activation calibrations searched only where the YAML names them (``activation.algorithm``):
# each would add a model-wise trial to every tuning, for the rare model whose calibration data
# holds stray values.
OPT_IN_ALGORITHMS = frozenset({"percentile"})


@dataclass(frozen=True)
class TensorScheme:
    """How one tensor (weight or activation) is quantized."""

    dtype: str = "int8"
    scheme: str = "sym"
    granularity: str = "per_tensor"
    algorithm: str = "minmax"

    def allowed_by(self, restriction: Optional[TensorRestriction]) -> bool:
        if restriction is None:
            return True
        # A float tensor has no quantization parameters: only its dtype can be restricted.
        names = ("dtype",) if self.dtype in FLOAT_DTYPES else ("dtype", "scheme", "granularity", "algorithm")
        return all(getattr(restriction, name) is None or getattr(self, name) in getattr(restriction, name) for name in names)


@dataclass(frozen=True)
class OpScheme:
    """One choice for one op: its weight and activation schemes; both None means fp32, both bf16
    tensors (``BF16``) means the op computes in bf16."""

    weight: Optional[TensorScheme] = None
    activation: Optional[TensorScheme] = None

    @property
    def is_fp32(self) -> bool:
        return self.weight is None and self.activation is None

    @property
    def dtype(self) -> str:
        """What the op computes in: "int8" (uint8 activations included), "bf16" or "fp32"."""
        if self.is_fp32:
            return "fp32"
        tensors = [tensor for tensor in (self.weight, self.activation) if tensor is not None]
        return "bf16" if all(tensor.dtype == "bf16" for tensor in tensors) else "int8"

    def to_dict(self) -> dict:
        if self.dtype in ("fp32", "bf16"):
            return {"dtype": self.dtype}
        return {
            "weight": None if self.weight is None else vars(self.weight).copy(),
            "activation": None if self.activation is None else vars(self.activation).copy(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "OpScheme":
        if data.get("dtype") == "fp32":
            return FP32
        if data.get("dtype") == "bf16":
            return BF16
        return cls(
            weight=None if data.get("weight") is None else TensorScheme(**data["weight"]),
            activation=None if data.get("activation") is None else TensorScheme(**data["activation"]),
        )

    def describe(self) -> str:
        if self.dtype in ("fp32", "bf16"):
            return self.dtype
        parts = []
        for role, tensor in (("w", self.weight), ("a", self.activation)):
            if tensor is not None:
                parts.append(f"{role}:{tensor.dtype}/{tensor.scheme}/{tensor.granularity}/{tensor.algorithm}")
        return " ".join(parts)


FLOAT_DTYPES = ("bf16", "fp32")
FP32 = OpScheme()
# bf16 tensors carry no quantization parameters: the op casts its input and weight to bf16 and
# its output back to fp32.
_BF16_TENSOR = TensorScheme("bf16", "", "", "")
BF16 = OpScheme(_BF16_TENSOR, _BF16_TENSOR)
# What a bf16 op's multiply-accumulates count for in the performance proxy, an fp32 one counting 1
# and an int8 one 0: AVX-512 BF16 does two bf16 MACs per 32-bit lane where fp32 does one, and bf16
# moves half the bytes, so a bf16 op costs about half its fp32 time.
BF16_COST = 0.5


@dataclass(frozen=True)
class Op:
    """One quantizable operation: its name (module path), type (module class), its cost in
    multiply-accumulates per sample and its number of weight elements."""

    name: str
    op_type: str
    macs: int = 0
    weights: int = 0


@dataclass(frozen=True)
class OpCapability:
    """What the framework can do for one op, most preferred scheme first (fp32 not included)."""

    op: Op
    schemes: tuple[OpScheme, ...]


@dataclass(frozen=True)
class TuneConfig:
    """One full candidate: a scheme per op, in model order, plus the calibration sampling size
    and the accuracy-recovery recipes applied to the fp32 model first."""

    op_schemes: tuple[tuple[str, OpScheme], ...]
    sampling_size: int
    recipes: tuple[str, ...] = ()  # accuracy-recovery recipes applied to the fp32 model first (recipes.py)

    @functools.cached_property
    def key(self) -> str:
        """A stable id; computed once (the engine reads it on every pass over its proposals)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def fp32_ops(self) -> tuple[str, ...]:
        return tuple(name for name, scheme in self.op_schemes if scheme.is_fp32)

    @property
    def int8_ops(self) -> tuple[str, ...]:
        return tuple(name for name, scheme in self.op_schemes if scheme.dtype == "int8")

    @property
    def bf16_ops(self) -> tuple[str, ...]:
        return tuple(name for name, scheme in self.op_schemes if scheme.dtype == "bf16")

    def with_fallback(self, op_names: Iterable[str], to: OpScheme = FP32) -> "TuneConfig":
        """The same config with ``op_names`` in fp32 (or in ``to``, e.g. ``BF16``)."""
        fallback = set(op_names)
        return replace(
            self, op_schemes=tuple((name, to if name in fallback else scheme) for name, scheme in self.op_schemes)
        )

    def to_dict(self) -> dict:
        data = {
            "ops": {name: scheme.to_dict() for name, scheme in self.op_schemes},
            "order": [name for name, _ in self.op_schemes],
            "sampling_size": self.sampling_size,
        }
        if self.recipes:  # absent when none, so a config without recipes keeps its key
            data["recipes"] = list(self.recipes)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TuneConfig":
        return cls(
            op_schemes=tuple((name, OpScheme.from_dict(data["ops"][name])) for name in data["order"]),
            sampling_size=int(data["sampling_size"]),
            recipes=tuple(data.get("recipes", ())),
        )


@dataclass(frozen=True)
class TuningSpace:
    """Per-op choices (capabilities ∩ user restrictions, fp32 last), calibration sizes and the
    recipe combinations searched."""

    ops: tuple[Op, ...]
    choices: dict[str, tuple[OpScheme, ...]] = field(hash=False)
    sampling_sizes: tuple[int, ...]
    approach: Approach = Approach.STATIC  # the adaptor offered the schemes of this approach
    # Ops whose fp32 fallback may run in bf16 instead: offered and allowed, but not searched
    # (``use_bf16`` unset); see ``bf16_twin``.
    bf16_after_search: frozenset[str] = frozenset()
    # The recipe combinations searched (``recipes.recipe_sets``), the default first.
    recipe_sets: tuple[tuple[str, ...], ...] = ((),)

    @classmethod
    def build(cls, capabilities: list[OpCapability], quantization: QuantizationSection,
              offered_recipes: tuple[str, ...] = ()) -> "TuningSpace":
        names = [capability.op.name for capability in capabilities]
        patterns = {pattern: re.compile(pattern) for pattern in quantization.op_wise}
        for pattern, regex in patterns.items():
            if not any(regex.fullmatch(name) for name in names):
                raise ConfigError(
                    f"`quantization.op_wise`: {pattern!r} matches no op of the model; its ops are: {', '.join(names)}"
                )
        choices, bf16_after_search = {}, set()
        for capability in capabilities:
            restriction = quantization.model_wise
            for pattern, regex in patterns.items():
                if regex.fullmatch(capability.op.name):
                    restriction = _overlay(restriction, quantization.op_wise[pattern])
            allowed = _restrict(capability.schemes, restriction)
            if quantization.use_bf16 is None and BF16 in allowed:
                bf16_after_search.add(capability.op.name)
            searched = tuple(scheme for scheme in allowed if scheme.dtype != "bf16" or quantization.use_bf16)
            choices[capability.op.name] = searched + (FP32,)
        return cls(tuple(c.op for c in capabilities), choices, tuple(quantization.calibration.sampling_size),
                   quantization.approach, frozenset(bf16_after_search),
                   recipe_sets(offered_recipes, quantization.recipes.wanted(), quantization.recipes.smooth_quant_args.alpha))

    def bf16_twin(self, config: TuneConfig) -> Optional[TuneConfig]:
        """``config`` with its fp32 fallback ops in bf16 where they may be, or None where none
        may: what the tuning compiles beside a chosen config and keeps if it runs faster."""
        ops = [name for name in config.fp32_ops if name in self.bf16_after_search]
        return config.with_fallback(ops, BF16) if ops else None

    # --- lazy enumeration: a config is a mixed-radix number over the per-op choices ----------
    @property
    def size(self) -> int:
        """How many distinct configs the space holds (a Python int: it may be astronomically big)."""
        return math.prod(len(self.choices[op.name]) for op in self.ops) * len(self.sampling_sizes) * len(self.recipe_sets)

    def config_at(self, index: int) -> TuneConfig:
        """The ``index``-th config of the product of choices, without enumerating the others.

        Index 0 is every op's first (most preferred) choice; the sampling size varies fastest,
        then the last op, as in ``itertools.product``, and the recipes slowest (every plain
        config comes before any with a recipe).
        """
        if not 0 <= index < self.size:
            raise IndexError(f"config index {index} outside a space of {self.size}")
        index, size_digit = divmod(index, len(self.sampling_sizes))
        digits = []
        for op in reversed(self.ops):
            index, digit = divmod(index, len(self.choices[op.name]))
            digits.append(self.choices[op.name][digit])
        return TuneConfig(tuple(zip((op.name for op in self.ops), reversed(digits), strict=True)),
                          self.sampling_sizes[size_digit], self.recipe_sets[index])  # recipes vary slowest

    def check(self, config: TuneConfig) -> None:
        """Raise SpaceError unless every op of ``config`` takes one of its choices."""
        names = [op.name for op in self.ops]
        if [name for name, _ in config.op_schemes] != names:
            raise SpaceError(f"config {config.key} names ops {[name for name, _ in config.op_schemes]}, the space has {names}")
        for name, scheme in config.op_schemes:
            if scheme not in self.choices[name]:
                allowed = ", ".join(choice.describe() for choice in self.choices[name])
                raise SpaceError(f"op {name!r}: {scheme.describe()!r} is not among its choices ({allowed})")
        if config.sampling_size not in self.sampling_sizes:
            raise SpaceError(f"sampling_size {config.sampling_size} is not among {list(self.sampling_sizes)}")
        if config.recipes not in self.recipe_sets:
            raise SpaceError(f"recipes {list(config.recipes)} are not among {[list(recipes) for recipes in self.recipe_sets]}")

    @property
    def has_int8(self) -> bool:
        return any(scheme.dtype == "int8" for schemes in self.choices.values() for scheme in schemes)

    @property
    def has_low_precision(self) -> bool:
        """Whether any op has a choice other than fp32 (int8 or bf16)."""
        return any(not scheme.is_fp32 for schemes in self.choices.values() for scheme in schemes)

    def fallback_for(self, op_name: str) -> OpScheme:
        """The first step down from int8 for an op: bf16 where it is a choice, else fp32."""
        return BF16 if BF16 in self.choices[op_name] else FP32

    @property
    def total_macs(self) -> int:
        return sum(op.macs for op in self.ops)

    def model_wise_configs(self) -> list[TuneConfig]:
        """One config per distinct int8 scheme (each op takes it if it can, else its first choice,
        bf16 where offered) and sampling size."""
        schemes: list[OpScheme] = []
        for op in self.ops:
            for scheme in self.choices[op.name]:
                if scheme.dtype == "int8" and scheme not in schemes:
                    schemes.append(scheme)
        configs: list[TuneConfig] = []
        for size in self.sampling_sizes:
            for scheme in schemes or [FP32]:
                op_schemes = tuple(
                    (op.name, scheme if scheme in self.choices[op.name] else self.choices[op.name][0])
                    for op in self.ops
                )
                config = TuneConfig(op_schemes, size, self.recipe_sets[0])
                if config not in configs:
                    configs.append(config)
        return configs

    def recipe_variants(self, config: TuneConfig) -> list[TuneConfig]:
        """``config`` with one recipe more, or one recipe's other variant (SmoothQuant's other
        alpha), each way the space has."""
        def one_step(recipes: tuple[str, ...]) -> bool:
            kept = set(config.recipes) & set(recipes)
            if len(recipes) == len(config.recipes) + 1:
                return kept == set(config.recipes)
            swapped = set(config.recipes) - kept
            return len(recipes) == len(config.recipes) and len(swapped) == 1 and \
                {name_of(recipe) for recipe in swapped} == {name_of(recipe) for recipe in set(recipes) - kept}
        return [replace(config, recipes=recipes) for recipes in self.recipe_sets if one_step(recipes)]

    def combined_recipes(self, config: TuneConfig, variants: Iterable[TuneConfig]) -> Optional[TuneConfig]:
        """``config`` with the recipes of all ``variants`` together (of one recipe's variants, the
        first), where the space has that combination and it joins at least two of them."""
        chosen: dict[str, str] = {}
        for variant in variants:
            for recipe in set(variant.recipes) - set(config.recipes):
                chosen.setdefault(name_of(recipe), recipe)
        recipes = tuple(sorted(set(config.recipes) | set(chosen.values()), key=order))
        if len(chosen) < 2 or recipes not in self.recipe_sets:
            return None
        return replace(config, recipes=recipes)

    def fp32_macs_fraction(self, config: TuneConfig) -> float:
        """Share of the model's multiply-accumulates left in fp32, a bf16 op's counted at
        ``BF16_COST``: the trial-time speed proxy."""
        total = self.total_macs
        if total == 0:
            return (len(config.fp32_ops) + BF16_COST * len(config.bf16_ops)) / max(1, len(self.ops))
        macs = {op.name: op.macs for op in self.ops}
        return (sum(macs[name] for name in config.fp32_ops) + BF16_COST * sum(macs[name] for name in config.bf16_ops)) / total

    def weight_bytes_fraction(self, config: TuneConfig) -> float:
        """Weight bytes relative to all-fp32 (int8 weights take a quarter, bf16 a half): the
        model-size proxy."""
        total = sum(op.weights for op in self.ops)
        if total == 0:
            return (len(config.fp32_ops) + 0.5 * len(config.bf16_ops)) / max(1, len(self.ops))
        share = {"fp32": 1.0, "bf16": 0.5, "int8": 0.25}
        dtypes = {name: scheme.dtype for name, scheme in config.op_schemes}
        return sum(op.weights * share[dtypes[op.name]] for op in self.ops) / total

    def fingerprint(self) -> dict:
        fingerprint = {
            "ops": [[op.name, op.op_type] for op in self.ops],
            "choices": {name: [scheme.to_dict() for scheme in schemes] for name, schemes in self.choices.items()},
            "sampling_sizes": list(self.sampling_sizes),
        }
        if self.recipe_sets != ((),):
            fingerprint["recipe_sets"] = [list(recipes) for recipes in self.recipe_sets]
        return fingerprint


def describe_capabilities(capabilities: list[OpCapability]) -> str:
    """The distinct int8 (and bf16) schemes an adaptor offers, for error messages."""
    offered = sorted({scheme.describe() for capability in capabilities for scheme in capability.schemes})
    return "; ".join(offered) or "nothing"


def _overlay(base: OpRestriction, override: OpRestriction) -> OpRestriction:
    """op_wise fields replace model_wise fields for the ops they match."""
    merged = {}
    for role in ("weight", "activation"):
        low, high = getattr(base, role), getattr(override, role)
        if high is None:
            merged[role] = low
        elif low is None:
            merged[role] = high
        else:
            merged[role] = low.model_copy(update={k: v for k, v in high.model_dump().items() if v is not None})
    return OpRestriction(**merged)


def _restrict(schemes: tuple[OpScheme, ...], restriction: OpRestriction) -> tuple[OpScheme, ...]:
    def fp32_only(tensor: Optional[TensorRestriction]) -> bool:
        return tensor is not None and tensor.dtype == ("fp32",)

    if fp32_only(restriction.weight) or fp32_only(restriction.activation):
        return ()
    named = set(restriction.activation.algorithm or ()) if restriction.activation is not None else set()
    return tuple(
        scheme
        for scheme in schemes
        if (scheme.weight is None or scheme.weight.allowed_by(restriction.weight))
        and (scheme.activation is None or scheme.activation.allowed_by(restriction.activation))
        and (scheme.activation is None or scheme.activation.algorithm not in OPT_IN_ALGORITHMS - named)
    )
