"""What runs on a worker: the adaptor, the fp32 model and the data, loaded once, then trials.

``TrialRunner`` is plain Python so the same code runs inside a Ray actor and in-process
(``ray.workers: 1``). Per trial only a config arrives and only figures leave.
"""

from __future__ import annotations

import os
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .evaluation import Evaluation, TrialCancelled
from .objectives import paired_latency_ms, peak_rss_growth
from .space import Op, TuneConfig
from .trial import CANCELLED, FAILED, OK


@dataclass
class WorkerJob:
    """Everything a worker needs, sent once through the object store."""

    adaptor: type  # the adaptor class, so a plug-in registered only in the driver works on workers
    model_payload: bytes
    calibration: list
    evaluation: Evaluation
    ops: tuple[Op, ...]
    threads: int = 1
    q_func: Optional[Callable[[Any], Any]] = None  # quantization-aware training: trains the prepared model


class TrialRunner:
    def __init__(self, job: WorkerJob, name: str):
        self.name = name
        self.job = job
        self.adaptor = job.adaptor()
        self.previous_threads = self.adaptor.set_threads(job.threads)
        self.model = self.adaptor.load(job.model_payload)
        self.example = job.calibration[0]
        self._fp32_compiled: Any = None  # compiled once, for every finalist's measurements

    def close(self) -> None:
        """Give the process its thread count back (it matters when the runner is the driver)."""
        self.adaptor.set_threads(self.previous_threads)

    def run(self, seq: int, config_data: dict, should_stop: Callable[[], bool] = lambda: False) -> dict:
        """Quantize and evaluate one config; any failure becomes a failed trial with its reason."""
        started = time.time()
        row: dict[str, Any] = {"seq": seq, "worker": self.name, "started": started}
        try:
            if "inspect" in config_data:
                config = TuneConfig.from_dict(config_data["inspect"])
                errors = self.adaptor.inspect_tensors(self.model, config, self.job.calibration)
                row.update(status=OK, figures={"op_errors": errors}, duration=time.time() - started)
                return row
            config = TuneConfig.from_dict(config_data)
            passes_before = getattr(self.adaptor, "calibration_passes", 0)
            quantized = self._quantize(config)
            row["figures"] = {"calibration_passes": getattr(self.adaptor, "calibration_passes", 0) - passes_before}
            row["accuracy"] = self.job.evaluation.run(self.adaptor, quantized, should_stop)
            row["status"] = OK
        except TrialCancelled:
            row["status"] = CANCELLED
        except Exception as error:  # a trial's failure must not end the tuning
            row["status"] = FAILED
            row["reason"] = _reason(error)
        row["duration"] = time.time() - started
        return row

    def finalize(self, config_data: dict, measure: bool = True) -> dict:
        """Lower the config to real int8 kernels, re-evaluate there, measure it against fp32."""
        config = TuneConfig.from_dict(config_data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = self._quantize(config)
            lowered = self.adaptor.lower(quantized, self.job.ops, config, self.example)
            accuracy = self.job.evaluation.run(self.adaptor, lowered.model) if self.job.evaluation.given else None
            model = self.adaptor.serialize(quantized, self.example)
            figures = {"model_size_bytes": len(model), "fp32_model_size_bytes": len(self.job.model_payload)}
            if measure:
                figures.update(self._measure(lowered.model, len(model)))
        return {"accuracy": accuracy, "int8_ops": list(lowered.int8_ops), "fp32_ops": list(lowered.fp32_ops),
                "bf16_ops": list(lowered.bf16_ops), "figures": figures, "model": model}

    def _quantize(self, config: TuneConfig) -> Any:
        if self.job.q_func is not None:
            return self.adaptor.quantize_aware(self.model, config, self.job.q_func, self.job.calibration)
        return self.adaptor.quantize(self.model, config, self.job.calibration)

    def _measure(self, int8_model: Any, int8_bytes: int) -> dict:
        """Latency per batch and memory footprint, int8 against fp32 compiled the same way."""
        if self._fp32_compiled is None:
            self._fp32_compiled = self.adaptor.lower_fp32(self.model, self.example)
        fp32_model = self._fp32_compiled
        run_int8 = lambda: self.adaptor.predict(int8_model, self.example)  # noqa: E731
        run_fp32 = lambda: self.adaptor.predict(fp32_model, self.example)  # noqa: E731
        # Memory first, before hundreds of timed runs have warmed the allocator's free lists.
        int8_peak, fp32_peak = peak_rss_growth(run_int8), peak_rss_growth(run_fp32)
        int8_ms, fp32_ms = paired_latency_ms(run_int8, run_fp32)
        figures = {"latency_ms": int8_ms, "fp32_latency_ms": fp32_ms, "latency_ratio": fp32_ms / int8_ms}
        if int8_peak is not None and fp32_peak is not None:
            figures.update(footprint_bytes=int8_bytes + int8_peak,
                           fp32_footprint_bytes=len(self.job.model_payload) + fp32_peak)
        return figures


def _reason(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {message}{location}"

