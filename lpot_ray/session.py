"""One tuning session: ``prepare`` checks and builds a job, ``run`` tunes it on a worker pool.

``tune``, ``Quantization``, ``tune_many`` and the command line are thin callers of these two.

``prepare`` runs every check that needs no worker (config, plug-in names, approach, data, model
export, space, history), so bad input fails in seconds, and resolves once what the job's
configuration decides: its approach, its metric's direction, its strategy and objectives.
``run`` then goes baseline -> criterion -> strategy -> engine -> result: the driver measures the
fp32 baseline while the pool connects to Ray, the engine keeps the job's share of the workers
busy, and the best passing config is compiled to real kernels in the driver and measured there.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import inputs, pareto, registry
from .adaptors.base import Adaptor
from .config import Approach, Config, ExitPolicy
from .cpu import bf16_unavailable_reason
from .criterion import Criterion
from .engine import Engine, EngineOutcome, common_failure
from .errors import ConfigError, EvaluationError, ModelError
from .evaluation import user_code_limit, within
from .history import History
from .objectives import WeightedObjectives
from .pool import JobExecutor
from .result import TuneResult
from .space import BF16, TuneConfig, TuningSpace, describe_capabilities
from .timings import Stopwatch
from .trial import Finalized, Status
from .worker import TrialRunner, WorkerJob

FINALISTS = 3  # passing configs compiled at most, best first, until one still passes compiled
SPLIT_WORTH_SECONDS = 2.0  # fp32 inference seconds of the evaluation from which it is split across idle workers
BF16_WORTH = 1.1  # how much faster a bf16 twin must run than its fp32 fallback to be kept
TRIAL_LIMIT_FACTOR, TRIAL_LIMIT_ALLOWANCE = 10, 300.0  # the default trial limit: 10 baselines + 5 minutes
log = logging.getLogger("lpot_ray")


@dataclass
class Job:
    """One tuning, checked and built before any worker exists."""

    name: str
    config: Config
    higher_is_better: bool  # the metric's direction, resolved once
    worker_job: WorkerJob  # what every worker gets
    adaptor: Adaptor  # the driver's, with the fp32 model loaded below
    fp32_model: Any  # ``adaptor.load`` of the exported model: the driver's worker runs on it
    baseline_model: Any  # what the fp32 baseline is measured on
    space: TuningSpace
    strategy_class: type
    objectives: WeightedObjectives
    history: History
    clock: Stopwatch  # where the time went: preparing here, then the run's phases

    def driver_runner(self) -> TrialRunner:
        """The driver's worker for this job, on the model the driver has loaded already."""
        return TrialRunner(self.worker_job, "driver", self.adaptor, self.fp32_model)


def prepare(config: Config, model: Any, q_dataloader: Any = None, q_func: Optional[Callable] = None,
            eval_dataloader: Any = None, eval_func: Optional[Callable] = None,
            resume_file: Optional[Union[str, os.PathLike]] = None, name: str = "") -> Job:
    """Every check that needs no worker: plug-in names, approach, data, model export, space, history."""
    clock = Stopwatch()
    with clock.time("prepare"):
        return _prepare(config, model, q_dataloader, q_func, eval_dataloader, eval_func, resume_file, name, clock)


def _prepare(config: Config, model: Any, q_dataloader: Any, q_func: Optional[Callable], eval_dataloader: Any,
             eval_func: Optional[Callable], resume_file: Optional[Union[str, os.PathLike]], name: str,
             clock: Stopwatch) -> Job:
    q_dataloader, eval_dataloader = inputs.yaml_loaders(config, q_dataloader, eval_dataloader, eval_func)
    evaluation = inputs.evaluation_from(config, eval_dataloader, eval_func)
    strategy_class = registry.strategies.get(config.tuning.strategy.name)
    adaptor_class = registry.adaptors.get(config.model.framework)
    inputs.check_strategy(config, strategy_class, adaptor_class)
    objectives = inputs.objectives_from(config)
    q_func = inputs.training_function(config, adaptor_class, q_func)
    approach = config.quantization.approach
    adaptor = adaptor_class.for_approach(approach)
    adaptor.warm_up_lowering()  # the driver compiles the chosen config at the end

    calibration = inputs.calibration_batches(config, q_dataloader, eval_dataloader)
    with clock.time("prepare.export"):
        payload = adaptor.prepare(model, calibration[0])
        fp32_model = adaptor.load(payload)
    capabilities = adaptor.capabilities(fp32_model)
    recipes = adaptor.recipes(fp32_model)
    space = TuningSpace.build(capabilities, config.quantization, recipes)
    for recipe, wanted in config.quantization.recipes.wanted().items():
        if wanted and recipe not in recipes:
            log.warning("`quantization.recipes.%s`: the %s adaptor can't apply it to this model under %s; it is off",
                        recipe, config.model.framework, approach.value)
    if config.quantization.use_bf16 and not any(BF16 in capability.schemes for capability in capabilities):
        reason = bf16_unavailable_reason() or f"the {config.model.framework} adaptor offers no bf16"
        log.warning("`quantization.use_bf16`: %s; ops fall back to fp32", reason)
    if not space.ops:
        raise ModelError(f"model: {type(model).__name__} has no op lpot_ray can quantize for {config.model.framework}")
    if not space.has_low_precision:
        raise ConfigError(f"quantization: model_wise/op_wise leave no int8 (or bf16) scheme for any op; "
                          f"{config.model.framework} offers {describe_capabilities(capabilities)}")
    history = History.start(config.tuning.workspace.path, resume_file or config.tuning.workspace.resume,
                            inputs.fingerprint(config, adaptor.weights_digest(fp32_model), space))
    history.set_meta("job", inputs.description(config, space))
    worker_job = WorkerJob(adaptor_class, approach, payload, calibration, evaluation, space.ops,
                           threads=max(1, int(config.ray.cpus_per_worker)), q_func=q_func)
    return Job(name or config.model.name, config, inputs.higher_is_better(config, evaluation), worker_job,
               adaptor, fp32_model, adaptor.baseline_model(model, fp32_model), space, strategy_class, objectives, history,
               clock)


def run(job: Job, pool: JobExecutor, on_progress: Optional[Callable[[Engine], None]] = None) -> TuneResult:
    """Tune a prepared job on its share of a pool (``pool``: the job's view of it, from
    ``WorkerPool.add_job``); the job's history is closed at the end."""
    config = job.config
    try:
        if config.tuning.exit_policy.performance_only:
            return _default_config_only(job, pool)
        with job.clock.time("baseline"):
            baseline = _baseline(job)
        pool.set_trial_timeout(trial_limit(config.tuning.exit_policy, job.history.get_meta("baseline_seconds"),
                                           config.quantization.approach))
        pool.check_cluster()  # a cluster refusing the connection fails before any trial
        criterion = Criterion.from_config(baseline, config.tuning.accuracy_criterion, job.higher_is_better)
        job.history.set_meta("criterion", dataclasses.asdict(criterion))
        strategy = job.strategy_class(job.space, criterion.higher_is_better, config.tuning.random_seed)
        strategy.parallelism = pool.planned_share()
        samples = job.history.get_meta("evaluation_samples") if config.tuning.exit_policy.early_stopping else None
        proxy = functools.partial(job.objectives.proxy, job.space)
        engine = Engine(strategy, pool, job.history, criterion, config.tuning.exit_policy, proxy,
                        on_progress or (lambda engine: None), evaluation_samples=samples, shards_at_most=_shards_at_most(job))
        with job.clock.time("search"):
            outcome = engine.run()
        return conclude(outcome, criterion, pool.finalize, job.history, config.model.framework, job.clock,
                        job.space.bf16_twin, proxy)
    finally:
        pool.done()
        job.history.close()


# --- the result ------------------------------------------------------------------------------
def conclude(outcome: EngineOutcome, criterion: Criterion, finalize: Callable[[TuneConfig], Finalized],
             history: History, framework: str, clock: Optional[Stopwatch] = None,
             bf16_twin: Callable[[TuneConfig], Optional[TuneConfig]] = lambda config: None,
             proxy: Optional[Callable[[TuneConfig], float]] = None) -> TuneResult:
    """Compile the best passing config to real int8 kernels and measure it there; if it no longer
    passes compiled (or fails to compile), fall to the next finalist. The choice stays the
    proxy's, which is deterministic; the measured figures are reported. The chosen config's
    ``bf16_twin`` (its fp32 ops in bf16) replaces it if that passes compiled and runs clearly
    faster (``_faster_of``)."""
    clock = clock or Stopwatch()
    clock.add_trials(trial.figures.get("seconds", {}) for trial in outcome.evaluated)
    common = dict(baseline=criterion.baseline, n_trials=len(history), n_evaluated=outcome.n_evaluated,
                  framework=framework, stopped_by=outcome.stopped_by, workspace=str(history.path.parent),
                  timings=clock.seconds, pareto=tuple(pareto.front(outcome.trials, criterion.higher_is_better)))
    rejected = []
    for trial in outcome.passing[:FINALISTS]:
        try:
            final = _timed_finalize(clock, finalize, trial.config)
        except Exception as error:  # e.g. the compiler fails on this config: try the next finalist
            rejected.append({"key": trial.key, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        if not criterion.passes(final.accuracy):
            rejected.append({"key": trial.key, "compiled_accuracy": final.accuracy})
            continue
        config, final = _faster_of(trial.config, final, bf16_twin(trial.config), criterion, finalize, history, clock)
        objective = trial.objective if config is trial.config or proxy is None else proxy(config)
        return _passed(trial.key, config, objective, final, history, rejected, common)
    evaluated = [trial for trial in outcome.trials if trial.status == Status.OK and trial.accuracy is not None]
    best_failing = min(evaluated, key=lambda trial: (criterion.loss(trial.accuracy), trial.key), default=None)
    history.set_meta("result", {"key": None, "rejected": rejected})
    history.set_meta("timings", clock.seconds)
    why = _why_nothing_passed(outcome, rejected)
    log.warning("no config met the criterion: %s", why)
    return TuneResult(model=None, config=None, accuracy=None, objectives={}, int8_ops=(), fp32_ops=(),
                      passed=False, best_failing=best_failing, reason=why, **common)


def _why_nothing_passed(outcome: EngineOutcome, rejected: list) -> str:
    """One line for the result and the log: what the history says of a tuning that found nothing."""
    if rejected:
        return "; ".join(map(rejection, rejected))
    if common := common_failure(outcome.trials):
        return common
    failed = sum(trial.status.is_failure for trial in outcome.trials)
    return f"{outcome.stopped_by}; {len(outcome.trials)} trials, {failed} of them failed (see the history for why)"


def rejection(item: dict) -> str:
    """Why a finalist that passed its trial was not chosen, as the history records it."""
    return f"finalist {item['key']} " + (f"failed to compile: {item['error']}" if "error" in item
                                         else f"scored {item['compiled_accuracy']} compiled")


def _passed(key: str, config: TuneConfig, proxy: float, final: Finalized, history: History, rejected: list,
            common: dict) -> TuneResult:
    """The result for a config that was compiled and measured: recorded (``key``: the trial chosen,
    which ``config`` is, or is the bf16 twin of), then returned."""
    figures = {**final.figures, "fp32_macs_fraction": proxy}
    history.set_meta("result", {"key": key, "accuracy": final.accuracy, "objectives": figures,
                                "int8_ops": list(final.int8_ops), "bf16_ops": list(final.bf16_ops), "rejected": rejected})
    history.set_meta("timings", common["timings"])
    return TuneResult(model=final.model, config=config, accuracy=final.accuracy, objectives=figures,
                      int8_ops=tuple(final.int8_ops), fp32_ops=tuple(final.fp32_ops), bf16_ops=tuple(final.bf16_ops),
                      passed=True, model_bytes=final.model_bytes, **common)


def _faster_of(config: TuneConfig, final: Finalized, twin: Optional[TuneConfig], criterion: Criterion,
               finalize: Callable[[TuneConfig], Finalized], history: History,
               clock: Stopwatch) -> tuple[TuneConfig, Finalized]:
    """The chosen config or its bf16 twin: the twin if it passes too and runs at least
    ``BF16_WORTH`` times as fast compiled (each is timed in step with the same compiled fp32
    model, so the ratios compare on a noisy machine; a closer call is noise). The comparison is
    recorded (``bf16_twin`` in the history's meta)."""
    if twin is None or "latency_ratio" not in final.figures:
        return config, final
    try:
        twin_final = _timed_finalize(clock, finalize, twin)
    except Exception as error:  # bf16 lowering failed: the fp32 fallback stands
        history.set_meta("bf16_twin", {"key": twin.key, "error": f"{type(error).__name__}: {error}"[:500]})
        return config, final
    speed_up, fp32_speed_up = twin_final.figures["latency_ratio"], final.figures["latency_ratio"]
    kept = criterion.passes(twin_final.accuracy) and speed_up > BF16_WORTH * fp32_speed_up
    history.set_meta("bf16_twin", {"key": twin.key, "bf16_ops": list(twin.bf16_ops), "accuracy": twin_final.accuracy,
                                   "latency_ratio": speed_up, "fp32_fallback_latency_ratio": fp32_speed_up, "kept": kept})
    log.info("%d fallback op(s) in bf16: %.2fx the speed of fp32 (%.2fx with them in fp32), accuracy %s: %s",
             len(twin.bf16_ops), speed_up, fp32_speed_up, twin_final.accuracy, "bf16 kept" if kept else "fp32 kept")
    return (twin, twin_final) if kept else (config, final)


def _timed_finalize(clock: Stopwatch, finalize: Callable[[TuneConfig], Finalized], config: TuneConfig) -> Finalized:
    """``finalize(config)``, its time and the worker's own phases on the clock under ``finalize``."""
    with clock.time("finalize"):
        final = finalize(config)
        clock.merge("finalize", final.timings)
    return final


def _default_config_only(job: Job, pool: JobExecutor) -> TuneResult:
    """LPOT's ``performance_only``: quantize with the default config, no accuracy tuning; measure
    it (and its accuracy, when an evaluation was given)."""
    with job.clock.time("baseline"):
        baseline = _baseline(job) if job.worker_job.evaluation.given else None
    default = job.space.model_wise_configs()[0]
    final = _timed_finalize(job.clock, pool.finalize, default)
    common = dict(baseline=baseline, n_trials=0, n_evaluated=0, framework=job.config.model.framework,
                  stopped_by="performance_only", workspace=str(job.history.path.parent), timings=job.clock.seconds)
    return _passed(default.key, default, job.space.fp32_macs_fraction(default), final, job.history, [], common)


def _shards_at_most(job: Job) -> int:
    """Workers one trial's evaluation may be split across: those the evaluation allows, where the
    fp32 model's inference took long enough (``SPLIT_WORTH_SECONDS``) to pay for each part's own
    quantizing and reading of every batch; never under quantization-aware training, whose
    workers would each train weights of their own."""
    inference = job.history.get_meta("inference_seconds")
    if job.config.quantization.approach == Approach.QAT or not inference or inference < SPLIT_WORTH_SECONDS:
        return 1
    return job.worker_job.evaluation.shards_at_most()


def trial_limit(policy: ExitPolicy, baseline_seconds: Optional[float], approach: Approach) -> Optional[float]:
    """Seconds a trial may run: ``trial_timeout`` if given (0: none), else ten times the fp32
    baseline's evaluation plus an allowance for quantizing; none for quantization-aware training,
    whose q_func may train far longer than an evaluation."""
    if policy.trial_timeout is not None:
        return policy.trial_timeout or None
    if approach == Approach.QAT or baseline_seconds is None:
        return None
    return TRIAL_LIMIT_FACTOR * baseline_seconds + TRIAL_LIMIT_ALLOWANCE


def _baseline(job: Job) -> float:
    recorded = job.history.get_meta("baseline")
    if recorded is not None:
        return recorded
    limit = user_code_limit(job.config.tuning.exit_policy)
    started = time.perf_counter()
    try:
        measured = within(limit, lambda: job.worker_job.evaluation.measure(job.adaptor, job.baseline_model),
                          EvaluationError(f"no result after {limit:g} s (tuning.exit_policy.trial_timeout); is the "
                                          "eval_func or the eval_dataloader waiting for something?"))
    except EvaluationError as error:
        raise EvaluationError(f"fp32 baseline: {error}") from None
    except Exception as error:  # the user's code or data: say so before any worker starts
        raise EvaluationError(f"fp32 baseline: evaluating the original model failed: {type(error).__name__}: {error}") from error
    baseline = measured.value
    if job.higher_is_better and baseline == 0:
        raise EvaluationError(f"fp32 baseline: the original model scores {baseline} on the evaluation, so any int8 "
                              "model would meet a criterion relative to it; check the labels, the metric and "
                              "that the model is the trained one")
    relative = job.config.tuning.accuracy_criterion.absolute is None
    if not job.higher_is_better and baseline == 0 and relative:
        raise EvaluationError("fp32 baseline: the original model's error is 0 (as it is against its own outputs, "
                              "with `compare_label: false`), so a relative criterion allows no error at all; give "
                              "`tuning.accuracy_criterion.absolute`, the error an int8 model may have")
    job.history.set_meta("baseline", baseline)
    job.history.set_meta("baseline_seconds", time.perf_counter() - started)
    job.history.set_meta("evaluation_samples", measured.samples)
    job.history.set_meta("inference_seconds", measured.inference_seconds)
    return baseline
