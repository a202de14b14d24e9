"""What a tuning returns, and how a chosen model is saved and read back."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from . import registry
from .errors import ModelError
from .space import TuneConfig
from .trial import Trial

INFO_FILE = "tune_result.json"


@dataclass
class TuneResult:
    """The fastest passing int8 model found, or (``passed`` False) the closest failing trial."""

    model: Any = field(repr=False)
    config: Optional[TuneConfig] = field(repr=False)
    accuracy: Optional[float]
    objectives: dict
    baseline: Optional[float]  # None only with performance_only and no evaluation
    n_trials: int
    n_evaluated: int
    int8_ops: tuple[str, ...]
    fp32_ops: tuple[str, ...]
    passed: bool
    best_failing: Optional[Trial] = None
    bf16_ops: tuple[str, ...] = ()  # ops computing in bf16 (read from the compiled code, like int8_ops)
    framework: str = ""
    stopped_by: str = ""
    workspace: str = ""
    model_bytes: bytes = field(default=b"", repr=False)
    error: str = ""  # why the job could not run (tune_many reports it and goes on with the others)
    reason: str = ""  # why no config passed, in one line (the log says it too)
    wall_time: float = 0.0  # seconds, as tune_many measured them
    timings: dict = field(default_factory=dict)  # seconds per phase (timings.py says which)
    # The passing trials no other passing trial beats on both accuracy and the objective, fastest
    # first (``pareto.front``): a faster model with less margin, or a safer one, to pick from.
    pareto: tuple[Trial, ...] = ()

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write the quantized model and its config into the folder ``path``."""
        if not self.passed or not self.model_bytes:
            raise ModelError("nothing to save: no config met the accuracy criterion")
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        registry.adaptors.get(self.framework)().save_model(self.model_bytes, folder)
        info = {
            "framework": self.framework,
            "config": self.config.to_dict(),
            "accuracy": self.accuracy,
            "baseline": self.baseline,
            "objectives": self.objectives,
            "int8_ops": list(self.int8_ops),
            "fp32_ops": list(self.fp32_ops),
            "bf16_ops": list(self.bf16_ops),
            "n_trials": self.n_trials,
        }
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return folder


def load(path: Union[str, os.PathLike]) -> TuneResult:
    """Read back what ``TuneResult.save`` wrote; ``.model`` is ready to run."""
    folder = Path(path)
    info_path = folder / INFO_FILE
    if not info_path.is_file():
        raise ModelError(f"{folder}: not a saved lpot_ray model (no {INFO_FILE})")
    info = json.loads(info_path.read_text())
    adaptor = registry.adaptors.get(info["framework"])()
    model_bytes = adaptor.read_model(folder)
    return TuneResult(
        model=adaptor.deserialize(model_bytes),
        config=TuneConfig.from_dict(info["config"]),
        accuracy=info["accuracy"],
        objectives=info["objectives"],
        baseline=info["baseline"],
        n_trials=info["n_trials"],
        n_evaluated=0,
        int8_ops=tuple(info["int8_ops"]),
        fp32_ops=tuple(info["fp32_ops"]),
        bf16_ops=tuple(info.get("bf16_ops", ())),  # absent from results saved before bf16 existed
        passed=True,
        framework=info["framework"],
        model_bytes=model_bytes,
    )
