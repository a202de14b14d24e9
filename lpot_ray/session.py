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
import logging
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import registry
from .adaptors.base import Adaptor
from .config import Approach, Config
from .cpu import bf16_unavailable_reason
from .engine import Criterion, Engine, EngineOutcome
from .errors import ConfigError, DataError, EvaluationError, ModelError
from .evaluation import Evaluation, split_batch
from .history import History
from .metrics import make_metric
from .objectives import WeightedObjectives
from .pool import JobExecutor, WorkerPool
from .result import TuneResult
from .space import BF16, TuneConfig, TuningSpace, describe_capabilities
from .trial import Finalized, Status
from .worker import TrialRunner, WorkerJob

FINALISTS = 3  # passing configs compiled at most, best first, until one still passes compiled
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

    def driver_runner(self) -> TrialRunner:
        """The driver's worker for this job, on the model the driver has loaded already."""
        return TrialRunner(self.worker_job, "driver", self.adaptor, self.fp32_model)


def prepare(config: Config, model: Any, q_dataloader: Any = None, q_func: Optional[Callable] = None,
            eval_dataloader: Any = None, eval_func: Optional[Callable] = None,
            resume_file: Optional[Union[str, os.PathLike]] = None, name: str = "") -> Job:
    """Every check that needs no worker: plug-in names, approach, data, model export, space, history."""
    evaluation = _evaluation(config, eval_dataloader, eval_func)
    strategy_class = registry.strategies.get(config.tuning.strategy.name)
    objectives = _objectives(config)
    adaptor_class = registry.adaptors.get(config.model.framework)
    approach = config.quantization.approach
    q_func = _training(config, adaptor_class, q_func)
    if getattr(strategy_class, "inspects_tensors", False) and not adaptor_class.can_inspect_tensors():
        raise ConfigError(f"`tuning.strategy.name`: {config.tuning.strategy.name!r} ranks ops by inspecting tensors, "
                          f"which the {config.model.framework} adaptor can't do; choose basic or bayesian")
    adaptor = adaptor_class.for_approach(approach)

    calibration = _calibration_batches(config, q_dataloader, eval_dataloader)
    payload = adaptor.prepare(model, calibration[0])
    fp32_model = adaptor.load(payload)
    capabilities = adaptor.capabilities(fp32_model)
    space = TuningSpace.build(capabilities, config.quantization)
    if config.quantization.use_bf16 and not any(BF16 in capability.schemes for capability in capabilities):
        reason = bf16_unavailable_reason() or f"the {config.model.framework} adaptor offers no bf16"
        log.warning("`quantization.use_bf16`: %s; ops fall back to fp32", reason)
    if not space.ops:
        raise ModelError(f"model: {type(model).__name__} has no op lpot_ray can quantize for {config.model.framework}")
    if not space.has_low_precision:
        raise ConfigError(f"quantization: model_wise/op_wise leave no int8 (or bf16) scheme for any op; "
                          f"{config.model.framework} offers {describe_capabilities(capabilities)}")
    history = History.start(config.tuning.workspace.path, resume_file or config.tuning.workspace.resume,
                            _fingerprint(config, adaptor.weights_digest(fp32_model), space))
    history.set_meta("job", _description(config, space))
    worker_job = WorkerJob(adaptor_class, approach, payload, calibration, evaluation, space.ops,
                           threads=max(1, int(config.ray.cpus_per_worker)), q_func=q_func)
    return Job(name or config.model.name, config, higher_is_better(config, evaluation), worker_job,
               adaptor, fp32_model, adaptor.baseline_model(model, fp32_model), space, strategy_class, objectives, history)


def run(job: Job, pool: WorkerPool, on_progress: Optional[Callable[[Engine], None]] = None) -> TuneResult:
    """Tune a prepared job on its share of ``pool``; the job's history is closed at the end."""
    config = job.config
    try:
        if config.tuning.exit_policy.performance_only:
            return _default_config_only(job, pool)
        baseline = _baseline(job)
        pool.check_cluster()  # a cluster refusing the connection fails before any trial
        criterion = Criterion.from_config(baseline, config.tuning.accuracy_criterion, job.higher_is_better)
        job.history.set_meta("criterion", dataclasses.asdict(criterion))
        strategy = job.strategy_class(job.space, criterion.higher_is_better, config.tuning.random_seed)
        strategy.parallelism = pool.planned_share()
        engine = Engine(strategy, JobExecutor(pool, job.name), job.history, criterion, config.tuning.exit_policy,
                        lambda tune_config: job.objectives.proxy(job.space, tune_config),
                        on_progress or (lambda engine: None))
        outcome = engine.run()
        return conclude(outcome, criterion, lambda tune_config: pool.finalize(job.name, tune_config, measure=True),
                        job.history, config.model.framework)
    finally:
        pool.job_done(job.name)
        job.history.close()


# --- the result ------------------------------------------------------------------------------
def conclude(outcome: EngineOutcome, criterion: Criterion, finalize: Callable[[TuneConfig], Finalized],
             history: History, framework: str) -> TuneResult:
    """Compile the best passing config to real int8 kernels and measure it there; if it no longer
    passes compiled (or fails to compile), fall to the next finalist. The choice stays the
    proxy's, which is deterministic; the measured figures are reported."""
    common = dict(baseline=criterion.baseline, n_trials=len(history), n_evaluated=outcome.n_evaluated,
                  framework=framework, stopped_by=outcome.stopped_by, workspace=str(history.path.parent))
    rejected = []
    for trial in outcome.passing[:FINALISTS]:
        try:
            final = finalize(trial.config)
        except Exception as error:  # e.g. the compiler fails on this config: try the next finalist
            rejected.append({"key": trial.key, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        if not criterion.passes(final.accuracy):
            rejected.append({"key": trial.key, "compiled_accuracy": final.accuracy})
            continue
        return _passed(trial.config, trial.objective, final, history, rejected, common)
    evaluated = [trial for trial in outcome.trials if trial.status == Status.OK and trial.accuracy is not None]
    best_failing = min(evaluated, key=lambda trial: (criterion.loss(trial.accuracy), trial.key), default=None)
    history.set_meta("result", {"key": None, "rejected": rejected})
    return TuneResult(model=None, config=None, accuracy=None, objectives={}, int8_ops=(), fp32_ops=(),
                      passed=False, best_failing=best_failing, **common)


def _passed(config: TuneConfig, proxy: float, final: Finalized, history: History, rejected: list,
            common: dict) -> TuneResult:
    """The result for a config that was compiled and measured: recorded, then returned."""
    figures = {**final.figures, "fp32_macs_fraction": proxy}
    history.set_meta("result", {"key": config.key, "accuracy": final.accuracy, "objectives": figures,
                                "int8_ops": list(final.int8_ops), "bf16_ops": list(final.bf16_ops), "rejected": rejected})
    return TuneResult(model=final.model, config=config, accuracy=final.accuracy, objectives=figures,
                      int8_ops=tuple(final.int8_ops), fp32_ops=tuple(final.fp32_ops), bf16_ops=tuple(final.bf16_ops),
                      passed=True, model_bytes=final.model_bytes, **common)


def _default_config_only(job: Job, pool: WorkerPool) -> TuneResult:
    """LPOT's ``performance_only``: quantize with the default config, no accuracy tuning; measure
    it (and its accuracy, when an evaluation was given)."""
    baseline = _baseline(job) if job.worker_job.evaluation.given else None
    default = job.space.model_wise_configs()[0]
    final = pool.finalize(job.name, default, measure=True)
    common = dict(baseline=baseline, n_trials=0, n_evaluated=0, framework=job.config.model.framework,
                  stopped_by="performance_only", workspace=str(job.history.path.parent))
    return _passed(default, job.space.fp32_macs_fraction(default), final, job.history, [], common)


def _baseline(job: Job) -> float:
    recorded = job.history.get_meta("baseline")
    if recorded is not None:
        return recorded
    try:
        baseline = job.worker_job.evaluation.run(job.adaptor, job.baseline_model)
    except EvaluationError as error:
        raise EvaluationError(f"fp32 baseline: {error}") from None
    except Exception as error:  # the user's code or data: say so before any worker starts
        raise EvaluationError(f"fp32 baseline: evaluating the original model failed: {type(error).__name__}: {error}") from error
    job.history.set_meta("baseline", baseline)
    return baseline


# --- checks that need no worker --------------------------------------------------------------
def _evaluation(config: Config, eval_dataloader: Any, eval_func: Optional[Callable]) -> Evaluation:
    if config.tuning.exit_policy.performance_only and eval_func is None and eval_dataloader is None:
        return Evaluation()  # no accuracy tuning, so no evaluation needed
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


def higher_is_better(config: Config, evaluation: Evaluation) -> bool:
    """The YAML's ``higher_is_better`` if given, else the built-in metric's own direction (an
    error such as MSE is better lower), else True as in LPOT."""
    criterion = config.tuning.accuracy_criterion
    if "higher_is_better" in criterion.model_fields_set or evaluation.eval_func is not None:
        return criterion.higher_is_better
    metric = config.evaluation.accuracy.metric
    return getattr(registry.metrics.get(next(iter(metric))), "higher_is_better", True) if metric else True


def _training(config: Config, adaptor_class: type, q_func: Optional[Callable]) -> Optional[Callable]:
    """The approach must be one the framework can do; quantization-aware training needs a
    ``q_func`` (or LPOT's ``quantization.train``, its data checked now rather than on a worker),
    and only it takes one."""
    approach, framework, train = config.quantization.approach, config.model.framework, config.quantization.train
    if approach not in adaptor_class.approaches:
        raise ConfigError(f"`quantization.approach`: {approach.value!r} is not supported by the {framework} adaptor; "
                          f"it supports {', '.join(str(known) for known in adaptor_class.approaches)}")
    if train is not None and approach != Approach.QAT:
        raise ConfigError(f"`quantization.train`: only used with `quantization.approach: quant_aware_training`; "
                          f"the approach is {approach.value!r}")
    if approach != Approach.QAT:
        if q_func is not None:
            raise ConfigError(f"q_func: only used with `quantization.approach: quant_aware_training`; "
                              f"the approach is {approach.value!r}")
        return None
    if q_func is None and train is not None:
        from .data import build_loader

        build_loader(train.dataloader, "quantization.train.dataloader")
        q_func = adaptor_class.training_from_yaml(train)
    if q_func is None:
        raise ConfigError("q_func: quant_aware_training needs q_func(model), the function that trains the "
                          "prepared (fake-quantized) model, or `quantization.train` in the YAML")
    if not callable(q_func):
        raise ConfigError(f"q_func: expected a function model -> None, got {type(q_func).__name__}")
    return q_func


def _calibration_batches(config: Config, q_dataloader: Any, eval_dataloader: Any) -> list:
    """The calibration batches; dynamic quantization and training need only an example batch,
    which the evaluation loader gives when there is no calibration loader."""
    approach = config.quantization.approach
    if q_dataloader is None and not approach.calibrates:
        if eval_dataloader is None:
            raise DataError(f"q_dataloader: {approach.value} needs an example batch of inputs: "
                            "pass q_dataloader or eval_dataloader")
        return _batches(eval_dataloader, 1, "eval_dataloader")
    return _batches(q_dataloader, max(config.quantization.calibration.sampling_size), "q_dataloader")


def _batches(loader: Any, samples: int, name: str) -> list:
    if loader is None:
        raise DataError(f"{name}: post-training static quantization needs a calibration loader")
    batches, seen = [], 0
    try:
        for batch in loader:
            inputs, _ = split_batch(batch)
            batches.append(inputs)
            seen += Adaptor.batch_size(inputs)
            if seen >= samples:
                break
    except TypeError as error:
        raise DataError(f"{name}: can't iterate over {type(loader).__name__}: {error}") from None
    if not batches:
        raise DataError(f"{name}: yielded no batches")
    return batches


def _objectives(config: Config) -> WeightedObjectives:
    """``tuning.multi_objectives`` if given, else the single ``tuning.objective``."""
    several = config.tuning.multi_objectives
    names = several.objective if several else (config.tuning.objective,)
    weights = several.weight if several and several.weight else (1.0,) * len(names)
    return WeightedObjectives(tuple(registry.objectives.get(name)() for name in names), tuple(weights))


def _fingerprint(config: Config, weights: str, space: TuningSpace) -> dict:
    """What must match for a resume: not exit_policy or ray, which a user may change."""
    return {
        "model": weights,
        "approach": config.quantization.approach.value,
        "space": space.fingerprint(),
        "criterion": config.tuning.accuracy_criterion.model_dump(),
        "strategy": config.tuning.strategy.name,
        "seed": config.tuning.random_seed,
        "metric": config.evaluation.accuracy.metric,
        "objective": config.tuning.multi_objectives.model_dump() if config.tuning.multi_objectives else config.tuning.objective,
    }


def _description(config: Config, space: TuningSpace) -> dict:
    """What the report shows of the job: the configuration, the ops and the environment."""
    from . import __version__

    versions = {name: getattr(sys.modules[name], "__version__", "?") for name in ("torch", "torchao", "tensorflow", "keras", "mxnet", "ray") if name in sys.modules}
    return {
        "config": config.model_dump(mode="json"),
        "ops": [{"name": op.name, "op_type": op.op_type, "macs": op.macs, "weights": op.weights} for op in space.ops],
        "environment": {"lpot_ray": __version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), **versions},
    }
