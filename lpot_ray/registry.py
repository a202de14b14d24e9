"""Plug-in registries: adaptors, strategies, metrics and objectives looked up by name.

Built-ins register themselves lazily (by module path) so that looking up ``pytorch`` imports the
PyTorch adaptor module only then; user plug-ins register a class with the decorator.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, TypeVar, Union

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names → classes; built-ins given as ``"module:attribute"`` strings, imported on first use."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, Union[str, type]] = {}

    def register(self, name: str, target: Union[str, type, None] = None) -> Callable:
        """Register ``target`` under ``name``; without a target, use as a class decorator."""
        if target is not None:
            self._entries[name] = target
            return target

        def decorator(cls: type) -> type:
            self._entries[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ConfigError(
                f"`{self.config_key}`: unknown {self.kind} {name!r}; registered: {', '.join(self.names())}"
            )
        entry = self._entries[name]
        if isinstance(entry, str):
            module_name, attribute = entry.split(":")
            entry = getattr(importlib.import_module(module_name), attribute)
            self._entries[name] = entry
        return entry


adaptors: Registry = Registry("framework", "model.framework")
strategies: Registry = Registry("strategy", "tuning.strategy.name")
metrics: Registry = Registry("metric", "evaluation.accuracy.metric")
objectives: Registry = Registry("objective", "tuning.objective")

adaptors.register("pytorch", "lpot_ray.adaptors.pytorch:PyTorchAdaptor")
strategies.register("basic", "lpot_ray.strategies.basic:BasicStrategy")
metrics.register("topk", "lpot_ray.metrics:TopK")
metrics.register("Accuracy", "lpot_ray.metrics:Accuracy")
objectives.register("performance", "lpot_ray.objectives:Performance")
