"""Where trials run: the driver's own process and Ray worker actors, as interchangeable slots.

The driver is always worker 0: it holds the fp32 model already, so it evaluates trials from the
first second, while Ray starts and the worker actors import their framework. Each Ray worker is a
``TrialWorker`` actor built once per tuning from one object-store copy of the job (adaptor name,
model bytes, data); it joins as a slot when it reports ready. A trial sends a config and gets
back a row of figures. A worker that dies costs only its in-flight trial, which is re-run
elsewhere a bounded number of times. ``workers: 1`` is the driver alone, without Ray.

On a cluster the workers are spread across nodes (Ray's SPREAD scheduling), so losing a node
costs as few workers as possible; its trials are retried on the others. A worker that waits
longer than ``ray.worker_start_timeout`` for a node (none has its resources free, or the node it
was meant for vanished) is dropped with a log line, so that no trial waits for it forever.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import sys
import sysconfig
import time
from typing import Any, Optional

from .errors import ClusterError
from .ray_session import RayPlan, RaySession
from .space import TuneConfig
from .strategies.base import Proposal
from .trial import CANCELLED, FAILED, WORKER_LOST
from .worker import TrialRunner, WorkerJob

MAX_RETRIES = 2
log = logging.getLogger("lpot_ray")


class InProcessSlot:
    """Worker 0: a thread of the driver running trials on the driver's copy of the model."""

    def __init__(self, job: WorkerJob):
        self.name = "driver"
        self.runner = TrialRunner(job, self.name)
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lpot-ray-trial")
        self.cancelled: set[int] = set()
        self.ready = None  # ready at once

    def run(self, seq: int, config: Proposal) -> concurrent.futures.Future:
        return self.pool.submit(self.runner.run, seq, config.to_dict(), lambda: seq in self.cancelled)

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.runner.close()


class TrialWorker:
    """The Ray actor: a TrialRunner plus a cancellation flag checked between batches.

    Creating it is cheap (the job travels as a reference inside a list, which Ray does not
    resolve), so that its creation measures only the wait for a node; ``ready`` then loads the
    job, which may take long (importing the framework)."""

    def __init__(self, job_refs: list, name: str):
        import ray

        self.job_refs, self.name = job_refs, name
        self.runner: Optional[TrialRunner] = None
        self.cancelled: set[int] = set()
        self.node = ray.get_runtime_context().get_node_id()  # recorded with each trial: where it ran

    def placed(self) -> str:
        return self.node

    def ready(self) -> str:
        import ray

        self.runner = load_runner(ray.get(self.job_refs[0]), self.name)
        return self.node

    def run(self, seq: int, config: dict) -> dict:
        row = self.runner.run(seq, config, lambda: seq in self.cancelled)
        row.setdefault("figures", {})["node"] = self.node
        return row

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)


class RaySlot:
    def __init__(self, actor_class: Any, job_ref: Any, name: str):
        self.name = name
        self.actor = actor_class.remote([job_ref], name)
        self.placed = self.actor.placed.remote().future()  # done once a node took it
        self.ready: Optional[concurrent.futures.Future] = self.actor.ready.remote().future()
        self.since = time.monotonic()  # when it was asked for, for the start-up timeout

    def run(self, seq: int, config: Proposal) -> concurrent.futures.Future:
        return self.actor.run.remote(seq, config.to_dict()).future()

    def cancel(self, seq: int) -> None:
        self.actor.cancel.remote(seq)

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class Executor:
    """Slots (the driver, then Ray workers as they come up) and the trials running on them."""

    def __init__(self, job: WorkerJob, in_process: bool = True):
        self.job = job
        self.slots: list[Any] = [InProcessSlot(job)] if in_process else []
        self.idle: list[Any] = list(self.slots)
        self.starting: list[Any] = []  # Ray slots not ready yet
        self.queue: collections.deque = collections.deque()  # (seq, config, attempt)
        self.running: dict[concurrent.futures.Future, tuple[int, Any, TuneConfig, int]] = {}
        self.cancelled: set[int] = set()
        self.failed: list[dict] = []  # rows of trials that can't run anywhere, reported by wait()
        self.lost: dict[int, str] = {}  # seq -> why its last worker failed
        self._ray_slot_factory: Optional[Any] = None
        self._plan: Optional[RayPlan] = None
        self.session: Optional[RaySession] = None
        self.start_timeout = 300.0  # seconds a Ray worker may take to start before it is dropped

    # --- growing ---------------------------------------------------------------------------
    def grow_on(self, plan: RayPlan) -> None:
        """Add Ray workers per ``plan``: connect now if Ray is cheap to reach, else on demand."""
        self._plan = plan
        self.start_timeout = plan.start_timeout
        if plan.connect_eagerly():
            self.want_more()

    def check_cluster(self, timeout: float = 60.0) -> None:
        """Raise ClusterError unless a cluster named by an address is connected: a connection
        that fails (say, a missing auth token) is reported before trials, not in their midst.
        Reaching a running cluster takes well under a second, hidden behind the fp32 baseline."""
        if self.session is not None and self.session.address:
            self.session.wait_connected(timeout)

    def want_more(self) -> None:
        """The engine has more work than the driver alone: start Ray if planned (idempotent)."""
        if self._plan is not None and self.session is None:
            self.session = self._plan.connect()

    def _grow(self) -> None:
        if self.session is None or self._plan is None or not self.session.ready.is_set():
            return
        plan, self._plan = self._plan, None
        if self.session.error is not None:
            if self.session.address:
                error = self.session.error
                raise error if isinstance(error, ClusterError) else ClusterError(f"Ray cluster {self.session.address!r}: {error}")
            log.warning("a local Ray could not start (%s); trials run in the driver alone", self.session.error)
            return
        cluster = self.session.cluster_resources()
        for name in sorted(set(plan.resources_per_worker) - set(cluster)):
            log.warning("ray.resources_per_worker: no node of the cluster has resource %r (yet); workers wait for one", name)
        count = plan.ray_workers(cluster)
        if count > 0:
            self.add_ray_workers(count, plan.cpus_per_worker, plan.resources_per_worker)

    def add_ray_workers(self, count: int, cpus_per_worker: float, resources: Optional[dict[str, float]] = None) -> None:
        """Start ``count`` Ray worker actors, spread across nodes; each becomes a slot once ready."""
        import ray

        _ship_user_code_by_value(self.job)
        actor_class = ray.remote(TrialWorker).options(num_cpus=cpus_per_worker, resources=dict(resources or {}),
                                                      scheduling_strategy="SPREAD", max_concurrency=2)
        job_ref = ray.put(self.job)  # the model and data enter the object store once
        self._ray_slot_factory = lambda name: RaySlot(actor_class, job_ref, name)
        for index in range(1, count + 1):
            self.starting.append(self._ray_slot_factory(f"worker-{index}"))

    def _admit(self) -> None:
        self._grow()
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
        self._drop_stuck()

    def _drop_stuck(self) -> None:
        """A worker no node can take (resources busy or missing, its node gone) waits forever
        in Ray: drop it after the start-up timeout so that retries waiting for it fail instead.
        Only the wait for a node counts, not the loading of the job once placed."""
        now = time.monotonic()
        for slot in [slot for slot in self.starting if not slot.placed.done() and now - slot.since > self.start_timeout]:
            self.starting.remove(slot)
            log.warning("%s did not start within %.0f s: no node has its resources free; dropped",
                        slot.name, self.start_timeout)
            with contextlib.suppress(Exception):
                slot.close()

    # --- the engine's interface --------------------------------------------------------------
    def busy(self) -> bool:
        """True while a trial runs (even a cancelled one winding down), waits or must be reported."""
        return bool(self.running or self.queue or self.failed)

    def free_slots(self) -> int:
        self._admit()
        return max(0, len(self.idle) - len(self.queue))

    def submit(self, seq: int, config: Proposal) -> None:
        self.queue.append((seq, config, 0))
        self._dispatch()

    def _dispatch(self) -> None:
        self._admit()
        if not any(isinstance(slot, RaySlot) for slot in self.slots + self.starting):
            for item in [item for item in self.queue if item[2] > 0]:  # retries with no Ray worker left
                self.queue.remove(item)
                self.failed.append(_lost(item[0], f"no Ray worker is left to retry it after: {self.lost.get(item[0], '?')}"))
        for item in list(self.queue):
            slot = self._slot_for(retry=item[2] > 0)
            if slot is None:
                continue
            self.queue.remove(item)
            seq, config, attempt = item
            self.running[slot.run(seq, config)] = (seq, slot, config, attempt)

    def _slot_for(self, retry: bool) -> Any:
        """An idle slot; a trial that killed a worker is retried on Ray workers only, never in
        the driver, whose death would end the tuning."""
        for slot in self.idle:
            if not (retry and isinstance(slot, InProcessSlot)):
                self.idle.remove(slot)
                return slot
        return None

    def wait(self, timeout: float) -> list[dict]:
        """Rows of trials that finished (ok or failed); cancelled trials are dropped."""
        self._dispatch()
        rows, self.failed = self.failed, []
        watched = list(self.running) + [slot.ready for slot in self.starting]
        if not watched:
            if not rows:
                time.sleep(min(timeout, 0.05))  # nothing to wait on: don't spin
            return rows
        done, _ = concurrent.futures.wait(watched, timeout=timeout, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in [future for future in done if future in self.running]:
            seq, slot, config, attempt = self.running.pop(future)
            row = self._collect(future, seq, slot, config, attempt)
            if row is not None and seq not in self.cancelled and row.get("status") != CANCELLED:
                rows.append(row)
        self._dispatch()
        return rows

    def _collect(self, future: concurrent.futures.Future, seq: int, slot: Any, config: TuneConfig, attempt: int) -> Optional[dict]:
        try:
            row = future.result()
            self.idle.append(slot)
            return row
        except Exception as error:  # the worker process died or Ray failed to deliver
            reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            log.warning("%s failed while running trial %d: %s", slot.name, seq, reason)
            self._replace(slot)
            self.lost[seq] = reason
            if attempt < MAX_RETRIES and seq not in self.cancelled:
                self.queue.appendleft((seq, config, attempt + 1))  # _dispatch fails it if no Ray worker is left
                return None
            return _lost(seq, f"worker failed {attempt + 1} times running this trial; last: {reason}")

    def _replace(self, slot: Any) -> None:
        self.slots.remove(slot)
        if isinstance(slot, RaySlot) and self._ray_slot_factory is not None:
            with contextlib.suppress(Exception):
                slot.close()  # free its resources if it is only unreachable, not dead
            self.starting.append(self._ray_slot_factory(slot.name))
        elif isinstance(slot, InProcessSlot):
            self.slots.append(slot)
            self.idle.append(slot)

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)
        self.queue = collections.deque(item for item in self.queue if item[0] != seq)
        for running_seq, slot, _, _ in self.running.values():
            if running_seq == seq:
                slot.cancel(seq)

    def finalize(self, config: TuneConfig, measure: bool) -> dict:
        """Lower and measure the chosen config in the driver, which holds the model already."""
        # Cancelled trials may still be winding down: measurements want the machine to themselves.
        concurrent.futures.wait(list(self.running), timeout=120)
        driver = next((slot for slot in self.slots if isinstance(slot, InProcessSlot)), None)
        runner = driver.runner if driver is not None else TrialRunner(self.job, "driver")
        return runner.finalize(config.to_dict(), measure)

    def shutdown(self) -> None:
        """Stop every slot and release Ray; safe to call twice."""
        self._plan = None
        self._admit()
        for seq, _, _, _ in list(self.running.values()):
            self.cancel(seq)  # a trial on the driver stops at its next batch
        slots, self.slots, self.starting, self.idle = self.slots + self.starting, [], [], []
        close_slots(slots, self.session)


def close_slots(slots: list, session: Optional[RaySession]) -> None:
    """Close every slot (one whose process died is gone already) and release Ray."""
    for slot in slots:
        with contextlib.suppress(Exception):
            slot.close()
    if session is not None:
        session.release()


def load_runner(job: WorkerJob, name: str) -> TrialRunner:
    """A worker's runner; a node without the job's framework is named in the error."""
    try:
        return TrialRunner(job, name)
    except ImportError as error:  # MissingFrameworkError included
        import socket

        raise ClusterError(f"node {socket.gethostname()}: {error}") from None


def start_failure(error: BaseException) -> str:
    """Why a worker could not start, in one line: the worker's own error, not Ray's wrapper."""
    cause = getattr(error, "cause", None) or error
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _lost(seq: int, why: str) -> dict:
    """The row of a trial that failed only because workers died (rerun on resume)."""
    return {"seq": seq, "status": FAILED, "worker": "", "reason": f"{WORKER_LOST} {why}"}


def _ship_user_code_by_value(job: WorkerJob) -> None:
    """Let workers unpickle the user's eval_func, dataset and plug-in classes from a script or test.

    Modules installed in site-packages are importable everywhere; a user's own module (a driver
    script's neighbour, a test file) may not be on a worker's path, so it travels by value, and
    so do the user's modules its functions call (``from my_helpers import accuracy``).
    """
    import ray.cloudpickle

    paths = sysconfig.get_paths()
    installed = {paths["purelib"], paths["platlib"], paths["stdlib"]}
    dataset = getattr(job.evaluation.dataloader, "dataset", None)
    for module in _modules_of((job.evaluation.eval_func, job.evaluation.dataloader, dataset, job.adaptor, job.q_func)):
        path = getattr(module, "__file__", None)
        if path is None or module.__name__ == "__main__":
            continue
        if not any(os.path.abspath(path).startswith(root) for root in installed):
            ray.cloudpickle.register_pickle_by_value(module)


def _modules_of(objects: tuple) -> list:
    """The modules defining ``objects`` and the functions and classes their functions refer to
    (by global name or closure), followed through the user's code; lpot_ray's own modules are
    installed on every worker and left out."""
    modules: list = []
    seen: set[int] = set()
    pending = list(objects)
    while pending:
        obj = pending.pop()
        if obj is None or id(obj) in seen:
            continue
        seen.add(id(obj))
        module = sys.modules.get(getattr(obj, "__module__", None) or type(obj).__module__)
        if module is None or module.__name__ == "lpot_ray" or module.__name__.startswith("lpot_ray."):
            continue
        if module not in modules:
            modules.append(module)
        code = getattr(obj, "__code__", None)
        if code is not None:  # a function: what it calls by name, and what it closes over
            names = getattr(obj, "__globals__", {})
            pending += [names[name] for name in code.co_names if callable(names.get(name))]
            pending += [value for value in map(_cell_value, obj.__closure__ or ()) if callable(value)]
    return modules


def _cell_value(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return None
