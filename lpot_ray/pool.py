"""The workers of every tuning: the driver's own thread and Ray actors, shared by any number of jobs.

``tune()`` is a pool with one job, ``tune_many()`` a pool with several; the code is the same.

Workers. The driver is always worker 0: it holds every job's fp32 model already, so it runs
requests from the first second while Ray starts and the Ray workers import their framework. Each
Ray worker is a ``TrialWorker`` actor holding a ``TrialRunner`` per job (adaptor, model, data),
built from one object-store copy of the job; it joins once it has loaded the jobs. A request
sends a config and gets back an ``Outcome``. On a cluster the workers are spread across nodes
(Ray's SPREAD scheduling), so losing a node costs as few workers as possible.

When Ray starts (one place, ``_want_ray``): at once where it is cheap to reach (a cluster, a
Ray this process already runs) or where several jobs share the pool; otherwise a private local
Ray starts only when a job submits its second request, i.e. when its first one did not end it.
A tuning never waits for Ray to start or stop.

Fairness: every job has its own queue; a free worker goes to the job with the fewest running
requests among the jobs with one waiting (ties: the job listed first), and a job may have at
most its share of the ready workers (workers / unfinished jobs, rounded up) running or queued.

Jobs join with ``add_job`` and leave with ``job_done``, which frees their models on every worker;
inside a ``lpot_ray.workers()`` block (warm.py) the pool outlives them, and running Ray workers
load a job as it joins. A request that asks for ``shards`` (more workers free than configs to
try) runs as that many parts of its evaluation, whose metric states are merged into one outcome.

Failures: a worker that dies costs only its running request, which is retried elsewhere up to
``MAX_RETRIES`` times, on Ray workers only: never in the driver, whose death would end every
job. A worker that waits longer than ``ray.worker_start_timeout`` for a node is dropped with a
log line, so that no request waits for it forever.

Concurrency: one lock guards the pool's state. Requests are dispatched as they are submitted
(in the engine's thread) and as workers finish; the pool's own thread takes finished requests,
starts workers once Ray is up and admits them; each job's engine waits on a condition for its
outcomes. Ray is released only once that thread has stopped and the pool holds no Ray handle.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import ClusterError
from .evaluation import as_accuracy
from .ray_session import RayPlan, RaySession
from .space import TuneConfig
from .trial import EvaluateRequest, ExecutorStatus, Finalized, Outcome, Request, Status
from .user_code import ship_user_code_by_value
from .worker import TrialRunner, TrialWorker, WorkerJob

MAX_RETRIES = 2
TIMEOUT_GRACE = 10.0  # seconds a timed-out request has to stop before its worker is given up
SHUTDOWN_WAIT = 5.0  # seconds shutdown waits for the pool's thread before leaving Ray's release to it
log = logging.getLogger("lpot_ray")


# --- workers -----------------------------------------------------------------------------------
class TrialThread:
    """The driver's trial thread: one daemon thread taking calls in order. A daemon, unlike a
    ThreadPoolExecutor's, so that a call blocked for good in the user's code (a stuck eval_func)
    never keeps the process from exiting; ``replace`` leaves such a thread behind."""

    def __init__(self) -> None:
        self.lock = threading.Lock()  # submit and replace: no call lands on a queue being retired
        self.calls: queue.Queue = queue.Queue()
        self.thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._serve, args=(self.calls,), name="lpot-ray-trial", daemon=True)
        thread.start()
        return thread

    def submit(self, function: Callable[..., Any], *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.lock:
            self.calls.put((future, function, args))
        return future

    def _serve(self, calls: queue.Queue) -> None:
        while (call := calls.get()) is not None:
            future, function, args = call
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(function(*args))
                except BaseException as error:  # handed to whoever waits on the future
                    future.set_exception(error)
            if calls is not self.calls:
                return  # replaced while this call ran: a new thread serves now

    def replace(self) -> None:
        """Serve further calls, those waiting included, on a new thread; the current one ends
        when its call returns."""
        with self.lock:
            old, self.calls = self.calls, queue.Queue()
            with contextlib.suppress(queue.Empty):
                while True:
                    self.calls.put(old.get_nowait())
            old.put(None)
            self.thread = self._start()

    def close(self, timeout: Optional[float]) -> None:
        self.calls.put(None)
        self.thread.join(timeout)


class DriverSlot:
    """Worker 0: one thread of the driver running each job's requests on the driver's own runner."""

    name = "driver"
    is_driver = True

    def __init__(self) -> None:
        self.runners: dict[str, TrialRunner] = {}
        self.thread = TrialThread()
        self.cancelled: set[tuple[str, int]] = set()
        self.restore: list[Callable[[], None]] = []  # thread counts to give back, newest last

    def run(self, job_id: str, seq: int, request: Request) -> concurrent.futures.Future:
        should_stop = lambda: (job_id, seq) in self.cancelled  # noqa: E731
        return self.thread.submit(self.runners[job_id].run, seq, request, should_stop)

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function`` on the trial thread: compiling while that thread traces another job's
        model is not thread-safe in torch."""
        return self.thread.submit(function, *args).result()

    def abandon(self) -> None:
        """Leave a request that does not stop to its thread and go on with a new one."""
        self.thread.replace()

    def cancel(self, job_id: str, seq: int) -> None:
        self.cancelled.add((job_id, seq))

    def drop(self, job_id: str) -> None:
        """Forget a finished job's runner (its model is the user's); its thread count is given
        back once no job runs, newest first, so the process ends with the count it began with."""
        runner = self.runners.pop(job_id, None)
        if runner is not None:
            self.restore.append(runner.close)

    def restore_threads(self) -> None:
        while self.restore:
            self.restore.pop()()

    def close(self, wait: bool = True) -> None:
        """Stop the trial thread once its call returns; without ``wait`` (a call past its time
        limit, maybe blocked for good) give it a moment and leave it."""
        self.thread.close(timeout=None if wait else 1.0)
        for job_id in list(self.runners):
            self.drop(job_id)
        self.restore_threads()


class RaySlot:
    """The driver's handle on one TrialWorker actor."""

    is_driver = False

    def __init__(self, actor_class: Any, job_refs: dict[str, Any], name: str, first_job: Optional[str]):
        self.name = name
        self.job_refs = job_refs  # the pool's: every job's object-store copy, by job id
        self.actor = actor_class.remote(name)
        self.placed = self.actor.placed.remote().future()  # done once a node took it
        first = [job_refs[first_job]] if first_job is not None else []
        self.ready = self.actor.ready.remote(first_job, first).future()
        self.since = time.monotonic()  # when it was asked for, for the start-up timeout

    def run(self, job_id: str, seq: int, request: Request) -> concurrent.futures.Future:
        return self.actor.run.remote(job_id, [self.job_refs[job_id]], seq, request).future()

    def load(self, job_id: str) -> None:
        """Load a job's model and data now, ahead of its first request (a failure shows then)."""
        self.actor.ready.remote(job_id, [self.job_refs[job_id]])

    def cancel(self, job_id: str, seq: int) -> None:
        self.actor.cancel.remote(job_id, seq)

    def drop(self, job_id: str) -> None:
        self.actor.drop.remote(job_id)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


# --- the pool ----------------------------------------------------------------------------------
@dataclass
class Waiting:
    """A request waiting for a worker; ``attempt`` > 0 once a worker died running it."""

    seq: int
    request: Request
    attempt: int = 0


@dataclass
class Running:
    job_id: str
    item: Waiting
    slot: Any
    started: float = field(default_factory=time.monotonic)
    timed_out: bool = False  # past its job's trial time limit: reported failed, asked to stop


@dataclass
class JobState:
    """One job's queue, running count and outcomes not yet collected by its engine."""

    waiting: collections.deque = field(default_factory=collections.deque)
    running: int = 0
    cancelled: set = field(default_factory=set)
    outcomes: list = field(default_factory=list)
    partials: dict = field(default_factory=dict)  # seq -> its shards' outcomes so far (None: not in yet)
    submitted: int = 0
    active: bool = True
    trial_timeout: Optional[float] = None  # seconds a request may run; None: no limit


class WorkerPool:
    """The workers of one or more jobs, keyed by job id, and the fair dispatch of their requests."""

    def __init__(self, plan: Optional[RayPlan], use_driver: bool = True, connect_now: bool = False):
        self.jobs: dict[str, WorkerJob] = {}  # the unfinished jobs, by job id
        self.job_refs: dict[str, Any] = {}  # their object-store copies, once Ray workers exist
        self.plan = plan
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # an outcome arrived or the workers changed
        self.driver = DriverSlot()
        self.slots: list[Any] = [self.driver] if use_driver else []
        self.idle: list[Any] = list(self.slots)
        self.starting: list[Any] = []
        self.states: dict[str, JobState] = {}
        self.running: dict[concurrent.futures.Future, Running] = {}
        self.lost: dict[tuple[str, int], str] = {}  # why the last worker of a retried request died
        # After each dispatch: job -> (running, waiting) of the jobs with requests in either, to check fairness.
        self.snapshots: list[dict[str, tuple[int, int]]] = []
        self.session: Optional[RaySession] = None
        self.error: Optional[BaseException] = None  # a cluster that could not be reached
        self.start_timeout = plan.start_timeout if plan is not None else 300.0
        self._slot_factory: Optional[Callable[[str, str], RaySlot]] = None
        self.events: queue.Queue = queue.Queue()  # finished futures (None: a worker got ready), for the pool's thread
        self._closed = threading.Event()
        self._leaving = threading.Lock()
        self._left = 0  # of the pool's thread and shutdown: the second to leave releases Ray
        self._watcher = threading.Thread(target=self._watch, name="lpot-ray-pool", daemon=True)
        self._watcher.start()
        if plan is not None and (connect_now or plan.connect_eagerly()):
            self._want_ray()

    def add_job(self, name: str, runner: TrialRunner) -> "JobExecutor":
        """Take a job on (``runner`` is the driver's); its id is ``name``, made unique in this
        pool. Jobs that are to share the workers fairly from the start are added before any runs:
        their shares are fixed by how many there are."""
        copy = self._copy_into_ray(runner.job) if self._slot_factory is not None else None
        with self.lock:
            job_id = name if name not in self.states else next(
                f"{name}-{index}" for index in itertools.count(2) if f"{name}-{index}" not in self.states)
            self.jobs[job_id] = runner.job
            self.states[job_id] = JobState()
            self.driver.runners[job_id] = runner
            if copy is not None:
                self.job_refs[job_id] = copy
                for slot in self.slots:  # running workers load it while the driver measures the baseline
                    if not slot.is_driver:
                        slot.load(job_id)
            if sum(state.active for state in self.states.values()) > 1:
                self._want_ray()  # several jobs: more work than the driver alone
        return JobExecutor(self, job_id)

    # --- Ray workers -------------------------------------------------------------------------
    def _want_ray(self) -> None:
        """Start connecting to Ray (idempotent); the watcher adds workers once it is up."""
        if self.plan is not None and self.session is None and not self._closed.is_set():
            self.session = self.plan.connect()
            self.events.put(None)  # wakes the pool's thread, which adds the workers once Ray is up

    def check_cluster(self, timeout: float = 60.0) -> None:
        """Raise ClusterError unless a cluster named by an address is connected: a connection
        that fails (say, a missing auth token) is reported before trials, not in their midst.
        Reaching a running cluster takes well under a second, hidden behind the fp32 baseline."""
        if self.session is not None and self.session.address:
            self.session.wait_connected(timeout)

    def _watch(self) -> None:
        """The pool's own thread: take finished requests, start workers once Ray is up, admit
        them as they get ready, drop those stuck. Future callbacks only hand their future over:
        a callback runs in one of Ray's threads, which must not call into Ray itself."""
        try:
            self._serve_events()
        finally:
            self._leave()

    def _serve_events(self) -> None:
        grown = False
        while not self._closed.is_set():
            session = self.session
            if not grown and session is not None and session.ready.is_set():
                grown = True
                self._grow(session)  # without the lock: copying the jobs into Ray may take seconds
            connecting = session is not None and not grown
            finished = []
            with contextlib.suppress(queue.Empty):
                finished.append(self.events.get(timeout=0.05 if connecting else 0.25))
                while True:
                    finished.append(self.events.get_nowait())
            with self.lock:
                for future in finished:
                    if future is not None:
                        self._finished(future)
                self._enforce_time_limits()
                self._admit()

    def _grow(self, session: RaySession) -> None:
        if self._closed.is_set():
            return
        if session.error is not None:
            if session.address:  # a cluster the user named: the tuning must not go on without it
                error = session.error
                with self.lock:
                    self.error = error if isinstance(error, ClusterError) else ClusterError(f"Ray cluster {session.address!r}: {error}")
                    self.changed.notify_all()
            else:
                log.warning("a local Ray could not start (%s); trials run in the driver alone", session.error)
            return
        cluster = session.cluster_resources()
        for name in sorted(set(self.plan.resources_per_worker) - set(cluster)):
            log.warning("ray.resources_per_worker: no node of the cluster has resource %r (yet); workers wait for one", name)
        count = self.plan.ray_workers(cluster)
        if count > 0:
            try:
                self.add_ray_workers(count, self.plan.cpus_per_worker, self.plan.resources_per_worker)
            except Exception as error:  # a job that can't travel (an eval_func holding a lock, say)
                log.warning("the jobs can't be sent to Ray workers (%s); trials run in the driver alone",
                            start_failure(error))

    def add_ray_workers(self, count: int, cpus_per_worker: float, resources: Optional[dict[str, float]] = None) -> None:
        """Start ``count`` Ray worker actors, spread across nodes; each becomes a slot once ready."""
        import ray

        actor_class = ray.remote(TrialWorker).options(num_cpus=cpus_per_worker, resources=dict(resources or {}),
                                                      scheduling_strategy="SPREAD", max_concurrency=2)
        with self.lock:
            jobs = dict(self.jobs)
        copies = {job_id: self._copy_into_ray(job) for job_id, job in jobs.items()}
        with self.lock:
            if self._closed.is_set():
                return  # the tuning ended while the jobs were copied
            self.job_refs.update((job_id, copy) for job_id, copy in copies.items() if job_id in self.jobs)
            self._slot_factory = lambda name, first: RaySlot(actor_class, self.job_refs, name, first)
            for index in range(1, count + 1):
                self._start(f"worker-{index}")

    @staticmethod
    def _copy_into_ray(job: WorkerJob) -> Any:
        """The job's model and data into Ray's object store: once per job, whatever the workers."""
        import ray

        ship_user_code_by_value(job)
        return ray.put(job)

    def _start(self, name: str) -> None:
        """A worker loads an unfinished job as it starts, if there is one, proving its node can."""
        first = next((job_id for job_id in self.jobs if job_id in self.job_refs), None)
        slot = self._slot_factory(name, first)
        slot.ready.add_done_callback(lambda _: self.events.put(None))  # wakes the pool's thread to admit it
        self.starting.append(slot)

    def _admit(self) -> None:
        """Ready workers join; those that failed to start are reported; stuck ones are dropped."""
        for slot in [slot for slot in self.starting if slot.ready.done()]:
            self.starting.remove(slot)
            try:
                node = slot.ready.result()
            except Exception as error:  # a worker that can't start is reported and left out
                log.warning("%s could not start: %s", slot.name, start_failure(error))
                continue
            log.info("%s ready on node %s", slot.name, node)
            self.slots.append(slot)
            self.idle.append(slot)
            self.changed.notify_all()
        now = time.monotonic()
        for slot in [slot for slot in self.starting if not slot.placed.done() and now - slot.since > self.start_timeout]:
            # A worker no node can take (resources busy or missing, its node gone) waits forever in
            # Ray. Only the wait for a node counts, not the loading of the jobs once placed.
            self.starting.remove(slot)
            log.warning("%s did not start within %.0f s: no node has its resources free; dropped", slot.name, self.start_timeout)
            with contextlib.suppress(Exception):
                slot.close()
        self._dispatch()

    # --- requests ----------------------------------------------------------------------------
    def planned_share(self) -> int:
        """Workers each unfinished job can expect, known before Ray is up: what the strategies
        size their rounds by, so that their proposals do not depend on timing."""
        planned = self.plan.planned_workers() if self.plan is not None else 1
        return max(1, math.ceil(planned / max(1, sum(state.active for state in self.states.values()))))

    def share(self, job_id: str) -> int:
        """How many more requests a job may submit now: its share of the ready workers, less what
        it has running or waiting."""
        with self.lock:
            active = sum(state.active for state in self.states.values())
            state = self.states[job_id]
            return max(0, math.ceil(len(self.slots) / max(1, active)) - state.running - len(state.waiting))

    def submit(self, job_id: str, seq: int, request: Request) -> None:
        """Queue a request; one with ``shards`` > 1 becomes that many parts of its evaluation,
        whose metric states are merged into one outcome when the last is in."""
        with self.lock:
            state = self.states[job_id]
            count = request.shards if isinstance(request, EvaluateRequest) else 1
            if count > 1:
                state.partials[seq] = [None] * count
                state.waiting.extend(Waiting(seq, dataclasses.replace(request, shards=1, shard=(index, count)))
                                     for index in range(count))
            else:
                state.waiting.append(Waiting(seq, request))
            state.submitted += 1
            if state.submitted == 2:  # the first request did not end the job: more work than the driver alone
                self._want_ray()
            self._dispatch()

    def _dispatch(self) -> None:
        if not any(not slot.is_driver for slot in self.slots + self.starting):
            self._fail_retries()
        while self.idle:
            ray_idle = any(not slot.is_driver for slot in self.idle)
            ready = [job_id for job_id, state in self.states.items()
                     if state.waiting and (ray_idle or state.waiting[0].attempt == 0)]
            if not ready:
                return
            job_id = min(ready, key=lambda name: self.states[name].running)  # ties: the job listed first
            state = self.states[job_id]
            item = state.waiting.popleft()
            slot = next(slot for slot in self.idle if not (item.attempt > 0 and slot.is_driver))
            self.idle.remove(slot)
            state.running += 1
            if not slot.is_driver and job_id not in self.job_refs:
                self.job_refs[job_id] = self._copy_into_ray(self.jobs[job_id])  # added as Ray workers started
            future = slot.run(job_id, item.seq, item.request)
            self.running[future] = Running(job_id, item, slot)
            self.snapshots.append({name: (other.running, len(other.waiting)) for name, other in self.states.items()
                                   if other.running or other.waiting})
            future.add_done_callback(self.events.put)  # handled by the pool's thread

    def _fail_retries(self) -> None:
        """With no Ray worker left or coming, a request that killed one can't be retried: lost."""
        for job_id, state in self.states.items():
            for item in [item for item in state.waiting if item.attempt > 0]:
                if item not in state.waiting:
                    continue  # a shard whose request another shard's loss has ended
                state.waiting.remove(item)
                reason = self.lost.get((job_id, item.seq), "?")
                self._deliver(job_id, lost(item.seq, f"no Ray worker is left to retry it after: {reason}"))

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self.lock:
            running = self.running.pop(future, None)
            if running is None:
                return
            job_id, item, slot = running.job_id, running.item, running.slot
            state = self.states[job_id]
            state.running -= 1
            try:
                outcome: Optional[Outcome] = future.result()
                self.idle.append(slot)
            except Exception as error:  # the worker process died or Ray failed to deliver
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                log.warning("%s failed while running trial %d of %s: %s", slot.name, item.seq, job_id, reason)
                self._replace(slot)
                self.lost[(job_id, item.seq)] = reason
                outcome = None
                if item.attempt < MAX_RETRIES and item.seq not in state.cancelled:
                    state.waiting.appendleft(Waiting(item.seq, item.request, item.attempt + 1))
                else:
                    outcome = lost(item.seq, f"worker failed {item.attempt + 1} times running this trial; last: {reason}")
            if outcome is not None:
                self._deliver(job_id, outcome, item.request)
            self.changed.notify_all()  # a worker is free: the engines may propose more
            self._dispatch()

    def _deliver(self, job_id: str, outcome: Outcome, request: Optional[Request] = None) -> None:
        """Hand an outcome to its job's engine; cancelled requests report nothing. A shard's
        outcome waits for the others of its request; a failed one stands for all of them."""
        state = self.states[job_id]
        if outcome.seq in state.cancelled or outcome.status == Status.CANCELLED:
            return
        parts = state.partials.get(outcome.seq)
        if parts is not None:
            shard = request.shard if isinstance(request, EvaluateRequest) else None
            if outcome.status == Status.OK and shard is not None:
                parts[shard[0]] = outcome
                if any(part is None for part in parts):
                    return
                outcome = merged_shards(parts)
            else:
                self.cancel(job_id, outcome.seq)  # the other shards no longer matter
            del state.partials[outcome.seq]
        state.outcomes.append(outcome)
        self.changed.notify_all()

    def _replace(self, slot: Any) -> None:
        self.slots.remove(slot)
        if slot.is_driver:  # the driver's thread survives whatever its request raised
            self.slots.append(slot)
            self.idle.append(slot)
        elif self._slot_factory is not None:
            with contextlib.suppress(Exception):
                slot.close()  # free its resources if it is only unreachable, not dead
            self._start(slot.name)

    def set_trial_timeout(self, job_id: str, seconds: Optional[float]) -> None:
        with self.lock:
            self.states[job_id].trial_timeout = seconds or None

    def _enforce_time_limits(self) -> None:
        """A request past its job's limit is reported failed and asked to stop at its next batch;
        one still running ``TIMEOUT_GRACE`` later (blocked in the user's code, say) loses its
        worker: a Ray worker is replaced, the driver goes on with a new thread."""
        now = time.monotonic()
        for future, running in list(self.running.items()):
            job_id, seq, slot = running.job_id, running.item.seq, running.slot
            state = self.states[job_id]
            limit = state.trial_timeout
            if slot.is_driver and not future.running() and not future.done():
                running.started = now  # queued behind a finalize on the trial thread: not started yet
            if limit is None or now - running.started <= limit:
                continue
            if not running.timed_out:
                running.timed_out = True
                slot.cancel(job_id, seq)
                log.warning("%s: trial %d of %s timed out after %g s; asked to stop", slot.name, seq, job_id, limit)
                self._deliver(job_id, Outcome(seq, Status.FAILED, worker=slot.name, started=time.time() - (now - running.started),
                                              duration=now - running.started,
                                              reason=f"timed out after {limit:g} s (tuning.exit_policy.trial_timeout)"))
                state.cancelled.add(seq)  # what it returns later is not delivered
            elif now - running.started > limit + TIMEOUT_GRACE:
                log.warning("%s: trial %d of %s did not stop %g s after its time limit; %s", slot.name, seq, job_id,
                            TIMEOUT_GRACE, "the driver goes on with a new thread" if slot.is_driver else "worker replaced")
                del self.running[future]
                state.running -= 1
                if slot.is_driver:
                    slot.abandon()
                    self.idle.append(slot)
                else:
                    self._replace(slot)
                self.changed.notify_all()
                self._dispatch()

    def cancel(self, job_id: str, seq: int) -> None:
        with self.lock:
            state = self.states[job_id]
            state.cancelled.add(seq)
            state.waiting = collections.deque(item for item in state.waiting if item.seq != seq)
            for running in self.running.values():
                if running.job_id == job_id and running.item.seq == seq:
                    running.slot.cancel(job_id, seq)

    def results(self, job_id: str, timeout: float) -> list[Outcome]:
        """The job's outcomes so far, waiting up to ``timeout`` for one (or for a worker to free up)."""
        with self.lock:
            state = self.states[job_id]
            if not state.outcomes and timeout > 0 and self.error is None:
                self.changed.wait(timeout)
            if self.error is not None:
                raise self.error
            outcomes, state.outcomes = state.outcomes, []
            return outcomes

    def status(self, job_id: str) -> ExecutorStatus:
        with self.lock:
            state = self.states[job_id]
            return ExecutorStatus(free=self.share(job_id), pending=bool(state.running or state.waiting or state.outcomes),
                                  workers=len(self.slots), busy=len(self.running), starting=len(self.starting))

    def finalize(self, job_id: str, config: TuneConfig, measure: bool) -> Finalized:
        """Lower and measure in the driver, which holds the model already, once the job's
        cancelled requests have wound down: measurements want the machine to themselves."""
        with self.lock:
            own = [future for future, running in self.running.items() if running.job_id == job_id]
        concurrent.futures.wait(own, timeout=120)
        return self.driver.call(self.driver.runners[job_id].finalize, config, measure)

    def job_done(self, job_id: str) -> None:
        """A job is over: its share goes to the others and workers free its model."""
        with self.lock:
            state = self.states[job_id]
            state.active = False
            for seq in [running.item.seq for running in self.running.values() if running.job_id == job_id]:
                self.cancel(job_id, seq)
            for slot in self.slots:
                with contextlib.suppress(Exception):
                    slot.drop(job_id)
            self.driver.drop(job_id)  # a pool the driver takes no part in still holds its runner
            if not any(other.active for other in self.states.values()):
                self.driver.restore_threads()
            self.jobs.pop(job_id, None)
            self.job_refs.pop(job_id, None)
            state.outcomes.clear()
            self.changed.notify_all()

    def shutdown(self) -> None:
        """Stop every worker and release Ray; safe to call twice. Ray is released only once the
        pool holds no handle and its thread no longer runs: Ray used from any thread after it shut
        down ends the process ("the core worker has already been shutdown")."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.events.put(None)  # the pool's thread sees the close now, not at its next time-out
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=SHUTDOWN_WAIT)  # still copying jobs into Ray after that: it releases Ray itself
        with self.lock:
            # A driver request past its time limit may be blocked for good: shutdown does not wait for it.
            driver_overdue = any(running.timed_out for running in self.running.values() if running.slot is self.driver)
            for running in list(self.running.values()):
                self.cancel(running.job_id, running.item.seq)  # a request in the driver stops at its next batch
            slots, self.slots, self.starting, self.idle = self.slots + self.starting, [], [], []
            if self.driver not in slots:
                slots.append(self.driver)
            self.running.clear()
            self._slot_factory = None
            with contextlib.suppress(queue.Empty):
                while True:
                    self.events.get_nowait()
        for slot in slots:
            with contextlib.suppress(Exception):
                slot.close(wait=not driver_overdue) if slot is self.driver else slot.close()
        del slots
        self._leave()

    def _leave(self) -> None:
        """Called once by the pool's thread as it ends and once by ``shutdown``: the second
        releases Ray, when nothing of the pool's can call into it any more."""
        with self._leaving:
            self._left += 1
            last = self._left == 2
        if last and self.session is not None:
            self.session.release()

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class JobExecutor:
    """One job's view of the pool: the ``TrialExecutor`` its engine talks to, and what its
    tuning session asks of the pool (limits, shares, the final compile, the end)."""

    def __init__(self, pool: WorkerPool, job_id: str):
        self.pool, self.job_id = pool, job_id

    def submit(self, seq: int, request: Request) -> None:
        self.pool.submit(self.job_id, seq, request)

    def cancel(self, seq: int) -> None:
        self.pool.cancel(self.job_id, seq)

    def results(self, timeout: float) -> list[Outcome]:
        return self.pool.results(self.job_id, timeout)

    def status(self) -> ExecutorStatus:
        return self.pool.status(self.job_id)

    def set_trial_timeout(self, seconds: Optional[float]) -> None:
        self.pool.set_trial_timeout(self.job_id, seconds)

    def check_cluster(self) -> None:
        self.pool.check_cluster()

    def planned_share(self) -> int:
        return self.pool.planned_share()

    def finalize(self, config: TuneConfig, measure: bool = True) -> Finalized:
        return self.pool.finalize(self.job_id, config, measure)

    def done(self) -> None:
        self.pool.job_done(self.job_id)


def merged_shards(parts: list[Outcome]) -> Outcome:
    """One outcome from the shards of an evaluation: their metric states merged (exactly: only
    metrics that merge exactly are split), their worker-seconds summed, the span they took."""
    metric = parts[0].metric_state
    for part in parts[1:]:
        metric.merge(part.metric_state)
    started = min(part.started for part in parts)
    seconds: dict[str, float] = collections.Counter()
    for part in parts:
        seconds.update(part.figures.get("seconds", {}))
    outcome = Outcome(parts[0].seq, Status.OK, worker="+".join(dict.fromkeys(part.worker for part in parts)),
                      started=started, duration=max(part.started + part.duration for part in parts) - started,
                      figures={"seconds": dict(seconds), "shards": len(parts),
                               "calibration_passes": sum(part.figures.get("calibration_passes", 0) for part in parts)})
    try:
        outcome.accuracy = as_accuracy(metric.result())
    except Exception as error:  # e.g. a NaN: the trial fails as an undivided one would
        outcome.status, outcome.reason = Status.FAILED, f"{type(error).__name__}: {error}"
    return outcome


def lost(seq: int, why: str) -> Outcome:
    """The outcome of a request that failed only because workers died (run again on resume)."""
    return Outcome(seq, Status.WORKER_LOST, reason=f"worker lost: {why}")


def start_failure(error: BaseException) -> str:
    """Why a worker could not start, in one line: the worker's own error, not Ray's wrapper."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__
