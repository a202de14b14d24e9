"""tune() and Quantization: config → space → strategy → executor → history → result.

Every check that needs no worker runs first (config, plug-in names, data, model export, space,
history), so bad input fails in seconds. Then the slow starts overlap: the engine runs in a
thread of its own, measuring the fp32 baseline and evaluating the first trials in the driver
(worker 0), while the main thread starts or joins Ray and adds the Ray workers, which import their
framework and join as they come up. Workers start only once the baseline is known to work.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Union

from . import registry
from .config import Config, load_config
from .engine import Criterion, Engine, EngineOutcome
from .errors import ConfigError, DataError, EvaluationError, ModelError
from .evaluation import Evaluation, split_batch
from .executor import Executor, cluster_cpus, ray_connection
from .history import History
from .metrics import make_metric
from .progress import ProgressLine
from .result import TuneResult
from .space import TuningSpace
from .trial import OK
from .worker import WorkerJob

FINALISTS = 3


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
    if q_func is not None:
        raise ConfigError("q_func: quantization-aware training is not supported yet; pass q_dataloader for post-training quantization")
    evaluation = _evaluation(config, eval_dataloader, eval_func)
    strategy_class = registry.strategies.get(config.tuning.strategy.name)
    objective = registry.objectives.get(config.tuning.objective)()
    adaptor = registry.adaptors.get(config.model.framework)()

    calibration = _calibration_batches(q_dataloader, max(config.quantization.calibration.sampling_size))
    payload = adaptor.prepare(model, calibration[0])
    fp32_model = adaptor.load(payload)
    space = TuningSpace.build(adaptor.capabilities(fp32_model), config.quantization)
    if not space.ops:
        raise ModelError(f"model: {type(model).__name__} has no op lpot_ray can quantize for {config.model.framework}")
    history = History.start(config.tuning.workspace.path, resume_file or config.tuning.workspace.resume,
                            _fingerprint(config, adaptor.weights_digest(fp32_model), space))
    job = WorkerJob(config.model.framework, payload, calibration, evaluation, space.ops,
                    threads=max(1, int(config.ray.cpus_per_worker)))

    run = _TuningRun(config, space, adaptor, model, evaluation, history, strategy_class, objective)
    executor = Executor(job)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="lpot-ray-engine") as pool:
            outcome = pool.submit(run, executor)
            try:
                _grow_on_ray(executor, config, address, verbose, run, outcome)
                return outcome.result()
            except BaseException:
                run.stop()
                raise
    finally:
        executor.shutdown()
        history.close()


class TuningInterrupted(RuntimeError):
    """The engine was asked to stop (e.g. Ctrl-C in the driver)."""


class _TuningRun:
    """The driver's side of a tuning, run in its own thread while Ray starts in the main one."""

    def __init__(self, config: Config, space: TuningSpace, adaptor: Any, model: Any, evaluation: Evaluation,
                 history: History, strategy_class: type, objective: Any):
        self.config, self.space, self.adaptor, self.model = config, space, adaptor, model
        self.evaluation, self.history = evaluation, history
        self.strategy_class, self.objective = strategy_class, objective
        self.baseline_known = threading.Event()
        self.engine: Optional[Engine] = None
        self.stopped = False

    def __call__(self, executor: Executor) -> TuneResult:
        try:
            baseline = _baseline(self.history, self.evaluation, self.adaptor, self.model)
        finally:
            self.baseline_known.set()
        criterion = Criterion.from_config(baseline, self.config.tuning.accuracy_criterion)
        strategy = self.strategy_class(self.space, criterion.higher_is_better, self.config.tuning.random_seed)
        progress = ProgressLine()
        self.engine = Engine(strategy, executor, self.history, criterion, self.config.tuning.exit_policy,
                             lambda tune_config: self.objective.proxy(self.space, tune_config), progress)
        if self.stopped:
            self.engine.stop()
        try:
            outcome = self.engine.run()
        finally:
            progress.close()
        if self.stopped:
            raise TuningInterrupted("tuning stopped; finished trials are in the history")
        return _result(outcome, executor, self.adaptor, criterion, self.history, self.config)

    def stop(self) -> None:
        self.stopped = True
        if self.engine is not None:
            self.engine.stop()


def _grow_on_ray(executor: Executor, config: Config, address: Optional[str], verbose: bool,
                 run: _TuningRun, outcome: Future) -> None:
    """Join or start Ray (main thread) and add workers 2..N, unless the tuning is over first."""
    address = address or config.ray.address
    workers = config.ray.workers
    if workers == 1 or (workers is None and not address and not os.environ.get("RAY_ADDRESS") and (os.cpu_count() or 1) < 2):
        return
    with ray_connection(address, verbose):
        run.baseline_known.wait()  # a broken evaluation stops the tuning before any worker starts
        if outcome.done():
            return
        if workers is None:
            workers = max(1, int(cluster_cpus() // config.ray.cpus_per_worker))
        try:
            executor.add_ray_workers(workers - 1, config.ray.cpus_per_worker)
            outcome.exception()  # wait for the end while Ray is up
        finally:
            executor.shutdown()

class Quantization:
    """LPOT's entry point: ``Quantization(conf)(model, q_dataloader=..., eval_func=...)``."""

    def __init__(self, conf: Union[Config, dict, str, os.PathLike]):
        self.config = load_config(conf)

    def __call__(self, model: Any, q_dataloader: Any = None, q_func: Optional[Callable] = None,
                 eval_dataloader: Any = None, eval_func: Optional[Callable] = None, **options: Any) -> TuneResult:
        return tune(model, self.config, q_dataloader=q_dataloader, q_func=q_func,
                    eval_dataloader=eval_dataloader, eval_func=eval_func, **options)


# --- checks that need no worker --------------------------------------------------------------
def _evaluation(config: Config, eval_dataloader: Any, eval_func: Optional[Callable]) -> Evaluation:
    if eval_func is not None:
        if not callable(eval_func):
            raise ConfigError(f"eval_func: expected a function model -> accuracy, got {type(eval_func).__name__}")
        return Evaluation(eval_func=eval_func)
    metric = config.evaluation.accuracy.metric
    if eval_dataloader is None or metric is None:
        raise ConfigError("evaluation: pass eval_func, or eval_dataloader together with "
                          "`evaluation.accuracy.metric` in the configuration (e.g. {topk: 1})")
    make_metric(metric)  # an unknown name or bad parameter fails here, not on a worker
    return Evaluation(dataloader=eval_dataloader, metric=metric)


def _calibration_batches(loader: Any, samples: int) -> list:
    if loader is None:
        raise DataError("q_dataloader: post-training static quantization needs a calibration loader")
    batches, seen = [], 0
    try:
        for batch in loader:
            inputs, _ = split_batch(batch)
            batches.append(inputs)
            seen += len(inputs[0] if isinstance(inputs, (tuple, list)) else inputs)
            if seen >= samples:
                break
    except TypeError as error:
        raise DataError(f"q_dataloader: can't iterate over {type(loader).__name__}: {error}") from None
    if not batches:
        raise DataError("q_dataloader: yielded no batches")
    return batches


def _fingerprint(config: Config, weights: str, space: TuningSpace) -> dict:
    """What must match for a resume: not exit_policy or ray, which a user may change."""
    return {
        "model": weights,
        "space": space.fingerprint(),
        "criterion": config.tuning.accuracy_criterion.model_dump(),
        "strategy": config.tuning.strategy.name,
        "seed": config.tuning.random_seed,
    }


def _baseline(history: History, evaluation: Evaluation, adaptor: Any, model: Any) -> float:
    recorded = history.get_meta("baseline")
    if recorded is not None:
        return recorded
    try:
        baseline = evaluation.run(adaptor, model)
    except EvaluationError as error:
        raise EvaluationError(f"fp32 baseline: {error}") from None
    except Exception as error:  # the user's code or data: say so before any worker starts
        raise EvaluationError(f"fp32 baseline: evaluating the original model failed: {type(error).__name__}: {error}") from error
    history.set_meta("baseline", baseline)
    return baseline


# --- the result ------------------------------------------------------------------------------
def _result(outcome: EngineOutcome, executor: Executor, adaptor: Any, criterion: Criterion,
            history: History, config: Config) -> TuneResult:
    """Lower the best passing config to real int8 kernels; if it no longer passes there, try the next."""
    common = dict(baseline=criterion.baseline, n_trials=len(history), n_evaluated=outcome.n_evaluated,
                  framework=config.model.framework, stopped_by=outcome.stopped_by, workspace=str(history.path.parent))
    rejected = []
    for trial in outcome.passing[:FINALISTS]:
        final = executor.finalize(trial.config, measure_latency=True)
        if not criterion.passes(final["accuracy"]):
            rejected.append({"key": trial.key, "compiled_accuracy": final["accuracy"]})
            continue
        objectives = {**final["figures"], "fp32_macs_fraction": trial.objective}
        history.set_meta("result", {"key": trial.key, "accuracy": final["accuracy"], "objectives": objectives,
                                    "int8_ops": final["int8_ops"], "rejected": rejected})
        return TuneResult(
            model=adaptor.deserialize(final["model"]), config=trial.config, accuracy=final["accuracy"],
            objectives=objectives, int8_ops=tuple(final["int8_ops"]), fp32_ops=tuple(final["fp32_ops"]),
            passed=True, model_bytes=final["model"], **common,
        )
    evaluated = [trial for trial in outcome.trials if trial.status == OK and trial.accuracy is not None]
    best_failing = min(evaluated, key=lambda trial: (criterion.loss(trial.accuracy), trial.key), default=None)
    history.set_meta("result", {"key": None, "rejected": rejected})
    return TuneResult(model=None, config=None, accuracy=None, objectives={}, int8_ops=(), fp32_ops=(),
                      passed=False, best_failing=best_failing, **common)
