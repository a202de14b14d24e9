"""tune() and Quantization: config → space → strategy → executor → history → result.

Every check that needs no worker runs first (config, plug-in names, data, model export, space,
history), so bad input fails in seconds. Then the slow starts overlap: the driver measures the
fp32 baseline and evaluates the first trials itself (it is worker 0) while Ray connects in the
background (a private local Ray only once the first trial shows there is more to do); Ray
workers are added once Ray is up and the baseline is known to work, and join as they finish
importing their framework. A tuning never waits for Ray to start or stop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from . import registry
from .adaptors.base import Adaptor
from .config import Config, load_config
from .engine import Criterion, Engine, EngineOutcome
from .errors import ConfigError, DataError, EvaluationError, ModelError
from .evaluation import Evaluation, split_batch
from .executor import Executor
from .history import History
from .metrics import make_metric
from .objectives import WeightedObjectives
from .progress import ProgressLine
from .ray_session import RayPlan
from .result import TuneResult
from .cpu import bf16_unavailable_reason
from .space import BF16, TuneConfig, TuningSpace, describe_capabilities
from .trial import OK
from .worker import WorkerJob

FINALISTS = 3
log = logging.getLogger("lpot_ray")


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
    plan = _ray_plan(config, address, verbose) if _wants_ray(config, address) else None
    if plan is not None:
        plan.check_reachable()  # a wrong cluster address fails in seconds, before any other work
    job = _prepare(config, model, q_dataloader, q_func, eval_dataloader, eval_func, resume_file)
    if config.tuning.exit_policy.performance_only:
        return _default_config_only(job, model, config)
    executor = Executor(job.worker_job)
    try:
        if plan is not None:
            executor.grow_on(plan)
        baseline = _baseline(job.history, job.worker_job.evaluation, job.adaptor, job.fp32_model)
        executor.check_cluster()  # a cluster refusing the connection fails before any trial
        criterion = Criterion.from_config(baseline, config.tuning.accuracy_criterion, _higher_is_better(config, job))
        job.history.set_meta("criterion", dataclasses.asdict(criterion))
        strategy = job.strategy_class(job.space, criterion.higher_is_better, config.tuning.random_seed)
        strategy.parallelism = _planned_workers(config)
        progress = ProgressLine()
        engine = Engine(strategy, executor, job.history, criterion, config.tuning.exit_policy,
                        lambda tune_config: job.objectives.proxy(job.space, tune_config), progress)
        try:
            outcome = engine.run()
        finally:
            progress.close()
        return _result(outcome, executor, job.adaptor, criterion, job.history, config)
    finally:
        executor.shutdown()
        job.history.close()


def _higher_is_better(config: Config, job: "_PreparedJob") -> bool:
    """The YAML's ``higher_is_better`` if given, else the built-in metric's own direction (an
    error such as MSE is better lower), else True as in LPOT."""
    criterion = config.tuning.accuracy_criterion
    if "higher_is_better" in criterion.model_fields_set or job.worker_job.evaluation.eval_func is not None:
        return criterion.higher_is_better
    metric = config.evaluation.accuracy.metric
    return getattr(registry.metrics.get(next(iter(metric))), "higher_is_better", True) if metric else True


def _default_config_only(job: "_PreparedJob", model: Any, config: Config) -> TuneResult:
    """LPOT's ``performance_only``: quantize with the default config, no accuracy tuning; measure
    it (and its accuracy, when an evaluation was given)."""
    executor = Executor(job.worker_job)
    try:
        evaluation = job.worker_job.evaluation
        baseline = _baseline(job.history, evaluation, job.adaptor, job.fp32_model) if evaluation.given else None
        default = job.space.model_wise_configs()[0]
        final = executor.finalize(default, measure=True)
        common = dict(baseline=baseline, n_trials=0, n_evaluated=0, framework=config.model.framework,
                      stopped_by="performance_only", workspace=str(job.history.path.parent))
        return _passed(default, job.space.fp32_macs_fraction(default), final, job.adaptor, job.history, [], common)
    finally:
        executor.shutdown()
        job.history.close()


@dataclass
class _PreparedJob:
    """Everything checked and built before any worker exists."""

    worker_job: WorkerJob
    adaptor: Any
    space: TuningSpace
    strategy_class: type
    objectives: WeightedObjectives
    history: History
    fp32_model: Any  # what the fp32 baseline is measured on


def _prepare(config: Config, model: Any, q_dataloader: Any, q_func: Optional[Callable], eval_dataloader: Any,
             eval_func: Optional[Callable], resume_file: Optional[Union[str, os.PathLike]]) -> _PreparedJob:
    """Every check that needs no worker: plug-in names, data, model export, space, history."""
    evaluation = _evaluation(config, eval_dataloader, eval_func)
    strategy_class = registry.strategies.get(config.tuning.strategy.name)
    objectives = _objectives(config)
    adaptor_class = registry.adaptors.get(config.model.framework)
    q_func = q_func or _yaml_training(config)
    _check_approach(config, adaptor_class, q_func)
    if getattr(strategy_class, "inspects_tensors", False) and not adaptor_class.can_inspect_tensors():
        raise ConfigError(f"`tuning.strategy.name`: {config.tuning.strategy.name!r} ranks ops by inspecting tensors, "
                          f"which the {config.model.framework} adaptor can't do; choose basic or bayesian")
    adaptor = adaptor_class()
    adaptor.approach = config.quantization.approach

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
    worker_job = WorkerJob(adaptor_class, payload, calibration, evaluation, space.ops,
                           threads=max(1, int(config.ray.cpus_per_worker)), q_func=q_func)
    return _PreparedJob(worker_job, adaptor, space, strategy_class, objectives, history,
                        adaptor.baseline_model(model, fp32_model))


def _planned_workers(config: Config) -> int:
    """Workers the tuning expects: ``ray.workers``, else one per ``cpus_per_worker`` of this machine."""
    return config.ray.workers or max(1, int((os.cpu_count() or 1) // config.ray.cpus_per_worker))


def _ray_plan(config: Config, address: Optional[str], verbose: bool) -> RayPlan:
    ray = config.ray
    return RayPlan(address or ray.address, ray.workers, ray.cpus_per_worker, verbose,
                   dict(ray.resources_per_worker), ray.worker_start_timeout)


def _wants_ray(config: Config, address: Optional[str]) -> bool:
    """Ray workers join the driver unless it is to work alone (``workers: 1``, or one CPU)."""
    if config.ray.workers == 1:
        return False
    clustered = address or config.ray.address or os.environ.get("RAY_ADDRESS")
    return bool(config.ray.workers or clustered or (os.cpu_count() or 1) > 1)


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


def _yaml_training(config: Config) -> Optional[Callable]:
    """LPOT's ``quantization.train`` as a q_func, its data checked now rather than on a worker."""
    train = config.quantization.train
    if train is None:
        return None
    if config.quantization.approach != "quant_aware_training":
        raise ConfigError(f"`quantization.train`: only used with `quantization.approach: quant_aware_training`; "
                          f"the approach is {config.quantization.approach!r}")
    from .data import build_loader
    from .training import YamlTraining

    build_loader(train.dataloader, "quantization.train.dataloader")
    return YamlTraining(train)


def _check_approach(config: Config, adaptor_class: type, q_func: Optional[Callable]) -> None:
    """The approach must be one the framework can do, and q_func given exactly for training."""
    approach, framework = config.quantization.approach, config.model.framework
    if approach not in adaptor_class.approaches:
        raise ConfigError(f"`quantization.approach`: {approach!r} is not supported by the {framework} adaptor; "
                          f"it supports {', '.join(adaptor_class.approaches)}")
    if approach == "quant_aware_training":
        if q_func is None:
            raise ConfigError("q_func: quant_aware_training needs q_func(model), the function that trains the "
                              "prepared (fake-quantized) model, or `quantization.train` in the YAML")
        if not callable(q_func):
            raise ConfigError(f"q_func: expected a function model -> None, got {type(q_func).__name__}")
    elif q_func is not None:
        raise ConfigError(f"q_func: only used with `quantization.approach: quant_aware_training`; the approach is {approach!r}")


def _calibration_batches(config: Config, q_dataloader: Any, eval_dataloader: Any) -> list:
    """The calibration batches; dynamic quantization and training need only an example batch,
    which the evaluation loader gives when there is no calibration loader."""
    if q_dataloader is None and config.quantization.approach != "post_training_static_quant":
        if eval_dataloader is None:
            raise DataError(f"q_dataloader: {config.quantization.approach} needs an example batch of inputs: "
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


def _fingerprint(config: Config, weights: str, space: TuningSpace) -> dict:
    """What must match for a resume: not exit_policy or ray, which a user may change."""
    return {
        "model": weights,
        "approach": config.quantization.approach,
        "space": space.fingerprint(),
        "criterion": config.tuning.accuracy_criterion.model_dump(),
        "strategy": config.tuning.strategy.name,
        "seed": config.tuning.random_seed,
        "metric": config.evaluation.accuracy.metric,
        "objective": config.tuning.multi_objectives.model_dump() if config.tuning.multi_objectives else config.tuning.objective,
    }


def _description(config: Config, space: TuningSpace) -> dict:
    """What the report shows of the job: the configuration, the ops and the environment."""
    import platform
    import sys

    from . import __version__

    versions = {name: getattr(sys.modules[name], "__version__", "?") for name in ("torch", "torchao", "tensorflow", "keras", "mxnet", "ray") if name in sys.modules}
    return {
        "config": config.model_dump(mode="json"),
        "ops": [{"name": op.name, "op_type": op.op_type, "macs": op.macs, "weights": op.weights} for op in space.ops],
        "environment": {"lpot_ray": __version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), **versions},
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
    """Compile the best passing config to real int8 kernels and measure it there; if it no longer
    passes compiled (or fails to compile), fall to the next finalist. The choice stays the
    proxy's, which is deterministic; the measured figures are reported."""
    common = dict(baseline=criterion.baseline, n_trials=len(history), n_evaluated=outcome.n_evaluated,
                  framework=config.model.framework, stopped_by=outcome.stopped_by, workspace=str(history.path.parent))
    rejected = []
    for trial in outcome.passing[:FINALISTS]:
        try:
            final = executor.finalize(trial.config, measure=True)
        except Exception as error:  # e.g. the compiler fails on this config: try the next finalist
            rejected.append({"key": trial.key, "error": f"{type(error).__name__}: {error}"[:500]})
            continue
        if not criterion.passes(final["accuracy"]):
            rejected.append({"key": trial.key, "compiled_accuracy": final["accuracy"]})
            continue
        return _passed(trial.config, trial.objective, final, adaptor, history, rejected, common)
    evaluated = [trial for trial in outcome.trials if trial.status == OK and trial.accuracy is not None]
    best_failing = min(evaluated, key=lambda trial: (criterion.loss(trial.accuracy), trial.key), default=None)
    history.set_meta("result", {"key": None, "rejected": rejected})
    return TuneResult(model=None, config=None, accuracy=None, objectives={}, int8_ops=(), fp32_ops=(),
                      passed=False, best_failing=best_failing, **common)


def _passed(config: TuneConfig, proxy: float, final: dict, adaptor: Any, history: History, rejected: list,
            common: dict) -> TuneResult:
    """The result for a config that was compiled and measured: recorded, then returned."""
    figures = {**final["figures"], "fp32_macs_fraction": proxy}
    history.set_meta("result", {"key": config.key, "accuracy": final["accuracy"], "objectives": figures,
                                "int8_ops": final["int8_ops"], "bf16_ops": final.get("bf16_ops", []), "rejected": rejected})
    return TuneResult(model=adaptor.deserialize(final["model"]), config=config, accuracy=final["accuracy"],
                      objectives=figures, int8_ops=tuple(final["int8_ops"]), fp32_ops=tuple(final["fp32_ops"]),
                      bf16_ops=tuple(final.get("bf16_ops", ())), passed=True, model_bytes=final["model"], **common)


def _objectives(config: Config) -> WeightedObjectives:
    """``tuning.multi_objectives`` if given, else the single ``tuning.objective``."""
    several = config.tuning.multi_objectives
    names = several.objective if several else (config.tuning.objective,)
    weights = several.weight if several and several.weight else (1.0,) * len(names)
    return WeightedObjectives(tuple(registry.objectives.get(name)() for name in names), tuple(weights))
