"""The user's inputs to one tuning, checked before any worker starts and summarised for the history.

Each check names the argument or YAML key at fault, the value and what is expected, so that bad
input fails in seconds on the driver rather than on every worker.
"""

from __future__ import annotations

import collections.abc
import logging
import os
import platform
import sys
from typing import Any, Callable, Optional

from . import registry
from .adaptors.base import Adaptor
from .config import Approach, Config
from .errors import ConfigError, DataError
from .evaluation import Evaluation, split_batch, user_code_limit, within
from .metrics import make_metric
from .objectives import WeightedObjectives
from .space import TuningSpace

log = logging.getLogger("lpot_ray")


def yaml_loaders(config: Config, q_dataloader: Any, eval_dataloader: Any, eval_func: Optional[Callable]) -> tuple[Any, Any]:
    """LPOT's fully-YAML use: the ``dataloader`` sections give the data the call did not pass."""
    from .data import build_loader

    calibration, accuracy = config.quantization.calibration.dataloader, config.evaluation.accuracy
    if q_dataloader is None and calibration is not None:
        q_dataloader = build_loader(calibration, "quantization.calibration.dataloader", framework=config.model.framework)
    if eval_dataloader is None and eval_func is None and accuracy.dataloader is not None:
        eval_dataloader = build_loader(accuracy.dataloader, "evaluation.accuracy.dataloader", accuracy.postprocess,
                                       config.model.framework)
    return q_dataloader, eval_dataloader


def check_strategy(config: Config, strategy_class: type, adaptor_class: type) -> None:
    """A strategy that ranks ops by their tensors needs an adaptor that can inspect them."""
    if getattr(strategy_class, "inspects_tensors", False) and not adaptor_class.can_inspect_tensors():
        raise ConfigError(f"`tuning.strategy.name`: {config.tuning.strategy.name!r} ranks ops by inspecting tensors, "
                          f"which the {config.model.framework} adaptor can't do; choose basic or bayesian")


def evaluation_from(config: Config, eval_dataloader: Any, eval_func: Optional[Callable]) -> Evaluation:
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
    if isinstance(eval_dataloader, collections.abc.Iterator):
        raise DataError(f"eval_dataloader: a {type(eval_dataloader).__name__} can be read only once, and every trial "
                        "reads it again; pass a list of batches or a DataLoader")
    return Evaluation(dataloader=eval_dataloader, metric=metric)


def higher_is_better(config: Config, evaluation: Evaluation) -> bool:
    """The YAML's ``higher_is_better`` if given, else the built-in metric's own direction (an
    error such as MSE is better lower), else True as in LPOT."""
    criterion = config.tuning.accuracy_criterion
    if "higher_is_better" in criterion.model_fields_set or evaluation.eval_func is not None:
        return criterion.higher_is_better
    metric = config.evaluation.accuracy.metric
    return getattr(registry.metrics.get(next(iter(metric))), "higher_is_better", True) if metric else True


def training_function(config: Config, adaptor_class: type, q_func: Optional[Callable]) -> Optional[Callable]:
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

        if train.dataloader is None:
            raise ConfigError("`quantization.train.dataloader`: training from the YAML needs the data to train on; "
                              "give it, or pass q_func")
        build_loader(train.dataloader, "quantization.train.dataloader", framework=framework)
        q_func = adaptor_class.training_from_yaml(train)
    if q_func is None:
        raise ConfigError("q_func: quant_aware_training needs q_func(model), the function that trains the "
                          "prepared (fake-quantized) model, or `quantization.train` in the YAML")
    if not callable(q_func):
        raise ConfigError(f"q_func: expected a function model -> None, got {type(q_func).__name__}")
    return q_func


def calibration_batches(config: Config, q_dataloader: Any, eval_dataloader: Any) -> list:
    """The calibration batches; dynamic quantization and training need only an example batch,
    which the evaluation loader gives when there is no calibration loader."""
    approach = config.quantization.approach
    if q_dataloader is None and not approach.calibrates:
        if eval_dataloader is None:
            raise DataError(f"q_dataloader: {approach.value} needs an example batch of inputs: "
                            "pass q_dataloader or eval_dataloader")
        return _batches(eval_dataloader, 1, "eval_dataloader")
    wanted = max(config.quantization.calibration.sampling_size)
    limit = user_code_limit(config.tuning.exit_policy)
    batches = within(limit, lambda: _batches(q_dataloader, wanted, "q_dataloader"),
                     DataError(f"q_dataloader: no calibration batch after {limit:g} s "
                               "(tuning.exit_policy.trial_timeout); is it waiting for something?"))
    held = sum(Adaptor.batch_size(inputs) for inputs in batches)
    if approach.calibrates and held < wanted:
        log.warning("quantization.calibration.sampling_size: %d samples asked, q_dataloader holds %d; calibrating on %d",
                    wanted, held, held)
    return batches


def _batches(loader: Any, samples: int, name: str) -> list:
    if loader is None:
        raise DataError(f"{name}: post-training static quantization needs a calibration loader")
    try:
        iterator = iter(loader)
    except TypeError as error:
        raise DataError(f"{name}: can't iterate over {type(loader).__name__}: {error}") from None
    batches: list = []
    seen = 0
    while seen < samples:
        try:
            batch = next(iterator)
        except StopIteration:
            break
        except Exception as error:  # the user's loader: name it and the batch
            raise DataError(f"{name}: reading batch {len(batches) + 1} failed: {type(error).__name__}: {error}") from error
        inputs, _ = split_batch(batch)
        batches.append(inputs)
        seen += Adaptor.batch_size(inputs)
    if not batches:
        raise DataError(f"{name}: yielded no batches")
    return batches


def objectives_from(config: Config) -> WeightedObjectives:
    """``tuning.multi_objectives`` if given, else the single ``tuning.objective``."""
    several = config.tuning.multi_objectives
    names = several.objective if several else (config.tuning.objective,)
    weights = several.weight if several and several.weight else (1.0,) * len(names)
    return WeightedObjectives(tuple(registry.objectives.get(name)() for name in names), tuple(weights))


def fingerprint(config: Config, weights: str, space: TuningSpace) -> dict:
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


def description(config: Config, space: TuningSpace) -> dict:
    """What the report shows of the job: the configuration, the ops and the environment."""
    from . import __version__

    versions = {name: getattr(sys.modules[name], "__version__", "?") for name in ("torch", "torchao", "tensorflow", "keras", "mxnet", "ray") if name in sys.modules}
    return {
        "config": config.model_dump(mode="json"),
        "ops": [{"name": op.name, "op_type": op.op_type, "macs": op.macs, "weights": op.weights} for op in space.ops],
        "environment": {"lpot_ray": __version__, "python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), **versions},
    }
