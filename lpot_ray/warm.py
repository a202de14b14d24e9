"""Warm workers across tunings: ``with lpot_ray.workers(4):`` keeps Ray and its worker actors up
for every ``tune()`` and ``tune_many()`` inside, so that a script or a notebook tuning one model
after another pays Ray's start-up and each worker's framework import once, not per model.

Every tuning inside the block whose Ray settings the workers serve (the same cluster, CPUs and
custom resources per worker; a worker count, if its YAML gives one, equal to the block's) runs on
them; one with other settings, or ``ray.workers: 1``, runs on a pool of its own, as outside.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Optional

from .config import load_config
from .pool import WorkerPool
from .ray_session import RayPlan

log = logging.getLogger("lpot_ray")
_open: list[WorkerPool] = []  # the pools of the ``workers`` blocks open now, innermost last
_open_lock = threading.Lock()


@contextlib.contextmanager
def workers(count: Optional[int] = None, address: Optional[str] = None, cpus_per_worker: float = 1.0,
            resources_per_worker: Optional[dict[str, float]] = None) -> Iterator[WorkerPool]:
    """Workers that stay up for the tunings inside the block: ``count`` workers, the driver
    included (default: one per ``cpus_per_worker`` of the machine or cluster), on the Ray at
    ``address`` (default as in ``tune``). Ray starts at once, while the first model is prepared.
    The arguments are those of the YAML's ``ray`` section and checked by its rules."""
    ray = {"workers": count, "address": address, "cpus_per_worker": cpus_per_worker,
           "resources_per_worker": resources_per_worker or {}}
    section = load_config({"model": {"framework": "pytorch"}, "ray": ray}).ray  # a bad value names its key
    plan = None if section.workers == 1 else RayPlan(address=section.address, workers=section.workers,
                                                     cpus_per_worker=section.cpus_per_worker,
                                                     resources_per_worker=dict(section.resources_per_worker))
    if plan is not None:
        plan.check_reachable()
    pool = WorkerPool(plan, connect_now=True)  # workers(1): the driver alone, no Ray
    with _open_lock:
        _open.append(pool)
    try:
        yield pool
    finally:
        with _open_lock:
            _open.remove(pool)
        pool.shutdown()


@contextlib.contextmanager
def pool_for(plan: Optional[RayPlan]) -> Iterator[WorkerPool]:
    """The pool a tuning runs on: the open ``workers`` block's if it serves ``plan`` (left running
    at the end), else a pool of its own (shut down at the end)."""
    warm = _serving(plan)
    if warm is not None:
        yield warm
        return
    with WorkerPool(plan) as pool:
        yield pool


def _serving(plan: Optional[RayPlan]) -> Optional[WorkerPool]:
    with _open_lock:
        warm = _open[-1] if _open else None
    if warm is None or plan is None or warm.plan is None:
        return None  # a tuning without Ray, or a block of the driver alone: nothing warm to share
    ours = warm.plan
    if (plan.cluster_address() == ours.cluster_address() and plan.cpus_per_worker == ours.cpus_per_worker
            and plan.resources_per_worker == ours.resources_per_worker and plan.workers in (None, ours.workers)):
        return warm
    log.info("this tuning's Ray settings (workers %s, cpus_per_worker %g, address %s) differ from the running "
             "workers'; it runs on workers of its own", plan.workers, plan.cpus_per_worker, plan.cluster_address())
    return None
