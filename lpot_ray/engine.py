"""The ask/tell loop: keep every worker busy while the strategy has work, decide deterministically.

Proposals are numbered in the order the strategy made them (``seq``). Outcomes may arrive in any
order, but each is committed to the history at once and told to the strategy strictly in
proposal order, so the search, the stop at the first passing config (``timeout: 0``) and the
final choice never depend on which worker was faster or how many there were.

Two things save time without changing any result: a trial whose accuracy the strategy does not
use (``verdict_only``) gets a ``GiveUp`` bound, so its worker stops it once it can't pass; and
workers no config needs are given to splitting the evaluations of those submitted (``shards``),
for metrics whose parts merge exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .config import ExitPolicy
from .criterion import Criterion
from .history import History
from .space import TuneConfig
from .strategies.base import Strategy
from .trial import EvaluateRequest, GiveUp, Kind, Outcome, Request, Status, Trial, TrialExecutor, as_request

SAME_FAILURES = 3  # the first trials failing alike that stop a tuning


@dataclass
class EngineOutcome:
    trials: list[Trial]  # every trial told to the strategy, in proposal order
    evaluated: list[Trial]  # those a worker ran in this run (not replayed from the history)
    stopped_by: str
    passing: list[Trial] = field(default_factory=list)  # best first

    @property
    def n_evaluated(self) -> int:
        return len(self.evaluated)


class Engine:
    def __init__(
        self,
        strategy: Strategy,
        executor: TrialExecutor,
        history: History,
        criterion: Criterion,
        exit_policy: ExitPolicy,
        objective: Callable[[TuneConfig], float],
        on_progress: Callable[["Engine"], None] = lambda engine: None,
        evaluation_samples: Optional[int] = None,
        shards_at_most: int = 1,
    ):
        self.strategy = strategy
        self.executor = executor
        self.history = history
        self.criterion = criterion
        self.exit_policy = exit_policy
        self.objective = objective
        self.on_progress = on_progress
        # Samples in the whole evaluation (counted on the baseline): what lets a verdict-only
        # trial stop once hopeless. None: every trial is evaluated in full.
        self.evaluation_samples = evaluation_samples
        # Workers one trial's evaluation may be split across, when more are free than configs to try.
        self.shards_at_most = shards_at_most
        # Outcomes to replay instead of re-running; a trial lost to dying workers is run again.
        self.known: dict[str, Trial] = {trial.key: trial for trial in history.trials()
                                        if trial.status != Status.WORKER_LOST}
        self.proposals: dict[int, Request] = {}  # configs to try and requests for data
        self.in_flight: dict[int, Request] = {}
        self.finished: dict[int, Trial] = {}  # outcomes not yet told
        self.told: list[Trial] = []
        self.evaluated: list[Trial] = []
        self.started = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self) -> EngineOutcome:
        stopped_by = ""
        while True:
            stopped_by = self._tell_in_order() or stopped_by
            self._cancel_obsolete()
            stopped_by = stopped_by or self._limit_reached()
            if stopped_by:
                self._collect(self.executor.results(timeout=0))  # keep what finished meanwhile
                for seq in list(self.in_flight):
                    self._cancel(seq)
                stopped_by = self._tell_in_order() or stopped_by
            else:
                self._propose()
            self.on_progress(self)
            if not self.in_flight and not self.finished:
                if stopped_by or self.strategy.finished:
                    break
                if self._propose():
                    continue
                if not self.executor.status().pending:
                    break  # the strategy has nothing more to propose and nothing is running
            if len(self.told) in self.finished:
                continue  # outcomes to tell now (e.g. replayed from the history): no waiting
            self._collect(self.executor.results(timeout=0.5))
        return EngineOutcome(self.told, self.evaluated, stopped_by or "strategy finished", self.passing())

    def passing(self) -> list[Trial]:
        """Passing trials, best first: the first in proposal order when timeout is 0, else the
        lowest objective, then the highest accuracy, then the config key."""
        passing = [trial for trial in self.told if trial.passed and trial.kind == Kind.TRIAL]
        if self.exit_policy.timeout == 0:
            return passing
        return sorted(passing, key=lambda trial: (trial.objective, -self.criterion.margin(trial.accuracy), trial.key))

    @property
    def counted(self) -> int:
        """Proposals that count against max_trials: not the speculative ones the strategy has
        since declared moot, however far they got, so the count is the same for any number of
        workers."""
        obsolete = self.strategy.obsolete()
        return sum(item.kind == Kind.TRIAL and item.key not in obsolete for item in self.proposals.values())

    # --- proposing ---------------------------------------------------------------------------
    def _propose(self) -> bool:
        budget = self.exit_policy.max_trials - self.counted
        free = self.executor.status().free
        wanted = min(free, budget)
        if wanted <= 0:
            return False
        proposals = self.strategy.ask(wanted)
        submitted: list[tuple[int, Request]] = []
        for item in map(as_request, proposals):
            self.strategy.space.check(item.config)
            seq = len(self.proposals)
            self.proposals[seq] = item
            if item.key in self.known and _answers(self.known[item.key], item):
                self.finished[seq] = replace(self.known[item.key], seq=seq)
            elif any(other.key == item.key for other in self.in_flight.values()):
                pass  # answered when the identical in-flight proposal finishes
            else:
                self.in_flight[seq] = item
                submitted.append((seq, self._with_give_up(item)))
        for (seq, request), shards in zip(submitted, self._shards(free - len(submitted), submitted)):
            self.executor.submit(seq, replace(request, shards=shards) if shards > 1 else request)
        return bool(proposals)

    def _shards(self, spare: int, submitted: list[tuple[int, Request]]) -> list[int]:
        """Workers for each submitted request: the free ones no config needs go to splitting the
        evaluations that can be split (not those that may stop early), evenly."""
        splittable = [index for index, (_, request) in enumerate(submitted)
                      if isinstance(request, EvaluateRequest) and request.give_up is None]
        shards = [1] * len(submitted)
        if self.shards_at_most <= 1 or spare <= 0 or not splittable:
            return shards
        for turn in range(spare):
            index = splittable[turn % len(splittable)]
            shards[index] = min(self.shards_at_most, shards[index] + 1)
        return shards

    def _with_give_up(self, request: Request) -> Request:
        """A trial whose accuracy the strategy does not use may stop once it can't pass."""
        if self.evaluation_samples and isinstance(request, EvaluateRequest) and request.verdict_only:
            return replace(request, give_up=GiveUp(self.criterion, self.evaluation_samples))
        return request

    # --- outcomes ----------------------------------------------------------------------------
    def _collect(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            item = self.in_flight.pop(outcome.seq, None)
            if item is None:
                continue
            trial = self._trial(item, outcome)
            self.history.record(trial)  # committed before the strategy hears of it
            self.evaluated.append(trial)
            self.known[trial.key] = trial
            self.finished[outcome.seq] = trial
            for other_seq in self._waiting_on(trial.key):
                self.finished[other_seq] = replace(trial, seq=other_seq)

    def _trial(self, request: Request, outcome: Outcome) -> Trial:
        trial = Trial(seq=outcome.seq, config=request.config, status=outcome.status, reason=outcome.reason,
                      worker=outcome.worker, started=outcome.started, duration=outcome.duration,
                      figures=outcome.figures, kind=request.kind)
        if request.kind == Kind.TRIAL:
            trial.accuracy = outcome.accuracy
            trial.passed = outcome.status == Status.OK and self.criterion.passes(outcome.accuracy)
            trial.objective = self.objective(request.config)
        return trial

    def _tell_in_order(self) -> str:
        while len(self.told) in self.finished:
            trial = self.finished.pop(len(self.told))
            trial.margin = self.criterion.margin(trial.accuracy) if trial.status == Status.OK else None
            self.told.append(trial)
            self.strategy.tell(trial)
            if trial.passed and self.exit_policy.timeout == 0:
                return "first passing config (timeout 0)"
            if same_failure := self._same_failure():
                return same_failure
        return ""

    def _same_failure(self) -> str:
        """The first trials all failed for one reason (the data, the eval_func, the framework):
        the others would too, so the tuning stops saying why instead of running them all."""
        return common_failure(self.told, minimum=SAME_FAILURES)

    def _limit_reached(self) -> str:
        if self.strategy.finished:
            return ""
        if self.exit_policy.timeout > 0 and self.elapsed >= self.exit_policy.timeout:
            return f"timeout of {self.exit_policy.timeout:g} s"
        if self.counted >= self.exit_policy.max_trials and not self.in_flight and len(self.told) == len(self.proposals):
            return f"max_trials {self.exit_policy.max_trials}"
        return ""

    # --- cancelling --------------------------------------------------------------------------
    def _cancel_obsolete(self) -> None:
        obsolete = self.strategy.obsolete()
        for seq, item in list(self.in_flight.items()):
            if item.key in obsolete:
                self._cancel(seq)
        for key in obsolete:
            for seq in self._waiting_on(key):
                self.finished[seq] = _cancelled(seq, self.proposals[seq])

    def _cancel(self, seq: int) -> None:
        item = self.in_flight.pop(seq)
        self.executor.cancel(seq)
        followers = self._waiting_on(item.key)  # duplicates waiting on it
        for cancelled in [seq, *followers]:
            self.finished[cancelled] = _cancelled(cancelled, item)

    def _waiting_on(self, key: str) -> list[int]:
        """Untold proposals of ``key`` that wait for an identical in-flight proposal."""
        return [seq for seq, item in self.proposals.items()
                if item.key == key and seq >= len(self.told) and seq not in self.finished and seq not in self.in_flight]


def common_failure(trials: list[Trial], minimum: int = 1) -> str:
    """"every trial failed: <reason>" when at least ``minimum`` trials ran (cancelled ones aside)
    and every one failed for the same reason."""
    tried = [trial for trial in trials if trial.kind == Kind.TRIAL and trial.status != Status.CANCELLED]
    reasons = {trial.reason for trial in tried}
    if len(tried) < max(1, minimum) or any(trial.status != Status.FAILED for trial in tried) or len(reasons) != 1:
        return ""
    return f"every trial failed: {reasons.pop()}"


def _answers(known: Trial, request: Request) -> bool:
    """Whether a trial already known answers a new proposal of its config: not one stopped early
    when the proposal needs its accuracy."""
    return known.status != Status.STOPPED_EARLY or (isinstance(request, EvaluateRequest) and request.verdict_only)


def _cancelled(seq: int, request: Request) -> Trial:
    return Trial(seq, request.config, status=Status.CANCELLED, kind=request.kind)
