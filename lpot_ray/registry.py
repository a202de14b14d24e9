"""Plug-in registries: adaptors, strategies, metrics and objectives looked up by name.

Three ways in, all ending in the same table: built-ins (listed below as ``"module:attribute"``,
imported on first use, so naming ``pytorch`` imports the PyTorch adaptor only then), the
``@registry.strategies.register("name")`` decorator, and the entry-point groups
``lpot_ray.strategies``, ``lpot_ray.adaptors``, ``lpot_ray.metrics`` and ``lpot_ray.objectives``
of installed packages. A YAML names a registered plug-in, never an import path. A class missing a
method its kind requires is rejected when it is registered (or first loaded), naming the method.

    import lpot_ray
    from lpot_ray import registry

    @registry.strategies.register("first_only")
    class FirstOnly(lpot_ray.Strategy):
        ...
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any, Callable, Union

from .errors import ConfigError, PluginError


class Registry:
    """Names → classes of one kind of plug-in."""

    def __init__(self, kind: str, config_key: str, group: str, required: tuple[str, ...]):
        self.kind = kind
        self.config_key = config_key
        self.group = group  # the entry-point group installed packages register under
        self.required = required
        self._entries: dict[str, Union[str, type]] = {}
        self._entry_points_loaded = False

    def register(self, name: str, target: Union[str, type, None] = None) -> Callable:
        """Register ``target`` (a class or ``"module:attribute"``) under ``name``; without a
        target, use as a class decorator."""
        if target is not None:
            self._entries[name] = target if isinstance(target, str) else self._checked(name, target)
            return target

        def decorator(cls: type) -> type:
            self._entries[name] = self._checked(name, cls)
            return cls

        return decorator

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def get(self, name: str) -> Any:
        if name not in self._entries:
            self._load_entry_points()
        if name not in self._entries:
            raise ConfigError(f"`{self.config_key}`: unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, attribute = entry.split(":")
            entry = self._checked(name, getattr(importlib.import_module(module_name), attribute))
            self._entries[name] = entry
        return entry

    def _checked(self, name: str, cls: type) -> type:
        missing = [method for method in self.required if not hasattr(cls, method)]
        missing += sorted(getattr(cls, "__abstractmethods__", ())) if inspect.isabstract(cls) else []
        if missing:
            raise PluginError(
                f"{self.kind} {name!r} ({cls.__module__}.{cls.__qualname__}) lacks required method "
                f"{', '.join(repr(method) for method in dict.fromkeys(missing))}"
            )
        return cls

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for entry_point in importlib.metadata.entry_points(group=self.group):
            self._entries.setdefault(entry_point.name, entry_point.value)


ADAPTOR_METHODS = ("prepare", "load", "weights_digest", "capabilities", "quantize", "predict", "lower",
                   "lower_fp32", "serialize", "deserialize")

adaptors = Registry("framework", "model.framework", "lpot_ray.adaptors", ADAPTOR_METHODS)
strategies = Registry("strategy", "tuning.strategy.name", "lpot_ray.strategies", ("ask", "tell", "finished"))
metrics = Registry("metric", "evaluation.accuracy.metric", "lpot_ray.metrics", ("update", "result", "merge"))
objectives = Registry("objective", "tuning.objective", "lpot_ray.objectives", ("proxy",))

adaptors.register("pytorch", "lpot_ray.adaptors.pytorch:PyTorchAdaptor")
adaptors.register("tensorflow", "lpot_ray.adaptors.tensorflow:TensorFlowAdaptor")
adaptors.register("mxnet", "lpot_ray.adaptors.mxnet:MXNetAdaptor")
adaptors.register("onnxrt", "lpot_ray.adaptors.onnxrt:OnnxRuntimeAdaptor")
strategies.register("basic", "lpot_ray.strategies.basic:BasicStrategy")
strategies.register("bayesian", "lpot_ray.strategies.bayesian:BayesianStrategy")
strategies.register("mse", "lpot_ray.strategies.mse:MseStrategy")
strategies.register("exhaustive", "lpot_ray.strategies.exhaustive:ExhaustiveStrategy")
strategies.register("random", "lpot_ray.strategies.random_search:RandomStrategy")
for _name, _path in {
    "topk": "classification:TopK", "Accuracy": "classification:Accuracy", "F1": "classification:F1",
    "Loss": "regression:Loss", "MAE": "regression:MAE", "MSE": "regression:MSE", "RMSE": "regression:RMSE",
    "SquadF1": "text:SquadF1", "BLEU": "text:BLEU",
    "mAP": "detection:mAP", "VOCmAP": "detection:VOCmAP", "COCOmAP": "detection:COCOmAP",
    "COCOmAPv2": "detection:COCOmAPv2", "mIOU": "segmentation:MIoU", "GLUE": "glue:GLUE",
}.items():
    metrics.register(_name, f"lpot_ray.metrics.{_path}")
objectives.register("performance", "lpot_ray.objectives:Performance")
objectives.register("modelsize", "lpot_ray.objectives:ModelSize")
objectives.register("footprint", "lpot_ray.objectives:Footprint")

