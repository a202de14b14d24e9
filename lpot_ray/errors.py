"""What a user sees when their input is wrong.

Every error names the file, key or object at fault, the value found and what is expected, so that
a mistake is fixed from the message alone, before any cluster work starts where possible.
"""


class LpotRayError(Exception):
    """Base of every error lpot_ray raises on purpose."""


class ConfigError(LpotRayError, ValueError):
    """The YAML / dict configuration is malformed, unknown or impossible."""


class ModelError(LpotRayError, ValueError):
    """The model can't be read, exported or quantized by its framework adaptor."""


class DataError(LpotRayError, ValueError):
    """A data loader is empty or yields batches the model can't take."""


class EvaluationError(LpotRayError, RuntimeError):
    """The evaluation (built-in metric or user eval_func) failed or returned a non-number."""


class HistoryError(LpotRayError, RuntimeError):
    """The tuning history can't be opened or does not match the job being resumed."""


class SpaceError(LpotRayError, ValueError):
    """A strategy proposed a config outside the tuning space (a bug in the strategy)."""


class PluginError(LpotRayError, TypeError):
    """A plug-in (strategy, adaptor, metric, objective) does not meet its contract."""


class MissingFrameworkError(LpotRayError, ImportError):
    """A framework needed by the chosen adaptor is not installed."""

    def __init__(self, framework: str, extra: str):
        super().__init__(
            f"framework {framework!r} is not installed: pip install 'lpot_ray[{extra}]'"
        )
        self.framework = framework
        self.extra = extra


class ClusterError(LpotRayError, ConnectionError):
    """The Ray cluster named by an address can't be reached or refuses the connection."""
