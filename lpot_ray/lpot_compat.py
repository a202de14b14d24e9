"""How an LPOT 1.x configuration maps onto lpot_ray's schema, before the schema checks it.

Every valid LPOT key gets one of three answers: implemented (the schema in config.py), accepted
with a one-line warning saying why it changes nothing here (``IGNORED``), or refused by name as
an LPOT option lpot_ray does not support yet (``LPOT_ONLY_KEYS``, ``LPOT_ONLY_VALUES``,
``LPOT_ONLY_FRAMEWORKS``). LPOT's value forms are read as LPOT reads them: ``'50, 100'`` is a
list, ``pytorch_fx`` is PyTorch, ``onnxrt_integerops`` is ONNX Runtime's dynamic quantization.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from typing import Any, Iterator

from .errors import ConfigError

log = logging.getLogger("lpot_ray")

# LPOT frameworks lpot_ray has no adaptor for: refused before anything else is checked.
LPOT_ONLY_FRAMEWORKS = frozenset({"engine"})
# LPOT framework names that run on one of lpot_ray's adaptors, and what their own keys mean here.
FRAMEWORK_ALIASES = {
    "pytorch_fx": ("pytorch", "lpot_ray's PyTorch path quantizes a torch.export graph, which is what FX mode asks for"),
    "pytorch_ipex": ("pytorch", "int8 runs on inductor's oneDNN kernels rather than through IPEX"),
}
_STATIC, _DYNAMIC = "post_training_static_quant", "post_training_dynamic_quant"
# LPOT's ONNX Runtime names: the framework itself, each with the approach its name stands for
# (QLinear ops are calibrated, integer ops quantize their inputs at run time; QDQ is calibrated).
ONNXRT_ALIASES = {
    "onnxrt_qlinearops": _STATIC, "onnxrt_qlinear": _STATIC, "onnxrt_qdq": _STATIC, "onnxrt_qdqops": _STATIC,
    "onnxrt_integerops": _DYNAMIC, "onnxrt_integer": _DYNAMIC,
}

# LPOT sections lpot_ray implements for some frameworks only (by the framework's name after aliases).
FRAMEWORK_SECTIONS = {"pruning": ("pytorch",)}

# Dotted key paths LPOT 1.x accepts that lpot_ray does not implement yet.
LPOT_ONLY_KEYS = frozenset({
    "quantization.train.postprocess",
    "quantization.train.execution_mode",
    "quantization.optimization",
    "evaluation.accuracy.multi_metrics",
    "distillation",
    "graph_optimization",
    "mixed_precision",
    "model_conversion",
    "nas",
})

# Values LPOT 1.x accepts for a key that lpot_ray does not implement yet.
LPOT_ONLY_VALUES = {
    "quantization.approach": {"post_training_auto_quant"},
    "device": {"gpu"},
    "tuning.objective": {"accuracy"},
}

NAMES_NOT_KEYS = {"quantization.op_wise"}  # its keys are op names, which no rule here is about
_THREADS = "lpot_ray sets each worker's threads from ray.cpus_per_worker"
# Valid LPOT keys (glob patterns over dotted paths) that change nothing here, and why.
IGNORED = {
    "model.inputs": "lpot_ray reads a model's inputs and outputs from the model itself",
    "model.outputs": "lpot_ray reads a model's inputs and outputs from the model itself",
    "*.dataloader.last_batch": "every sample is read, the last smaller batch included",
    "*.dataloader.shuffle": "batches are read in dataset order",
    "*.dataloader.distributed": "each Ray worker evaluates whole configs on the whole dataset",
    "evaluation.accuracy.iteration": "the whole evaluation dataloader is evaluated",
    "evaluation.accuracy.configs": _THREADS,
    "evaluation.performance.configs.kmp_blocktime": _THREADS,
    "evaluation.performance.configs.kmp_affinity": _THREADS,
    "evaluation.performance.configs.inter_num_of_threads": _THREADS,
    "evaluation.performance.configs.intra_num_of_threads": _THREADS,
    "quantization.train.frequency": "LPOT's pruning schedule reads it; quantization-aware training steps the "
                                    "optimizer on every batch",
    "*.train.hostfile": "LPOT reserves it for multi-node training; lpot_ray's workers come from "
                        "the Ray cluster (`ray.address`)",
    "pruning.train.frequency": "each pruner's `update_frequency` says in which epochs its masks are recomputed",
    "quantization.recipes.scale_propagation_*": "LPOT's TensorFlow graph rewrite; inductor, LiteRT and oneDNN "
                                                "choose where requantization happens",
    "quantization.recipes.first_conv_or_matmul_quantization": "lpot_ray quantizes the first op like any "
                                                              "other; `op_wise` keeps it fp32",
    "tuning.tensorboard": "`lpot-ray report` shows the trials and ops instead",
    "tuning.diagnosis": "`lpot-ray report` shows the trials and ops instead",
    "tuning.strategy.accuracy_weight": "used only by LPOT's sigopt strategy",
    "tuning.strategy.latency_weight": "used only by LPOT's sigopt strategy",
    "tuning.strategy.sigopt_*": "used only by LPOT's sigopt strategy",
    "evaluation.accuracy.metric.*.anno_path": "the ground truth is the evaluation dataloader's labels",
}


def adapt(raw: dict, origin: str) -> dict:
    """``raw`` as lpot_ray's schema reads it: ignored keys dropped (each with a warning),
    aliases resolved; an LPOT option lpot_ray lacks is a ConfigError naming it."""
    model = raw.get("model")
    framework = model.get("framework") if isinstance(model, dict) and isinstance(model.get("framework"), str) else None
    if framework in LPOT_ONLY_FRAMEWORKS:
        raise ConfigError(f"{origin}: `model.framework: {framework}` is an LPOT framework lpot_ray does not support "
                          "yet; it has pytorch, tensorflow, mxnet and onnxrt")
    for path, value in list(walk(raw)):
        if path in LPOT_ONLY_KEYS and not _registered_metric(path):
            raise ConfigError(f"{origin}: `{path}` is an LPOT option lpot_ray does not support yet")
        if isinstance(value, str) and value in LPOT_ONLY_VALUES.get(path, ()) and not _registered(path, value):
            raise ConfigError(f"{origin}: `{path}: {value}` is an LPOT option lpot_ray does not support yet")
    resolved = FRAMEWORK_ALIASES.get(framework, (framework,))[0]
    for section, frameworks in FRAMEWORK_SECTIONS.items():
        if section in raw and resolved not in frameworks:
            raise ConfigError(f"{origin}: `{section}` with `model.framework: {framework}` is an LPOT option lpot_ray "
                              f"does not support yet; lpot_ray does it for {', '.join(frameworks)}")
    adapted = copy.deepcopy(raw)
    _drop_ignored(adapted, "", origin)
    if framework in FRAMEWORK_ALIASES:
        adapted["model"]["framework"], why = FRAMEWORK_ALIASES[framework]
        log.warning("%s: `model.framework: %s` runs as pytorch: %s", origin, framework, why)
    if framework in ONNXRT_ALIASES:
        _as_onnxrt(adapted, framework, origin)
    return adapted


def _as_onnxrt(adapted: dict, framework: str, origin: str) -> None:
    """LPOT's ONNX Runtime name as framework ``onnxrt`` with the approach the name stands for: set
    where the YAML has none; a different one is overridden with a warning, since the name decides
    which int8 ops the quantizer makes."""
    adapted["model"]["framework"] = "onnxrt"
    approach = ONNXRT_ALIASES[framework]
    quantization = adapted.setdefault("quantization", {})
    if not isinstance(quantization, dict):
        return  # the schema names the bad section
    given = quantization.get("approach")
    if given is not None and given != approach:
        log.warning("%s: `quantization.approach: %s` changes nothing here: `model.framework: %s` means %s",
                    origin, given, framework, approach)
    quantization["approach"] = approach


def as_list(value: Any) -> Any:
    """LPOT's list forms: ``'int8, fp32'`` or ``'50 100'`` is a list as ``[int8, fp32]`` is."""
    if isinstance(value, str):
        return [part for part in value.replace(",", " ").split() if part]
    return value


def walk(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every dotted key path of ``tree`` and its value (op_wise's op names are not keys)."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        yield path, value
        if isinstance(value, dict) and path not in NAMES_NOT_KEYS:
            yield from walk(value, path + ".")


def _drop_ignored(tree: dict, prefix: str, origin: str) -> None:
    """Remove the ``IGNORED`` keys from ``tree`` in place, each with its warning."""
    for key in list(tree):
        path = f"{prefix}{key}"
        why = next((reason for pattern, reason in IGNORED.items() if fnmatch.fnmatchcase(path, pattern)), None)
        if why is not None:
            del tree[key]
            log.warning("%s: `%s` changes nothing here: %s", origin, path, why)
        elif isinstance(tree[key], dict) and path not in NAMES_NOT_KEYS:
            _drop_ignored(tree[key], path + ".", origin)


def _registered_metric(path: str) -> bool:
    """A plug-in may register a metric LPOT has and lpot_ray lacks."""
    from . import registry

    prefix = "evaluation.accuracy.metric."
    return path.startswith(prefix) and path[len(prefix):] in registry.metrics.names()


def _registered(path: str, value: str) -> bool:
    """A plug-in may implement what LPOT has and lpot_ray lacks (say, a footprint objective)."""
    from . import registry

    kinds = {"tuning.objective": registry.objectives}
    return path in kinds and value in kinds[path].names()
