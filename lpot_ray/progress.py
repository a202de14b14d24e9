"""What a user sees while tuning and after: a live table on a terminal, plain log lines elsewhere
(a pipe, a file, CI), and a final summary table.

The engine calls ``TuningProgress`` after every step of its loop; the live table is redrawn from
the engine's own state each time, so it shows exactly what the engine knows.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, TextIO

from rich.console import Console
from rich.live import Live
from rich.table import Table

from . import timings
from .trial import Kind, Status, Trial

log = logging.getLogger("lpot_ray")
MIN_REDRAW_SECONDS = 0.1  # between redraws when nothing new was told (the clock still moves)


@dataclass(frozen=True)
class Snapshot:
    """The engine's state as the display shows it."""

    done: int  # trials told, cancelled ones excluded
    failed: int
    cancelled: int
    running: int
    busy: int  # workers running a trial
    slots: int  # workers ready
    starting: int  # workers still starting
    best: Optional[Trial]  # the best passing trial so far
    threshold: Optional[float]  # the accuracy a config must reach (or stay under)
    higher_is_better: bool
    elapsed: float
    timeout: float  # 0: no time-out, the tuning stops at the first passing config

    @classmethod
    def of(cls, engine: Any) -> "Snapshot":
        told = engine.told
        workers = engine.executor.status()
        passing = engine.passing()
        criterion = engine.criterion
        return cls(
            done=sum(trial.status != Status.CANCELLED for trial in told),
            failed=sum(trial.status.is_failure for trial in told),
            cancelled=sum(trial.status == Status.CANCELLED for trial in told),
            running=len(engine.in_flight),
            busy=workers.busy,
            slots=workers.workers,
            starting=workers.starting,
            best=passing[0] if passing else None,
            threshold=criterion.threshold,
            higher_is_better=criterion.higher_is_better,
            elapsed=engine.elapsed,
            timeout=engine.exit_policy.timeout,
        )


def progress_table(snapshot: Snapshot) -> Table:
    """The live table: trials, workers, best passing config, time."""
    table = Table(title="lpot-ray tune", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("trials", f"{snapshot.done} done ({snapshot.failed} failed, {snapshot.cancelled} cancelled), "
                            f"{snapshot.running} running")
    starting = f" (+{snapshot.starting} starting)" if snapshot.starting else ""
    table.add_row("workers busy", f"{snapshot.busy} / {snapshot.slots}{starting}")
    table.add_row("best passing", _describe_best(snapshot))
    table.add_row("elapsed", _seconds(snapshot.elapsed))
    if snapshot.timeout > 0:
        table.add_row("time-out left", f"{_seconds(max(0.0, snapshot.timeout - snapshot.elapsed))} of {_seconds(snapshot.timeout)}")
    else:
        table.add_row("time-out left", "none: stops at the first passing config")
    return table


def _describe_best(snapshot: Snapshot) -> str:
    needed = ""
    if snapshot.threshold is not None:
        needed = f" (needs {'>=' if snapshot.higher_is_better else '<='} {snapshot.threshold:.4f})"
    best = snapshot.best
    if best is None:
        return "none yet" + needed
    objective = "-" if best.objective is None else f"{best.objective:.3f}"
    return (f"trial {best.seq}: accuracy {best.accuracy:.4f}{needed}, objective {objective}, "
            f"{len(best.config.fp32_ops)} fp32 ops")


def _seconds(value: float) -> str:
    if value < 10:
        return f"{value:.1f} s"
    return f"{value:.0f} s" if value < 120 else f"{int(value // 60)} min {value % 60:02.0f} s"


def describe_trial(trial: Trial) -> str:
    """One plain line per finished trial."""
    if trial.kind != Kind.TRIAL:
        return f"{trial.kind} {trial.seq} {trial.status} {trial.reason}".rstrip()
    accuracy = "-" if trial.accuracy is None else f"{trial.accuracy:.4f}"
    outcome = "passed" if trial.passed else trial.reason
    return f"trial {trial.seq} {trial.status} accuracy={accuracy} fp32 ops={len(trial.config.fp32_ops)} {outcome}".rstrip()


class TuningProgress:
    """The engine's progress callback: a rich ``Live`` table when the console is a terminal,
    else one log line per finished trial."""

    def __init__(self, stream: Optional[TextIO] = None, enabled: bool = True, console: Optional[Console] = None):
        self.console = console or Console(file=stream or sys.stdout)
        self.live_enabled = enabled and self.console.is_terminal
        self.live: Optional[Live] = None
        self.reported = 0
        self.drawn = 0.0

    def __call__(self, engine: Any) -> None:
        new_trials = [trial for trial in engine.told[self.reported:] if trial.status != Status.CANCELLED]
        self.reported = len(engine.told)
        for trial in new_trials:
            self._report(trial)
        if self.live_enabled and (new_trials or time.monotonic() - self.drawn >= MIN_REDRAW_SECONDS):
            self._draw(Snapshot.of(engine))

    def _report(self, trial: Trial) -> None:
        line = describe_trial(trial)
        if self.live is not None:
            if log.isEnabledFor(logging.INFO):
                self.live.console.print(line, markup=False, highlight=False)  # above the live table
        else:
            log.info(line)

    def _draw(self, snapshot: Snapshot) -> None:
        table = progress_table(snapshot)
        if self.live is None:
            redirect = self.console.file in (sys.stdout, sys.stderr)
            self.live = Live(table, console=self.console, auto_refresh=False,
                             redirect_stdout=redirect, redirect_stderr=redirect)
            self.live.start()
        self.live.update(table, refresh=True)
        self.drawn = time.monotonic()

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None




def summary_table(result: Any, wall_seconds: Optional[float] = None) -> Table:
    """The final summary of a tuning: accuracy against the baseline, ops, latency, trials, time."""
    table = Table(title="lpot-ray tune", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    if result.passed:
        table.add_row("result", "passed")
        table.add_row("int8 accuracy", "-" if result.accuracy is None else f"{result.accuracy:.4f}")
    else:
        closest = result.best_failing
        table.add_row("result", "no config met the criterion" + (f"; closest accuracy {closest.accuracy:.4f}" if closest else ""))
        if result.reason:
            table.add_row("why", result.reason)
    table.add_row("fp32 accuracy", "-" if result.baseline is None else f"{result.baseline:.4f} (baseline)")
    if result.passed:
        table.add_row("int8 ops", f"{len(result.int8_ops)}: {', '.join(result.int8_ops) or '-'}")
        table.add_row("ops left fp32", f"{len(result.fp32_ops)}: {', '.join(result.fp32_ops) or 'none'}")
        figures = result.objectives
        if "latency_ratio" in figures:
            table.add_row("latency per batch", f"fp32 {figures['fp32_latency_ms']:.2f} ms, int8 {figures['latency_ms']:.2f} ms "
                                               f"(fp32/int8 {figures['latency_ratio']:.2f}x)")
    table.add_row("trials", f"{result.n_trials} ({result.n_evaluated} evaluated now)")
    if wall_seconds is not None:
        table.add_row("wall time", f"{wall_seconds:.1f} s")
    table.add_row("stopped by", result.stopped_by or "-")
    if result.timings:
        table.add_row("time per phase", timings.table(result.timings))
    table.add_row("workspace", f"{result.workspace} (history.db" + (", int8_model)" if result.passed else ")"))
    return table
