"""One set of workers shared fairly by several tunings (``tune_many``).

Each worker (the driver's own thread, then Ray ``SharedWorker`` actors) can run trials of every
job: it builds a job's ``TrialRunner`` (adaptor, model, data) the first time it gets a trial of
that job, from one object-store copy of the job, and keeps it. So a worker that finishes a trial
of one job can take the next trial of any other at once, without restarting.

Fairness: every job has its own queue; a free worker goes to the job with the fewest running
trials among the jobs that have a trial waiting (ties: the job listed first). So while two jobs
both have trials waiting, their running counts differ by at most one. A job asks for as many
proposals as its share of the workers (workers / unfinished jobs, rounded up) minus what it
already has running or queued.

``JobExecutor`` gives each job's engine the interface of ``Executor``; the pool does the rest
under one lock, as trials finish (Ray's callbacks) or engines call in.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from .executor import MAX_RETRIES, _lost, _ship_user_code_by_value, close_slots, load_runner, start_failure
from .ray_session import RayPlan, RaySession
from .space import TuneConfig
from .strategies.base import Proposal
from .trial import CANCELLED
from .worker import TrialRunner, WorkerJob

log = logging.getLogger("lpot_ray")


class SharedWorker:
    """The Ray actor: one TrialRunner per job, built on the job's first trial here."""

    def __init__(self, name: str):
        self.name = name
        self.runners: dict[str, TrialRunner] = {}
        self.cancelled: set[tuple[str, int]] = set()

    def ready(self) -> str:
        return self.name

    def run(self, job_id: str, job_ref: list, seq: int, config: dict) -> dict:
        if job_id not in self.runners:
            import ray

            self.runners[job_id] = load_runner(ray.get(job_ref[0]), self.name)  # nested: not resolved by Ray
        return self.runners[job_id].run(seq, config, lambda: (job_id, seq) in self.cancelled)

    def cancel(self, job_id: str, seq: int) -> None:
        self.cancelled.add((job_id, seq))

    def drop(self, job_id: str) -> None:
        """Free a finished job's model and data."""
        runner = self.runners.pop(job_id, None)
        if runner is not None:
            runner.close()


class DriverSlot:
    """Worker 0: a thread of the driver with each job's runner (the driver holds every model)."""

    name = "driver"
    is_driver = True

    def __init__(self, jobs: dict[str, WorkerJob]):
        self.runners = {job_id: TrialRunner(job, self.name) for job_id, job in jobs.items()}
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lpot-ray-trial")
        self.cancelled: set[tuple[str, int]] = set()
        self.ready: Optional[concurrent.futures.Future] = None

    def run(self, job_id: str, seq: int, config: Proposal) -> concurrent.futures.Future:
        runner = self.runners[job_id]
        return self.pool.submit(runner.run, seq, config.to_dict(), lambda: (job_id, seq) in self.cancelled)

    def cancel(self, job_id: str, seq: int) -> None:
        self.cancelled.add((job_id, seq))

    def drop(self, job_id: str) -> None:
        pass  # the driver still needs the runner to finalize the job

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for runner in self.runners.values():
            runner.close()


class RaySharedSlot:
    is_driver = False

    def __init__(self, actor_class: Any, job_refs: dict[str, Any], name: str):
        self.name = name
        self.job_refs = job_refs
        self.actor = actor_class.remote(name)
        self.ready: Optional[concurrent.futures.Future] = self.actor.ready.remote().future()  # done once placed
        self.since = time.monotonic()  # when it was asked for, for the start-up timeout

    def run(self, job_id: str, seq: int, config: Proposal) -> concurrent.futures.Future:
        return self.actor.run.remote(job_id, [self.job_refs[job_id]], seq, config.to_dict()).future()

    def cancel(self, job_id: str, seq: int) -> None:
        self.actor.cancel.remote(job_id, seq)

    def drop(self, job_id: str) -> None:
        self.actor.drop.remote(job_id)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


@dataclass
class JobQueue:
    """One job's waiting trials, running count and finished rows."""

    waiting: collections.deque = field(default_factory=collections.deque)  # (seq, config, attempt)
    running: int = 0
    cancelled: set = field(default_factory=set)
    rows: queue.Queue = field(default_factory=queue.Queue)  # finished trials, for the job's engine
    active: bool = True


class WorkerPool:
    """The shared workers and the fair dispatch of every job's trials onto them."""

    def __init__(self, jobs: dict[str, WorkerJob], plan: Optional[RayPlan]):
        self.jobs = jobs
        self.lock = threading.RLock()
        self.driver = DriverSlot(jobs)
        self.slots: list[Any] = [self.driver]
        self.idle: list[Any] = [self.driver]
        self.starting: list[Any] = []
        self.queues = {job_id: JobQueue() for job_id in jobs}
        self.running: dict[concurrent.futures.Future, tuple[str, int, Any, Proposal, int]] = {}
        self.lost: dict[tuple[str, int], str] = {}
        # After each dispatch: job -> (running, waiting) of the jobs with trials in either, to check fairness.
        self.snapshots: list[dict[str, tuple[int, int]]] = []
        self.session: Optional[RaySession] = plan.connect() if plan is not None else None
        self.plan = plan
        self._slot_factory: Optional[Any] = None
        self._watcher = threading.Thread(target=self._watch_starting, name="lpot-ray-pool", daemon=True)
        self._closed = threading.Event()
        self._watcher.start()

    # --- growing -----------------------------------------------------------------------------
    def _watch_starting(self) -> None:
        """Connect to Ray, start the workers, and admit them as they report ready."""
        if self.session is not None:
            self.session.ready.wait()
            if self.session.error is not None:
                log.warning("Ray could not start (%s); trials run in the driver alone", self.session.error)
            else:
                with self.lock:
                    if not self._closed.is_set():  # every job may have ended while Ray connected
                        self._start_workers()
        while not self._closed.is_set():  # alive until shutdown: replacements of dead workers start any time
            with self.lock:
                starting = [slot.ready for slot in self.starting]
            if not starting:
                self._closed.wait(0.5)
                continue
            concurrent.futures.wait(starting, timeout=0.5, return_when=concurrent.futures.FIRST_COMPLETED)
            with self.lock:
                self._admit()
                self._drop_stuck()
                self._dispatch()

    def _start_workers(self) -> None:
        import ray

        plan = self.plan
        count = plan.ray_workers(self.session.cluster_resources())
        if count <= 0:
            return
        for job in self.jobs.values():
            _ship_user_code_by_value(job)
        job_refs = {job_id: ray.put(job) for job_id, job in self.jobs.items()}
        actor_class = ray.remote(SharedWorker).options(num_cpus=plan.cpus_per_worker, resources=dict(plan.resources_per_worker),
                                                       scheduling_strategy="SPREAD", max_concurrency=2)
        self._slot_factory = lambda name: RaySharedSlot(actor_class, job_refs, name)
        self.starting += [self._slot_factory(f"worker-{index}") for index in range(1, count + 1)]

    def _admit(self) -> None:
        for slot in [slot for slot in self.starting if slot.ready.done()]:
            self.starting.remove(slot)
            try:
                slot.ready.result()
            except Exception as error:
                log.warning("%s could not start: %s", slot.name, start_failure(error))
                continue
            self.slots.append(slot)
            self.idle.append(slot)

    def _drop_stuck(self) -> None:
        """A worker no node can take waits forever in Ray: drop it after ``worker_start_timeout``."""
        timeout = self.plan.start_timeout if self.plan is not None else float("inf")
        for slot in [slot for slot in self.starting if time.monotonic() - slot.since > timeout]:
            self.starting.remove(slot)
            log.warning("%s did not start within %.0f s: no node has its resources free; dropped", slot.name, timeout)
            with contextlib.suppress(Exception):
                slot.close()

    # --- fair dispatch -----------------------------------------------------------------------
    def share(self, job_id: str) -> int:
        """How many trials a job may have running or waiting: its share of the workers."""
        with self.lock:
            active = sum(job.active for job in self.queues.values())
            planned = len(self.slots) + len(self.starting)
            job = self.queues[job_id]
            return max(0, math.ceil(planned / max(1, active)) - job.running - len(job.waiting))

    def submit(self, job_id: str, seq: int, config: Proposal, attempt: int = 0) -> None:
        with self.lock:
            self.queues[job_id].waiting.append((seq, config, attempt))
            self._dispatch()

    def _dispatch(self) -> None:
        if not any(not slot.is_driver for slot in self.slots + self.starting):
            self._fail_retries()
        while self.idle:
            # A retry never runs in the driver (its death would end every job), so a job whose next
            # trial is a retry waits for a Ray worker while the others go on.
            ray_idle = any(not slot.is_driver for slot in self.idle)
            ready = [job_id for job_id, job in self.queues.items() if job.waiting and (ray_idle or job.waiting[0][2] == 0)]
            if not ready:
                return
            job_id = min(ready, key=lambda name: self.queues[name].running)  # ties: the job listed first
            job = self.queues[job_id]
            seq, config, attempt = job.waiting[0]
            slot = next(slot for slot in self.idle if not (attempt > 0 and slot.is_driver))
            job.waiting.popleft()
            self.idle.remove(slot)
            job.running += 1
            future = slot.run(job_id, seq, config)
            self.running[future] = (job_id, seq, slot, config, attempt)
            self.snapshots.append({name: (other.running, len(other.waiting)) for name, other in self.queues.items()
                                   if other.running or other.waiting})
            future.add_done_callback(self._finished)

    def _fail_retries(self) -> None:
        """With no Ray worker left or coming, a trial that killed one can't be retried: lost."""
        for job_id, job in self.queues.items():
            for item in [item for item in job.waiting if item[2] > 0]:
                job.waiting.remove(item)
                reason = self.lost.get((job_id, item[0]), "?")
                job.rows.put(_lost(item[0], f"no Ray worker is left to retry it after: {reason}"))

    def _finished(self, future: concurrent.futures.Future) -> None:
        with self.lock:
            if future not in self.running:
                return
            job_id, seq, slot, config, attempt = self.running.pop(future)
            job = self.queues[job_id]
            job.running -= 1
            try:
                row = future.result()
                self.idle.append(slot)
            except Exception as error:  # the worker died or Ray failed to deliver
                reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                log.warning("%s failed while running trial %d of %s: %s", slot.name, seq, job_id, reason)
                self._replace(slot)
                self.lost[(job_id, seq)] = reason
                row = None
                if attempt < MAX_RETRIES and seq not in job.cancelled:
                    job.waiting.appendleft((seq, config, attempt + 1))
                else:
                    row = _lost(seq, f"worker failed {attempt + 1} times running this trial; last: {reason}")
            if row is not None and seq not in job.cancelled and row.get("status") != CANCELLED:
                job.rows.put(row)
            self._dispatch()

    def _replace(self, slot: Any) -> None:
        self.slots.remove(slot)
        if slot.is_driver:
            self.slots.append(slot)
            self.idle.append(slot)
        elif self._slot_factory is not None:
            with contextlib.suppress(Exception):
                slot.close()
            self.starting.append(self._slot_factory(slot.name))

    def cancel(self, job_id: str, seq: int) -> None:
        with self.lock:
            job = self.queues[job_id]
            job.cancelled.add(seq)
            job.waiting = collections.deque(item for item in job.waiting if item[0] != seq)
            for running_job, running_seq, slot, _, _ in self.running.values():
                if running_job == job_id and running_seq == seq:
                    slot.cancel(job_id, seq)

    def wait(self, job_id: str, timeout: float) -> list[dict]:
        job = self.queues[job_id]
        rows = []
        with contextlib.suppress(queue.Empty):
            rows.append(job.rows.get(timeout=timeout) if timeout > 0 else job.rows.get_nowait())
        while not job.rows.empty():
            rows.append(job.rows.get_nowait())
        return rows

    def busy(self, job_id: str) -> bool:
        job = self.queues[job_id]
        return bool(job.running or job.waiting or not job.rows.empty())

    def finished(self, job_id: str) -> None:
        """A job is done: its share goes to the others and workers free its model."""
        with self.lock:
            self.queues[job_id].active = False
            for slot in self.slots:
                with contextlib.suppress(Exception):
                    slot.drop(job_id)

    def finalize(self, job_id: str, config: TuneConfig, measure: bool) -> dict:
        """Lower and measure in the driver once the job's cancelled trials have wound down (they
        share its runner, and measurements want the machine to themselves), on the driver's trial
        thread: compiling while that thread traces another job's model is not thread-safe in torch."""
        with self.lock:
            own = [future for future, (running_job, *_) in self.running.items() if running_job == job_id]
        concurrent.futures.wait(own, timeout=120)
        return self.driver.pool.submit(self.driver.runners[job_id].finalize, config.to_dict(), measure).result()

    def shutdown(self) -> None:
        self._closed.set()
        with self.lock:
            for job_id, seq, _, _, _ in list(self.running.values()):
                self.cancel(job_id, seq)
            slots, self.slots, self.starting, self.idle = self.slots + self.starting, [], [], []
        close_slots(slots, self.session)


class JobExecutor:
    """One job's view of the pool, with the interface the engine and ``tune`` use."""

    def __init__(self, pool: WorkerPool, job_id: str):
        self.pool, self.job_id = pool, job_id

    def grow_on(self, plan: RayPlan) -> None:
        pass  # the pool connects once for every job

    def want_more(self) -> None:
        pass

    def free_slots(self) -> int:
        return self.pool.share(self.job_id)

    def submit(self, seq: int, config: Proposal) -> None:
        self.pool.submit(self.job_id, seq, config)

    def wait(self, timeout: float) -> list[dict]:
        return self.pool.wait(self.job_id, timeout)

    def busy(self) -> bool:
        return self.pool.busy(self.job_id)

    def cancel(self, seq: int) -> None:
        self.pool.cancel(self.job_id, seq)

    def finalize(self, config: TuneConfig, measure: bool) -> dict:
        return self.pool.finalize(self.job_id, config, measure)

    def shutdown(self) -> None:
        self.pool.finished(self.job_id)
