"""tune_many: several tunings at once on one worker pool, each with its own history and result.

Every job is checked first (``session.prepare``), one after the other, so a broken job is
reported at once and the others go on. Then each job's ``session.run`` goes in a thread of its
own on one shared ``WorkerPool`` (pool.py: how workers are shared fairly), exactly as ``tune``
runs its single job. Results come back in job order; a job that failed has ``error`` set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from . import session
from .config import Config, load_config
from .errors import ConfigError, LpotRayError
from .pool import JobExecutor
from .ray_session import RayPlan
from .result import TuneResult
from .warm import pool_for
from .yaml_file import read_yaml

log = logging.getLogger("lpot_ray")


@dataclass
class ZooJob:
    """The arguments of one ``tune`` call, and a name for the results table."""

    model: Any
    conf: Union[Config, dict, str, os.PathLike]
    name: str = ""
    q_dataloader: Any = None
    q_func: Optional[Callable] = None
    eval_dataloader: Any = None
    eval_func: Optional[Callable] = None


def tune_many(jobs: Sequence[Union[ZooJob, dict]], address: Optional[str] = None, workers: Optional[int] = None,
              verbose: bool = False) -> list[TuneResult]:
    """Tune every job concurrently on one set of Ray workers; the results in job order.

    ``workers`` (the driver included) defaults to the largest ``ray.workers`` of the jobs, else
    one per ``cpus_per_worker`` of the cluster's CPUs.
    """
    jobs = [job if isinstance(job, ZooJob) else ZooJob(**job) for job in jobs]
    if address:
        RayPlan(address).check_reachable()  # a wrong cluster address fails in seconds, before any job is prepared
    names = _unique_names(jobs)
    started = {name: time.perf_counter() for name in names}
    results: dict[str, TuneResult] = {}
    prepared: dict[str, session.Job] = {}
    workspaces: dict[Path, str] = {}
    for name, job in zip(names, jobs, strict=True):
        try:
            config = load_config(job.conf)
            if config.tuning.exit_policy.performance_only:
                raise ConfigError("tuning.exit_policy.performance_only: not for tune_many; use tune()")
            workspace = Path(config.tuning.workspace.path).resolve()
            if workspace in workspaces:
                raise ConfigError(f"tuning.workspace.path: {workspace} is also the workspace of job {workspaces[workspace]!r}")
            workspaces[workspace] = name
            prepared[name] = session.prepare(config, job.model, job.q_dataloader, job.q_func, job.eval_dataloader,
                                             job.eval_func, name=name)
        except Exception as error:  # one broken job must not stop the others
            results[name] = _failed(name, error, started[name])
    try:
        if prepared:
            plan = RayPlan.resolve([job.config for job in prepared.values()], address, workers, verbose)
            with pool_for(plan) as pool:
                # Every job joins before any runs: their shares of the workers follow from how many there are.
                views = {name: pool.add_job(name, job.driver_runner()) for name, job in prepared.items()}
                threads = [threading.Thread(target=_run_job, args=(job, views[name], results, started[name]),
                                            name=f"lpot-ray-job-{name}") for name, job in prepared.items()]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
    finally:
        for job in prepared.values():
            job.history.close()  # run closes it too; this frees the workspace if the pool never started
    return [results[name] for name in names]


def _run_job(job: session.Job, pool: JobExecutor, results: dict[str, TuneResult], started: float) -> None:
    """One job's tuning, as ``tune`` runs it, on its share of the pool."""
    try:
        result = session.run(job, pool)
        log.info("%s: %d trials, %s", job.name, result.n_trials, result.stopped_by)
        results[job.name] = dataclasses.replace(result, wall_time=time.perf_counter() - started)
    except Exception as error:
        results[job.name] = _failed(job.name, error, started)


def _unique_names(jobs: list[ZooJob]) -> list[str]:
    names: list[str] = []
    for index, job in enumerate(jobs):
        name = job.name or f"job{index}"
        names.append(name if name not in names else f"{name}-{index}")
    return names


def _failed(name: str, error: BaseException, started: float) -> TuneResult:
    message = str(error) if isinstance(error, LpotRayError) else f"{type(error).__name__}: {error}"
    log.warning("%s failed: %s", name, message)
    return failed_result(message, time.perf_counter() - started)


def failed_result(message: str, wall_time: float = 0.0) -> TuneResult:
    """The result of a job that could not run: nothing tuned, ``error`` saying why."""
    return TuneResult(model=None, config=None, accuracy=None, objectives={}, baseline=None, n_trials=0, n_evaluated=0,
                      int8_ops=(), fp32_ops=(), passed=False, error=message.strip().splitlines()[0] if message.strip() else "",
                      wall_time=wall_time)


def results_table(names: Sequence[str], results: Sequence[TuneResult]) -> str:
    """One line per model: fp32 and int8 accuracy, latency ratio, trials, wall time, status."""
    lines = [f"{'model':<20}{'fp32 acc':>10}{'int8 acc':>10}{'fp32/int8 latency':>19}{'trials':>8}{'wall s':>8}  status"]
    for name, result in zip(names, results, strict=True):
        ratio = result.objectives.get("latency_ratio")
        status = ("passed" if result.passed else f"error: {result.error}" if result.error
                  else f"no config passed: {result.reason}" if result.reason else "no config passed")
        lines.append(f"{name:<20}{_figure(result.baseline):>10}{_figure(result.accuracy):>10}"
                     f"{(f'{ratio:.2f}x' if ratio else '-'):>19}{result.n_trials:>8}{result.wall_time:>8.1f}  {status}")
    return "\n".join(lines)


def _figure(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


# --- a zoo described in a YAML file (``lpot-ray zoo ZOO.yaml``) ---------------------------------
@dataclass
class ZooEntry:
    """One job of a zoo file: its name and its tuning configuration, or why it can't run."""

    name: str
    config: Optional[Config] = None
    error: str = ""


def read_zoo(path: Union[str, os.PathLike]) -> tuple[list[ZooEntry], dict]:
    """The entries of a zoo YAML and its top-level settings (``workspace``, ``workers``, ``address``).

    A broken entry (a missing or invalid tuning YAML) becomes an entry with ``error`` set, so the
    others still run; a zoo file that is not a zoo is a ConfigError naming the file and key.
    """
    zoo_path = Path(path)
    raw = read_yaml(zoo_path)
    if not isinstance(raw, dict) or not isinstance(raw.get("jobs"), list) or not raw["jobs"]:
        raise ConfigError(f"{zoo_path}: expected a mapping with `jobs:`, a list of {{name, config}} entries")
    unknown = set(raw) - {"jobs", "workspace", "workers", "address"}
    if unknown:
        raise ConfigError(f"{zoo_path}: unknown key(s) {', '.join(sorted(unknown))}; known: jobs, workspace, workers, address")
    workers = raw.get("workers")
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ConfigError(f"{zoo_path}: `workers`: {workers!r} must be a whole number >= 1")
    if raw.get("address") is not None and not isinstance(raw["address"], str):
        raise ConfigError(f"{zoo_path}: `address`: {raw['address']!r} must be a Ray address such as HOST:6379")
    root = Path(raw.get("workspace") or "lpot_ray_workspace/zoo")
    entries: list[ZooEntry] = []
    for index, item in enumerate(raw["jobs"]):
        name = item.get("name") if isinstance(item, dict) else None
        name = str(name or f"job{index}")
        if name in [entry.name for entry in entries]:
            raise ConfigError(f"{zoo_path}: `jobs[{index}].name`: {name!r} is already the name of another job; "
                              "names must be unique (each job's workspace is named after it)")
        try:
            if not isinstance(item, dict) or "config" not in item:
                raise ConfigError("expected {name, config}, where config is a tuning YAML path or mapping")
            if set(item) - {"name", "config"}:
                raise ConfigError(f"unknown key(s) {', '.join(sorted(set(item) - {'name', 'config'}))}; known: name, config")
            entries.append(ZooEntry(name, _entry_config(item["config"], zoo_path.parent, root / name)))
        except Exception as error:
            entries.append(ZooEntry(name, error=f"{zoo_path}: jobs[{index}] ({name}): {error}"))
    settings = {key: raw[key] for key in ("workers", "address") if raw.get(key) is not None}
    return entries, settings


def _entry_config(conf: Union[str, dict], base: Path, workspace: Path) -> Config:
    """A job's configuration (a YAML path relative to the zoo file, or a mapping); a job without
    a workspace of its own gets ``<zoo workspace>/<name>``. Paths inside a tuning YAML resolve
    from the working directory, as for ``lpot-ray tune``."""
    config = load_config(conf if isinstance(conf, dict) else base / conf)
    if "workspace" not in config.tuning.model_fields_set:
        tuning = config.tuning.model_copy(update={"workspace": config.tuning.workspace.model_copy(update={"path": str(workspace)})})
        config = config.model_copy(update={"tuning": tuning})
    return config
