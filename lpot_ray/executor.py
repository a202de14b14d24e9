"""Where trials run: Ray worker actors, or the driver's own process when there is one worker.

Both executors offer the same small interface to the engine: ``free_slots``, ``submit``,
``wait``, ``cancel``, ``finalize`` and ``shutdown``. Each Ray worker is a ``TrialWorker`` actor
built once per tuning from one object-store copy of the job (adaptor name, model bytes, data);
a trial sends a config and gets back a row of figures. A worker that dies costs only its
in-flight trial, which is re-run on another worker a bounded number of times.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import sysconfig
from abc import ABC, abstractmethod
from typing import Any, Iterator, Optional

from .space import TuneConfig
from .trial import CANCELLED, FAILED
from .worker import TrialRunner, WorkerJob

MAX_RETRIES = 2


class Executor(ABC):
    slots: int = 1

    @abstractmethod
    def free_slots(self) -> int: ...

    @abstractmethod
    def submit(self, seq: int, config: TuneConfig) -> None: ...

    @abstractmethod
    def wait(self, timeout: float) -> list[dict]:
        """Rows of trials that finished (ok or failed); cancelled trials are dropped."""

    @abstractmethod
    def cancel(self, seq: int) -> None: ...

    @abstractmethod
    def finalize(self, config: TuneConfig, measure_latency: bool) -> dict: ...

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    """One worker in the driver's process: the same engine, no Ray, for debugging and 1 CPU."""

    def __init__(self, job: WorkerJob):
        self.runner = TrialRunner(job, "local")
        self.queue: collections.deque = collections.deque()

    def free_slots(self) -> int:
        return 0 if self.queue else 1

    def submit(self, seq: int, config: TuneConfig) -> None:
        self.queue.append((seq, config))

    def wait(self, timeout: float) -> list[dict]:
        if not self.queue:
            return []
        seq, config = self.queue.popleft()
        return [self.runner.run(seq, config.to_dict())]

    def cancel(self, seq: int) -> None:
        self.queue = collections.deque(item for item in self.queue if item[0] != seq)

    def finalize(self, config: TuneConfig, measure_latency: bool) -> dict:
        return self.runner.finalize(config.to_dict(), measure_latency)


class TrialWorker:
    """The Ray actor: a TrialRunner plus a cancellation flag checked between batches."""

    def __init__(self, job: WorkerJob, name: str):
        self.runner = TrialRunner(job, name)
        self.cancelled: set[int] = set()

    def run(self, seq: int, config: dict) -> dict:
        return self.runner.run(seq, config, lambda: seq in self.cancelled)

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)

    def finalize(self, config: dict, measure_latency: bool) -> dict:
        return self.runner.finalize(config, measure_latency)


class RayExecutor(Executor):
    def __init__(self, job: WorkerJob, workers: int, cpus_per_worker: float):
        import ray

        _ship_user_code_by_value(job)
        self.ray = ray
        self.slots = workers
        self._actor_class = ray.remote(TrialWorker).options(num_cpus=cpus_per_worker, max_concurrency=2)
        self._job_ref = ray.put(job)  # the model and data enter the object store once
        self.actors = [self._start_actor(index) for index in range(workers)]
        self.idle = list(range(workers))
        self.queue: collections.deque = collections.deque()  # (seq, config, attempt)
        self.running: dict[Any, tuple[int, int, TuneConfig, int]] = {}  # ref -> (seq, worker, config, attempt)
        self.cancelled: set[int] = set()

    def _start_actor(self, index: int) -> Any:
        return self._actor_class.remote(self._job_ref, f"worker-{index}")

    def free_slots(self) -> int:
        return max(0, len(self.idle) - len(self.queue))

    def submit(self, seq: int, config: TuneConfig) -> None:
        self.queue.append((seq, config, 0))
        self._dispatch()

    def _dispatch(self) -> None:
        while self.queue and self.idle:
            seq, config, attempt = self.queue.popleft()
            worker = self.idle.pop(0)
            ref = self.actors[worker].run.remote(seq, config.to_dict())
            self.running[ref] = (seq, worker, config, attempt)

    def wait(self, timeout: float) -> list[dict]:
        if not self.running:
            return []
        ready, pending = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        if ready and pending:
            ready += self.ray.wait(pending, num_returns=len(pending), timeout=0)[0]
        rows = []
        for ref in ready:
            seq, worker, config, attempt = self.running.pop(ref)
            self.idle.append(worker)
            row = self._collect(ref, seq, worker, config, attempt)
            if row is not None and seq not in self.cancelled and row.get("status") != CANCELLED:
                rows.append(row)
        self._dispatch()
        return rows

    def _collect(self, ref: Any, seq: int, worker: int, config: TuneConfig, attempt: int) -> Optional[dict]:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayActorError as error:
            logging.getLogger(__name__).warning("worker-%d died during trial %d: %s", worker, seq, error)
            self.actors[worker] = self._start_actor(worker)
            if attempt < MAX_RETRIES and seq not in self.cancelled:
                self.queue.appendleft((seq, config, attempt + 1))
                return None
            return {"seq": seq, "status": FAILED, "worker": f"worker-{worker}",
                    "reason": f"worker died {attempt + 1} times running this trial: {type(error).__name__}"}
        except self.ray.exceptions.RayError as error:
            return {"seq": seq, "status": FAILED, "worker": f"worker-{worker}", "reason": str(error).splitlines()[0]}

    def cancel(self, seq: int) -> None:
        self.cancelled.add(seq)
        self.queue = collections.deque(item for item in self.queue if item[0] != seq)
        for running_seq, worker, _, _ in self.running.values():
            if running_seq == seq:
                self.actors[worker].cancel.remote(seq)

    def finalize(self, config: TuneConfig, measure_latency: bool) -> dict:
        return self.ray.get(self.actors[0].finalize.remote(config.to_dict(), measure_latency))

    def shutdown(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)


@contextlib.contextmanager
def ray_connection(address: Optional[str], verbose: bool = False) -> Iterator[None]:
    """Connect in lpot_ray's order: address > RAY_ADDRESS > a running Ray > a private local Ray.

    A Ray that lpot_ray started is shut down at the end; one it found running is left alone.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    owned = False
    if not ray.is_initialized():
        ray.init(
            address=address or "local",
            include_dashboard=False if not address else None,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.ERROR,
        )
        owned = True
    try:
        yield
    finally:
        if owned:
            ray.shutdown()


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 1))


def _ship_user_code_by_value(job: WorkerJob) -> None:
    """Let workers unpickle the user's eval_func and dataset classes from a script or test file.

    Modules installed in site-packages are importable everywhere; a user's own module (a driver
    script's neighbour, a test file) may not be on a worker's path, so it travels by value.
    """
    import ray.cloudpickle

    installed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], sysconfig.get_paths()["stdlib"]}
    candidates = [job.evaluation.eval_func, job.evaluation.dataloader]
    dataset = getattr(job.evaluation.dataloader, "dataset", None)
    candidates += [dataset, getattr(dataset, "__class__", None)]
    for obj in candidates:
        module = sys.modules.get(getattr(obj, "__module__", None) or getattr(type(obj), "__module__", ""))
        path = getattr(module, "__file__", None)
        if module is None or path is None or module.__name__ == "__main__":
            continue
        if not any(os.path.abspath(path).startswith(root) for root in installed):
            ray.cloudpickle.register_pickle_by_value(module)
