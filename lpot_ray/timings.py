"""Where a tuning's time went: seconds per named phase, for the result, the history and the report.

Phases nest by name (``finalize.lower_int8`` is part of ``finalize``). Trial phases
(``trials.quantize``, ``trials.calibrate``, ``trials.evaluate``) are summed over every trial
and every worker: worker-seconds, which exceed the wall time when workers run side by side.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

TRIAL_PHASES = ("quantize", "calibrate", "evaluate")


@dataclass
class Stopwatch:
    """Seconds per phase, summed over every time a phase ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def time(self, phase: str) -> Iterator[None]:
        self.seconds.setdefault(phase, 0.0)  # listed in the order the phases began
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - started)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def merge(self, prefix: str, seconds: dict[str, float]) -> None:
        """Add another stopwatch's phases under ``prefix`` (a worker's, measured where it ran)."""
        for phase, value in seconds.items():
            self.add(f"{prefix}.{phase}", value)

    def add_trials(self, trial_seconds: Iterable[dict]) -> None:
        """Sum the ``seconds`` figures of trials: time the workers spent in each trial phase."""
        for seconds in trial_seconds:
            self.merge("trials", {phase: seconds.get(phase, 0.0) for phase in TRIAL_PHASES})


def table(seconds: dict[str, float]) -> str:
    """The phases one per line, sub-phases indented under their phase."""
    lines = []
    for phase, value in seconds.items():
        depth = phase.count(".")
        lines.append(f"{'  ' * depth}{phase.rsplit('.', 1)[-1]:<{24 - 2 * depth}}{value:8.2f} s")
    return "\n".join(lines)
