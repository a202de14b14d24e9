"""Built-in accuracy metrics, LPOT's names, each with mergeable state.

A metric sees numpy arrays (or, for text and detection, Python lists), keeps sufficient
statistics rather than per-sample results where it can, and can ``merge`` another instance's
state, so an evaluation split across workers combines into the same figure as a whole one.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Metric, SummedMetric

__all__ = ["Metric", "SummedMetric", "make_metric"]


def make_metric(spec: dict[str, Any]) -> Metric:
    """Build the metric named by the YAML ``evaluation.accuracy.metric`` mapping, e.g. {topk: 1}."""
    from .. import registry

    (name, params), = spec.items()
    cls = registry.metrics.get(name)
    try:
        if params is None or params == {}:
            return cls()
        return cls(**params) if isinstance(params, dict) else cls(params)
    except TypeError as error:
        raise ConfigError(f"`evaluation.accuracy.metric.{name}`: {params!r} are not its parameters ({error})") from None
