"""The ``lpot-ray`` command line.

    lpot-ray tune CONF.yaml [--address A] [--workers N] [--resume] [--verbose]
    lpot-ray history WORKSPACE [--sort accuracy|objective|duration|seq] [--pareto] [--json]
    lpot-ray report WORKSPACE [-o report.html]
    lpot-ray benchmark CONF.yaml [--model PATH] [--mode performance|accuracy] [--json]
    lpot-ray zoo ZOO.yaml [--address A] [--workers N]
    lpot-ray prune CONF.yaml [-o pruned.pt2]

``tune`` needs nothing but the YAML: the model is the file ``model.path`` names and the data
come from the ``dataloader`` sections; so does ``prune``, from LPOT's ``pruning`` section. Exit
codes: 0 done (``tune``: a config passed; ``prune``: the criterion is met, or nothing measured
accuracy), 1 ``tune`` found no config that meets the criterion (``prune``: the pruned model misses it), 2 bad input (named on one line), 3 any
other failure (one line; ``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import pareto
from .errors import LpotRayError
from .history import History, resolve_db_path
from .session import rejection
from .trial import Trial

EXIT_OK, EXIT_NO_PASS, EXIT_BAD_INPUT, EXIT_FAILED = 0, 1, 2, 3
TRUSTED_MODELS = ("Model files are code: tune and benchmark only models from sources you trust. A PyTorch .pt2 "
                  "is loaded with weights-only unpickling, but a TensorFlow SavedModel or an MXNet graph runs the "
                  "ops it names.")
SORT_KEYS = {
    "seq": lambda trial: trial.seq,
    "accuracy": lambda trial: -(trial.accuracy if trial.accuracy is not None else float("-inf")),
    "objective": lambda trial: trial.objective if trial.objective is not None else float("inf"),
    "duration": lambda trial: -trial.duration,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lpot-ray", description="Ray-distributed int8 tuning, LPOT-compatible.",
                                     epilog=TRUSTED_MODELS)
    commands = parser.add_subparsers(dest="command", required=True)
    tune = commands.add_parser("tune", help="tune the model a YAML names, on the data its dataloaders name",
                               epilog=TRUSTED_MODELS)
    tune.add_argument("config", help="an LPOT-style YAML with model.path (a model from a source you trust) and "
                                     "dataloader sections")
    tune.add_argument("--address", help="a Ray cluster to use (else ray.address, RAY_ADDRESS, a private Ray)")
    tune.add_argument("--workers", type=int, help="workers, the driver included (overrides ray.workers)")
    tune.add_argument("--resume", action="store_true", help="finish the tuning recorded in the workspace")
    tune.add_argument("--verbose", action="store_true", help="show Ray's and the workers' logs")
    history = commands.add_parser("history", help="every trial of a tuning workspace, as a table")
    history.add_argument("workspace", help="the workspace folder, or its history.db")
    history.add_argument("--sort", choices=sorted(SORT_KEYS), default="seq", help="order of the rows (default: seq)")
    history.add_argument("--pareto", action="store_true",
                         help="only the passing trials no other passing trial beats on both accuracy and objective")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    report = commands.add_parser("report", help="a self-contained HTML report with plots")
    report.add_argument("workspace", help="the workspace folder, or its history.db")
    report.add_argument("-o", "--output", help="the HTML file to write (default: WORKSPACE/report.html)")
    benchmark = commands.add_parser("benchmark", help="latency and throughput, or accuracy, of an fp32 or int8 model",
                                    epilog=TRUSTED_MODELS)
    benchmark.add_argument("config", help="an LPOT-style YAML with evaluation.performance and/or evaluation.accuracy")
    benchmark.add_argument("--model", help="a model file, or an int8 model folder saved by tune (default: model.path)")
    benchmark.add_argument("--mode", choices=("performance", "accuracy"), help="one mode (default: every mode the YAML sets)")
    benchmark.add_argument("--json", action="store_true", help="machine-readable output")
    zoo = commands.add_parser("zoo", help="tune every model of a zoo file at once on shared workers")
    zoo.add_argument("zoo", help="a YAML with `jobs:`, a list of {name, config: tuning YAML path or mapping}")
    zoo.add_argument("--address", help="a Ray cluster to use (else the zoo's or the jobs' ray.address, a private Ray)")
    zoo.add_argument("--workers", type=int, help="workers shared by all jobs, the driver included")
    prune = commands.add_parser("prune", help="prune the model a YAML names while training it as its `pruning` "
                                              "section says", epilog=TRUSTED_MODELS)
    prune.add_argument("config", help="an LPOT-style YAML with model.path and pruning.train with its dataloader")
    prune.add_argument("-o", "--output", help="the pruned model's file (default: WORKSPACE/pruned/model.pt2)")
    args = parser.parse_args(argv)
    try:
        if args.command == "prune":
            return run_prune(args.config, args.output)
        if args.command == "tune":
            return run_tune(args.config, args.address, args.workers, args.resume, args.verbose)
        if args.command == "zoo":
            return run_zoo(args.zoo, args.address, args.workers)
        if args.command == "benchmark":
            return run_benchmark(args.config, args.model, args.mode, args.json)
        if args.command == "report":
            from .report import write_report

            print(write_report(args.workspace, args.output))
            return EXIT_OK
        return show_history(args.workspace, args.sort, args.json, args.pareto)
    except LpotRayError as error:
        print(f"lpot-ray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # not the user's input as far as we can tell: say so in one line
        if getattr(args, "verbose", False):
            raise
        hint = " (--verbose shows the traceback)" if hasattr(args, "verbose") else ""
        print(f"lpot-ray: failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
              f"{hint}", file=sys.stderr)
        return EXIT_FAILED


def run_tune(config_path: str, address: Optional[str], workers: Optional[int], resume: bool, verbose: bool) -> int:
    import logging

    from .api import tune
    from .config import load_config
    from .errors import ConfigError

    config = load_config(config_path)
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers: {workers} must be >= 1")
        config = config.model_copy(update={"ray": config.ray.model_copy(update={"workers": workers})})
    model = model_from(config, config_path)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="  %(message)s")
    if not sys.stdout.isatty():
        logging.getLogger("lpot_ray").setLevel(logging.INFO)  # no live table: a plain line per trial instead
    resume_file = config.tuning.workspace.path if resume else None
    started = time.monotonic()
    result = tune(model, config, resume_file=resume_file,
                  address=address, verbose=verbose)
    if result.passed:
        result.save(Path(result.workspace) / "int8_model")
    _print_summary(result, time.monotonic() - started)
    return EXIT_OK if result.passed else EXIT_NO_PASS


def run_zoo(zoo_path: str, address: Optional[str], workers: Optional[int]) -> int:
    """Tune every job of a zoo file together; one table; exit 0 only if every job passed."""
    import logging

    from .errors import ConfigError
    from .zoo import ZooJob, failed_result, read_zoo, results_table, tune_many

    if workers is not None and workers < 1:
        raise ConfigError(f"--workers: {workers} must be >= 1")
    entries, settings = read_zoo(zoo_path)
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    jobs, errors = [], {}
    for entry in entries:
        try:
            if entry.error:
                raise ConfigError(entry.error)
            jobs.append(ZooJob(model_from(entry.config, f"{zoo_path}: {entry.name}"), entry.config, entry.name))
        except Exception as error:  # a broken job is reported in the table; the others run
            errors[entry.name] = str(error)
    results = dict(zip([job.name for job in jobs], tune_many(jobs, address or settings.get("address"),
                                                               workers or settings.get("workers")), strict=True)) if jobs else {}
    ordered = [results.get(entry.name) or failed_result(errors[entry.name]) for entry in entries]
    for result in ordered:
        if result.passed:
            result.save(Path(result.workspace) / "int8_model")
    print(results_table([entry.name for entry in entries], ordered))
    return EXIT_OK if all(result.passed for result in ordered) else EXIT_NO_PASS


def run_prune(config_path: str, output: Optional[str]) -> int:
    """Prune ``model.path`` as the YAML says, save it beside the workspace, print each weight's sparsity."""
    from . import registry
    from .data import build_loader
    from .errors import ConfigError
    from .evaluation import split_batch
    from .pruning import Pruning

    pruner = Pruning(config_path)
    config = pruner.config
    train = config.pruning.train
    if config.model.path is None:
        raise ConfigError(f"{config_path}: `model.path` is required to prune from the command line")
    if train is None or train.dataloader is None:
        raise ConfigError(f"{config_path}: `pruning.train` with its `dataloader` is required to prune from the command line")
    adaptor = registry.adaptors.get(config.model.framework)()
    pruner.model = adaptor.load_file(config.model.path)
    pruner.train_dataloader = build_loader(train.dataloader, "pruning.train.dataloader", framework=config.model.framework)
    example, _ = split_batch(next(iter(pruner.train_dataloader)))
    adaptor.prepare(pruner.model, example)  # a model that can't take the training batches is named before training
    result = pruner()
    target = Path(output) if output else Path(config.tuning.workspace.path) / "pruned" / adaptor.model_file
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(adaptor.prepare(result.model, example))
    for name, sparsity in result.sparsity.items():
        print(f"  {name}: {100 * sparsity:.1f}% zeros")
    measured = (f"; accuracy {result.accuracy:.4f} (unpruned {result.baseline_accuracy:.4f}): "
                f"{'meets' if result.passed else 'misses'} the criterion") if result.accuracy is not None else ""
    print(f"pruned to {100 * result.overall_sparsity:.1f}% zeros{measured}; saved {target}")
    return EXIT_NO_PASS if result.passed is False else EXIT_OK


def model_from(config, source: str) -> Any:
    """The model ``model.path`` names, once the sections the data come from are known to be
    there (``tune`` builds the loaders they describe)."""
    from . import registry
    from .errors import ConfigError

    if config.model.path is None:
        raise ConfigError(f"{source}: `model.path` is required to tune from the command line")
    calibration_section = config.quantization.calibration.dataloader
    accuracy = config.evaluation.accuracy
    if calibration_section is None and config.quantization.approach.calibrates:
        raise ConfigError(f"{source}: `quantization.calibration.dataloader` is required to tune from the command line")
    if accuracy.dataloader is None and not config.tuning.exit_policy.performance_only:
        raise ConfigError(f"{source}: `evaluation.accuracy.dataloader` is required to tune from the command line")
    return registry.adaptors.get(config.model.framework)().load_file(config.model.path)


def _print_summary(result, wall_seconds: float) -> None:
    from rich.console import Console

    from .progress import summary_table

    Console().print(summary_table(result, wall_seconds))


def run_benchmark(config_path: str, model: Optional[str], mode: Optional[str], as_json: bool) -> int:
    from .benchmark import Benchmark, results_table
    from .config import load_config
    from .errors import ConfigError

    config = load_config(config_path)
    if model is None and config.model.path is None:
        raise ConfigError(f"{config_path}: `model.path` (or --model) is required to benchmark from the command line")
    if model is not None and not Path(model).exists():
        raise ConfigError(f"--model: {model}: file not found")
    if model is None and not Path(config.model.path).exists():  # said before any framework is imported
        raise ConfigError(f"model.path: {config.model.path}: file not found")
    results = Benchmark(config)(model if model is not None else config.model.path, mode=mode)
    if as_json:
        print(json.dumps({name: result.to_dict() for name, result in results.items()}, indent=2))
        return EXIT_OK
    from rich.console import Console

    Console().print(results_table(results))
    return EXIT_OK


def show_history(workspace: str, sort: str, as_json: bool, pareto_only: bool = False) -> int:
    path = resolve_db_path(workspace)
    if not path.is_file():
        print(f"lpot-ray: {path}: no tuning history there", file=sys.stderr)
        return EXIT_BAD_INPUT
    history = History(path, read_only=True)
    try:
        trials = history.trials()
        result = history.get_meta("result") or {}
        criterion = history.get_meta("criterion") or {}
    finally:
        history.close()
    if pareto_only:
        trials = pareto.front(trials, criterion.get("higher_is_better", True))
    trials = sorted(trials, key=SORT_KEYS[sort])
    if as_json:
        print(json.dumps([_row(trial, result) for trial in trials], indent=2))
        return EXIT_OK
    _print_table(trials, result, str(path))
    return EXIT_OK


def _row(trial: Trial, result: dict) -> dict:
    return {
        "seq": trial.seq, "kind": trial.kind, "key": trial.key, "status": trial.status, "accuracy": trial.accuracy,
        "passed": trial.passed, "objective": trial.objective, "fp32_ops": list(trial.config.fp32_ops),
        "bf16_ops": list(trial.config.bf16_ops),
        "worker": trial.worker, "duration": trial.duration, "reason": trial.reason,
        "chosen": trial.key == result.get("key"), "config": trial.config.to_dict(),
        "rejected": next((rejection(item) for item in result.get("rejected", []) if item["key"] == trial.key), None),
    }


def _print_table(trials: list[Trial], result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("seq", "status", "accuracy", "passed", "objective", "fp32 (bf16) ops", "worker", "seconds"):
        table.add_column(column, justify="right" if column in ("seq", "accuracy", "objective", "seconds") else "left")
    for trial in trials:
        chosen = " (chosen)" if trial.key == result.get("key") else ""
        status = trial.status if trial.kind == "trial" else f"{trial.kind} {trial.status}"
        table.add_row(
            str(trial.seq), status + chosen,
            "-" if trial.accuracy is None else f"{trial.accuracy:.4f}",
            "yes" if trial.passed else "",
            "-" if trial.objective is None else f"{trial.objective:.3f}",
            ", ".join([*trial.config.fp32_ops, *(f"({name})" for name in trial.config.bf16_ops)]) or "-",
            trial.worker, f"{trial.duration:.2f}",
        )
    console = Console()
    console.print(table)
    for item in result.get("rejected", []):  # passed as a trial, then not once compiled
        console.print(rejection(item), markup=False)


if __name__ == "__main__":
    raise SystemExit(main())
