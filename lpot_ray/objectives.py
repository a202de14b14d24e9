"""Objective figures: what makes one passing config better than another.

During tuning every trial is ranked by a proxy known without running it, the share of the
model's multiply-accumulates left in fp32 (``TuningSpace.fp32_macs_fraction``). Real latency is
noisy and costly, so it is measured only for the finalist, on compiled models, fp32 and int8 in
alternation so that both see the same machine load.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def paired_latency_ms(
    run_int8: Callable[[], Any], run_fp32: Callable[[], Any], warmup: int = 3, iterations: int = 30
) -> tuple[float, float]:
    """Median milliseconds per call of two functions, timed in alternation, warm-up excluded."""
    for _ in range(warmup):
        run_int8()
        run_fp32()
    int8_times, fp32_times = [], []
    for _ in range(iterations):
        for run, times in ((run_int8, int8_times), (run_fp32, fp32_times)):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(int8_times), statistics.median(fp32_times)


class Performance:
    """LPOT's ``performance`` objective: lower latency is better."""

    name = "performance"

    def proxy(self, space: Any, config: Any) -> float:
        """The trial-time estimate: fp32 share of MACs (0 = all int8, fastest)."""
        return space.fp32_macs_fraction(config)
