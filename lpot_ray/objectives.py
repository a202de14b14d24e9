"""Objectives: what makes one passing config better than another.

During tuning, every trial is ranked by a *proxy* known without running anything (the fp32
share of the model's multiply-accumulates for ``performance``, of its weight bytes for
``modelsize``), so the search never waits on noisy timings and its choice is deterministic.
Several objectives combine with weights, as LPOT's ``tuning.multi_objectives``. The chosen config
is then compiled and *measured* against fp32: latency per batch of the quantized model itself,
warm-up excluded, fp32 and int8 timed in alternation until the medians settle, and the bytes of
the saved model. (On a small model the measured latencies of configs a tiny op apart differ by
less than their noise, which is why they report rather than decide.)
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .space import TuneConfig, TuningSpace


class Objective(ABC):
    name = ""

    @abstractmethod
    def proxy(self, space: TuningSpace, config: TuneConfig) -> float:
        """A trial-time estimate in [0, 1] relative to fp32 (1); lower is better."""


class Performance(Objective):
    """LPOT's ``performance``: lower latency."""

    name = "performance"

    def proxy(self, space: TuningSpace, config: TuneConfig) -> float:
        return space.fp32_macs_fraction(config)


class ModelSize(Objective):
    """LPOT's ``modelsize``: fewer bytes in the saved model."""

    name = "modelsize"

    def proxy(self, space: TuningSpace, config: TuneConfig) -> float:
        return space.weight_bytes_fraction(config)


class Footprint(Objective):
    """LPOT's ``footprint``: less memory while the model runs. The proxy is the weight-bytes
    share (weights dominate a small batch); the measured figure is the model's bytes plus the
    peak growth of the process's resident memory during one inference (``peak_rss_growth``)."""

    name = "footprint"

    def proxy(self, space: TuningSpace, config: TuneConfig) -> float:
        return space.weight_bytes_fraction(config)


@dataclass(frozen=True)
class WeightedObjectives:
    """One or several objectives with their weights (normalised to sum 1)."""

    objectives: tuple[Objective, ...]
    weights: tuple[float, ...]

    def proxy(self, space: TuningSpace, config: TuneConfig) -> float:
        return sum(weight * objective.proxy(space, config) for objective, weight in self._pairs())

    def _pairs(self):
        total = sum(self.weights)
        return [(objective, weight / total) for objective, weight in zip(self.objectives, self.weights, strict=True)]


def peak_rss_growth(run: Callable[[], Any]) -> Optional[int]:
    """Bytes the resident memory of this process peaks above its level before ``run()``: native
    allocations included, not just the Python heap. Linux only (None elsewhere): it resets the
    kernel's high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM`` afterwards."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = _status_kib("VmRSS")
        run()
        return max(0, _status_kib("VmHWM") - before) * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def paired_latency_ms(run_int8: Callable[[], Any], run_fp32: Callable[[], Any], warmup: int = 3,
                      rounds: int = 20, max_rounds: int = 200, tolerance: float = 0.02) -> tuple[float, float]:
    """Median milliseconds per call of two functions, timed in alternation, warm-up excluded,
    repeated in blocks of ``rounds`` until neither median moves by more than ``tolerance``."""
    for _ in range(warmup):
        run_int8()
        run_fp32()
    int8_times: list[float] = []
    fp32_times: list[float] = []
    previous = None
    while len(int8_times) < max_rounds:
        for round_index in range(rounds):
            pair = ((run_int8, int8_times), (run_fp32, fp32_times))
            for run, times in pair if round_index % 2 == 0 else pair[::-1]:  # no fixed order bias
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1000)
        medians = statistics.median(int8_times), statistics.median(fp32_times)
        if previous and all(abs(now - before) <= tolerance * before for now, before in zip(medians, previous, strict=True)):
            break
        previous = medians
    return medians
