"""tune() and Quantization: a tuning session on a worker pool with one job.

Every check that needs no worker runs first (``session.prepare``), so bad input fails in
seconds; then ``session.run`` tunes the job on a ``WorkerPool`` whose driver slot starts at once
and whose Ray workers join as Ray comes up (see pool.py for when Ray starts), or on the warm
workers of an open ``lpot_ray.workers()`` block (warm.py).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

from . import session
from .config import Config, load_config
from .progress import TuningProgress
from .ray_session import RayPlan
from .result import TuneResult
from .warm import pool_for


def tune(
    model: Any,
    conf: Union[Config, dict, str, os.PathLike],
    q_dataloader: Any = None,
    q_func: Optional[Callable] = None,
    eval_dataloader: Any = None,
    eval_func: Optional[Callable[[Any], float]] = None,
    resume_file: Optional[Union[str, os.PathLike]] = None,
    address: Optional[str] = None,
    verbose: bool = False,
) -> TuneResult:
    """Find the fastest int8 version of ``model`` that meets the YAML's accuracy criterion."""
    config = load_config(conf)
    plan = None
    if not config.tuning.exit_policy.performance_only:  # one config measured: no workers needed
        plan = RayPlan.resolve([config], address, verbose=verbose)
    if plan is not None:
        plan.check_reachable()  # a wrong cluster address fails in seconds, before any other work
    job = session.prepare(config, model, q_dataloader, q_func, eval_dataloader, eval_func, resume_file)
    progress = TuningProgress()
    try:
        with pool_for(plan) as pool:
            return session.run(job, pool.add_job(job.name, job.driver_runner()), progress)
    finally:
        progress.close()
        job.history.close()  # run closes it too; this frees the workspace if the pool never started


class Quantization:
    """LPOT's entry point: ``Quantization(conf)(model, q_dataloader=..., eval_func=...)``."""

    def __init__(self, conf: Union[Config, dict, str, os.PathLike]):
        self.config = load_config(conf)

    def __call__(self, model: Any, q_dataloader: Any = None, q_func: Optional[Callable] = None,
                 eval_dataloader: Any = None, eval_func: Optional[Callable] = None, **options: Any) -> TuneResult:
        return tune(model, self.config, q_dataloader=q_dataloader, q_func=q_func,
                    eval_dataloader=eval_dataloader, eval_func=eval_func, **options)
