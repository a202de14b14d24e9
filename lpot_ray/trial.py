"""The trial protocol: what the engine asks a worker to do, what comes back, and the Trial it makes.

The engine sends a ``Request`` (evaluate a config, or inspect its per-op errors) under a
sequence number; a worker answers with an ``Outcome``; the engine turns the pair into a
``Trial``, commits it to the history and tells the strategy. ``Finalized`` is what a worker
returns for the chosen config once compiled and measured. ``TrialExecutor`` is all the engine
knows of the workers, so that it runs the same on a real pool and on a test's fake.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional, Protocol

from .criterion import Criterion
from .space import TuneConfig


class Status(str, enum.Enum):
    """How a request ended. A ``str`` enum: stored in the history as its value."""

    OK = "ok"
    FAILED = "failed"  # the config itself failed (framework error, NaN accuracy, q_func raised)
    CANCELLED = "cancelled"  # the engine no longer needed it
    STOPPED_EARLY = "stopped_early"  # its evaluation stopped once the criterion could not be met: a fail
    WORKER_LOST = "worker_lost"  # only the workers running it died: it runs again on resume

    @property
    def is_failure(self) -> bool:
        return self in (Status.FAILED, Status.WORKER_LOST)

    def __str__(self) -> str:
        return self.value


class Kind(str, enum.Enum):
    """What a request asks for."""

    TRIAL = "trial"  # quantize a candidate config and measure its accuracy
    INSPECTION = "inspection"  # each int8 op's output error against fp32 (for the mse strategy)

    def __str__(self) -> str:
        return self.value


def key_of(kind: Kind, config: TuneConfig) -> str:
    """A trial is known by its config's key; other requests by their kind and the config's key."""
    return config.key if kind is Kind.TRIAL else f"{kind.value}-{config.key}"


@dataclass(frozen=True)
class Request:
    """One unit of work for a worker: a config and what to do with it (``kind``)."""

    config: TuneConfig
    kind: ClassVar[Kind] = Kind.TRIAL

    @property
    def key(self) -> str:
        """Identical requests share a key: the engine runs each once, and resume replays it."""
        return key_of(self.kind, self.config)


@dataclass(frozen=True)
class GiveUp:
    """When a trial's evaluation may stop before its end: once even the best the remaining
    samples could hold would not meet the criterion. Exact, so it saves time and never changes a
    verdict; a trial that passes is always evaluated in full."""

    criterion: Criterion
    samples: int  # in the whole evaluation, counted on the fp32 baseline

    def hopeless(self, reachable: Optional[tuple[float, float]]) -> bool:
        """Whether no final value in ``reachable`` (lowest, highest) passes."""
        if reachable is None:
            return False
        best = reachable[1] if self.criterion.higher_is_better else reachable[0]
        return not self.criterion.passes(best)


@dataclass(frozen=True)
class EvaluateRequest(Request):
    """Quantize ``config`` and evaluate it: a trial.

    ``verdict_only``: the strategy uses only whether it passes, not its accuracy (basic's
    accumulated fallback prefixes, say), so the engine may let it stop once hopeless (``give_up``).
    ``shards``: workers to split its evaluation across, when more are free than configs to try;
    the pool sends each a ``shard`` (index, count) and merges the metric states they return.
    """

    kind: ClassVar[Kind] = Kind.TRIAL
    verdict_only: bool = False
    give_up: Optional[GiveUp] = None
    shards: int = 1
    shard: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class InspectRequest(Request):
    """Each int8 op's output error against fp32 under ``config``.

    A strategy returns it from ``ask`` like a config; it is recorded in the history and told
    back as a Trial of kind ``inspection`` whose ``figures["op_errors"]`` maps op names to
    normalised MSE.
    """

    kind: ClassVar[Kind] = Kind.INSPECTION


def as_request(proposal: "TuneConfig | Request") -> Request:
    """A strategy proposes configs (trials) or requests; the engine handles requests only."""
    return proposal if isinstance(proposal, Request) else EvaluateRequest(proposal)


@dataclass
class Outcome:
    """A worker's answer to request ``seq``."""

    seq: int
    status: Status
    worker: str = ""
    started: float = 0.0
    duration: float = 0.0
    accuracy: Optional[float] = None
    reason: str = ""
    figures: dict = field(default_factory=dict)
    metric_state: Any = None  # a shard's metric, for the pool to merge (never stored)


@dataclass
class Finalized:
    """The chosen config compiled to real kernels: its accuracy there, what runs in which
    precision (read from the compiled code), the measured figures and the model itself."""

    accuracy: Optional[float]
    int8_ops: tuple[str, ...]
    fp32_ops: tuple[str, ...]
    figures: dict
    model: Any  # the quantized model, runnable in its framework
    model_bytes: bytes  # the same model serialised, for saving
    bf16_ops: tuple[str, ...] = ()
    timings: dict = field(default_factory=dict)  # seconds per finalize phase


@dataclass(frozen=True)
class ExecutorStatus:
    """What one job sees of the workers, for the engine and the progress display."""

    free: int  # requests the job may submit now
    pending: bool  # the job has requests running or queued, or outcomes not yet collected
    workers: int = 1  # workers ready
    busy: int = 0  # workers running a request
    starting: int = 0  # workers still starting


class TrialExecutor(Protocol):
    """Where the engine's requests run: ``pool.JobExecutor`` (a job's view of the worker pool),
    or a test's fake."""

    def submit(self, seq: int, request: Request) -> None: ...

    def cancel(self, seq: int) -> None: ...

    def results(self, timeout: float) -> list[Outcome]: ...

    def status(self) -> ExecutorStatus: ...


@dataclass
class Trial:
    """The outcome of one candidate, numbered by proposal order (``seq``)."""

    seq: int
    config: TuneConfig
    status: Status = Status.OK
    accuracy: Optional[float] = None
    passed: bool = False
    objective: Optional[float] = None  # share of MACs left fp32: lower is faster
    reason: str = ""
    worker: str = ""
    started: float = 0.0
    duration: float = 0.0
    figures: dict = field(default_factory=dict)
    # Accuracy headroom against the criterion, relative to the baseline (>= 0 passes); set by
    # the engine when it tells the strategy, for strategies that model "how close to passing".
    margin: Optional[float] = None
    kind: Kind = Kind.TRIAL

    def __post_init__(self) -> None:
        self.status, self.kind = Status(self.status), Kind(self.kind)

    @property
    def key(self) -> str:
        return key_of(self.kind, self.config)
