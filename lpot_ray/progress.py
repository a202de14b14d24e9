"""A live progress line while tuning (a terminal), or log lines (anything else)."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from .trial import CANCELLED, FAILED, TRIAL

log = logging.getLogger("lpot_ray")


class ProgressLine:
    """trials done / running / failed, best passing so far, elapsed time."""

    def __init__(self, stream: TextIO = sys.stderr, enabled: bool = True):
        self.stream = stream
        self.live = enabled and stream.isatty()
        self.last = ""
        self.reported = 0

    def __call__(self, engine: Any) -> None:
        new_trials = [trial for trial in engine.told[self.reported:] if trial.status != CANCELLED]
        self.reported = len(engine.told)
        if new_trials and self.live and self.last:
            self.stream.write("\r" + " " * len(self.last) + "\r")  # log lines go above the live line
            self.last = ""
        for trial in new_trials:
            if trial.kind != TRIAL:
                log.info("%s %d %s %s", trial.kind, trial.seq, trial.status, trial.reason)
                continue
            log.info("trial %d %s accuracy=%s fp32 ops=%d %s", trial.seq, trial.status,
                     "-" if trial.accuracy is None else f"{trial.accuracy:.4f}", len(trial.config.fp32_ops),
                     "passed" if trial.passed else trial.reason)
        if self.live:
            self._draw(engine)

    def _draw(self, engine: Any) -> None:
        failed = sum(trial.status == FAILED for trial in engine.told)
        passing = engine.passing()
        best = f"best {passing[0].accuracy:.4f} ({len(passing[0].config.fp32_ops)} fp32 ops)" if passing else "no pass yet"
        line = (f"trials {len(engine.told)} done, {len(engine.in_flight)} running, {failed} failed | "
                f"{best} | {engine.elapsed:.0f}s")
        if line != self.last:
            self.stream.write("\r" + line.ljust(len(self.last)))
            self.stream.flush()
            self.last = line

    def close(self) -> None:
        if self.live and self.last:
            self.stream.write("\n")
            self.stream.flush()
