"""lpot_ray: the fastest low-precision model that still meets your accuracy goal, tuned on Ray.

Importing lpot_ray imports no deep-learning framework; each adaptor imports its own when used.
"""

from .api import Quantization, tune
from .zoo import ZooJob, tune_many
from .benchmark import Benchmark, BenchmarkResult
from .config import Config, load_config
from .errors import (ConfigError, DataError, EvaluationError, HistoryError, LpotRayError, MissingFrameworkError,
                     ModelError, PluginError, SpaceError)
from .metrics import Metric
from .pruning import Pruning, PruningResult
from .result import TuneResult, load
from .space import Op, OpScheme, TensorScheme, TuneConfig, TuningSpace
from .strategies.base import Strategy
from .trial import Trial
from .warm import workers

__version__ = "0.1.0"

__all__ = [
    "Benchmark", "BenchmarkResult", "Config", "ConfigError", "DataError", "EvaluationError", "HistoryError", "LpotRayError", "Metric",
    "MissingFrameworkError", "ModelError", "Op", "OpScheme", "PluginError", "Pruning", "PruningResult", "Quantization", "SpaceError", "Strategy",
    "TensorScheme",
    "Trial", "TuneConfig", "TuneResult", "TuningSpace", "ZooJob", "load", "load_config", "tune", "tune_many", "workers",
]
