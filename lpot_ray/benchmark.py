"""LPOT's benchmark mode: the latency and throughput, or the accuracy, of one fp32 or int8 model.

``Benchmark(conf)(model, b_dataloader=None, mode=None)`` returns ``{mode: BenchmarkResult}`` for
``performance`` and/or ``accuracy``, as LPOT 1.x does; a result also unpacks as LPOT's
``(accuracy, batch_size, result_list)``. The model is the framework's fp32 model object, a model
file (what ``model.path`` names), a ``TuneResult`` or a folder written by ``TuneResult.save``.

Models run the way the tuner measures them: fp32 exported (``prepare``/``load``) and compiled
with ``lower_fp32``; int8 read back and compiled with ``lower`` (a PyTorch int8 model as saved is
a reference q/dq graph, tens of times slower than its int8 kernels); accuracy on the fp32
baseline model and on the compiled int8 model, with the built-in metric of the YAML.

Performance instances are plain subprocesses, not Ray actors: a benchmark measures the cores of
one machine, and Ray's own processes (raylet, GCS, idle workers) would run on those cores during
the timings; Ray places actors by logical CPU counts and pins nothing, so each actor would pin
itself anyway after its framework had already started its thread pools; and starting Ray costs
seconds and memory a benchmark has no use for. A fresh process per instance (LPOT starts one per
instance under numactl) is pinned to its cores and given its thread count before any framework
is imported. Instances load, compile and warm up, wait at a barrier, then all time together.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np

from . import registry
from .adaptors.base import Adaptor
from .config import Config, PerformanceSection, load_config
from .errors import ConfigError, DataError, ModelError
from .evaluation import Evaluation, split_batch
from .metrics import make_metric
from .result import INFO_FILE, TuneResult
from .result import load as load_result
from .space import TuneConfig

MODES = ("performance", "accuracy")
INSTANCE_TIMEOUT = 900  # seconds an instance may take to load, compile, warm up and time
_READY, _GO = "ready", "go"


@dataclass
class InstanceResult:
    """One instance's timings: ``iterations`` batches after ``warmup`` untimed ones."""

    instance: int
    cores: list[int]  # the cores it was pinned to; empty when not pinned
    threads: int
    warmup: int
    iterations: int
    batch_size: int
    samples: int  # samples in the timed batches
    seconds: float  # wall time of the timed loop
    latencies_ms: list[float] = field(repr=False)

    @property
    def throughput(self) -> float:
        """Samples per second over the timed loop."""
        return self.samples / self.seconds if self.seconds > 0 else float("nan")

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    def summary(self) -> dict:
        return {**{key: value for key, value in asdict(self).items() if key != "latencies_ms"},
                "mean_ms": statistics.fmean(self.latencies_ms), "p50_ms": self.percentile_ms(50),
                "p90_ms": self.percentile_ms(90), "p99_ms": self.percentile_ms(99), "throughput": self.throughput}


@dataclass
class BenchmarkResult:
    """What one mode measured; unpacks as LPOT's ``(accuracy, batch_size, result_list)``, the
    list holding every timed batch's seconds."""

    mode: str
    precision: str  # "fp32" or "int8"
    framework: str
    model: str  # where the model came from, for people
    batch_size: int
    accuracy: Optional[float] = None  # accuracy mode
    metric: str = ""
    samples: int = 0  # accuracy mode: samples evaluated
    seconds: float = 0.0  # accuracy mode: evaluation time
    instances: list[InstanceResult] = field(default_factory=list)  # performance mode
    placement: str = ""  # how the instances were put on cores

    def __iter__(self) -> Iterator[Any]:
        yield self.accuracy
        yield self.batch_size
        yield [ms / 1000 for instance in self.instances for ms in instance.latencies_ms]

    @property
    def throughput(self) -> float:
        """Samples per second of all instances together: the sum of theirs."""
        return sum(instance.throughput for instance in self.instances)

    @property
    def latency_ms(self) -> float:
        """Mean milliseconds per batch over every instance's timed batches."""
        return statistics.fmean(ms for instance in self.instances for ms in instance.latencies_ms)

    def to_dict(self) -> dict:
        data = {key: value for key, value in asdict(self).items() if key != "instances"}
        if self.instances:
            data.update(instances=[instance.summary() for instance in self.instances],
                        latency_ms=self.latency_ms, throughput=self.throughput)
        return data


class Benchmark:
    """LPOT's ``Benchmark(conf)(model, b_dataloader=None)``."""

    def __init__(self, conf: Union[Config, dict, str, os.PathLike]):
        self.config = load_config(conf)

    def __call__(self, model: Any = None, b_dataloader: Any = None, *, mode: Optional[str] = None) -> dict[str, BenchmarkResult]:
        """Benchmark ``model`` (else ``model.path``) in ``mode``, or in every mode the YAML
        configures; ``b_dataloader`` replaces the YAML's dataloaders."""
        modes = self._modes(mode, b_dataloader)
        for name in modes:  # every mode's data named before any model is loaded
            self._check(name, b_dataloader)
        subject = _subject(self.config, model)
        results = {}
        for name in modes:
            run = _performance if name == "performance" else _accuracy
            results[name] = run(self.config, subject, b_dataloader)
        return results

    def _check(self, mode: str, b_dataloader: Any) -> None:
        section = getattr(self.config.evaluation, mode)
        if mode == "accuracy" and section.metric is None:
            raise ConfigError("`evaluation.accuracy.metric` is required for the accuracy mode, e.g. {topk: 1}")
        if b_dataloader is None and (section is None or section.dataloader is None):
            raise ConfigError(f"`evaluation.{mode}.dataloader` is required for the {mode} mode (or pass b_dataloader)")

    def _modes(self, mode: Optional[str], b_dataloader: Any) -> list[str]:
        evaluation = self.config.evaluation
        if mode is not None:
            if mode not in MODES:
                raise ConfigError(f"mode: {mode!r} must be one of {', '.join(MODES)}")
            return [mode]
        modes = []
        if evaluation.accuracy.metric is not None and (evaluation.accuracy.dataloader is not None or b_dataloader is not None):
            modes.append("accuracy")
        if evaluation.performance is not None:
            modes.append("performance")
        if not modes:
            raise ConfigError("evaluation: nothing to benchmark; add `evaluation.performance` (with a dataloader) "
                              "or `evaluation.accuracy` (metric and dataloader), or pass mode")
        return modes


# --- the model -------------------------------------------------------------------------------
@dataclass
class _Subject:
    """The model to benchmark: fp32 (the framework's object) or int8 (serialised bytes)."""

    adaptor_class: type
    precision: str
    description: str
    fp32_model: Any = None
    int8_bytes: bytes = b""
    exported: bytes = b""  # the fp32 model as ``prepare`` exports it (with a dynamic batch), once

    def payload(self, adaptor: Adaptor, example: Any) -> bytes:
        """What ``_runnable`` rebuilds the model from: the int8 bytes, or the exported fp32 model."""
        if self.precision == "int8":
            return self.int8_bytes
        if not self.exported:
            self.exported = adaptor.prepare(self.fp32_model, example)
        return self.exported


def _subject(config: Config, model: Any) -> _Subject:
    framework = config.model.framework
    if model is None:
        if config.model.path is None:
            raise ConfigError("model: pass a model, or name one with `model.path` in the configuration")
        model = config.model.path
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if (path / INFO_FILE).is_file():
            model = load_result(path)
        else:
            adaptor_class = registry.adaptors.get(framework)
            return _Subject(adaptor_class, "fp32", str(path), fp32_model=adaptor_class().load_file(str(path)))
        description = str(path)
    else:
        description = type(model).__name__
    if isinstance(model, TuneResult):
        if not model.passed or not model.model_bytes:
            raise ModelError("model: this TuneResult holds no int8 model (no config met the criterion)")
        if model.framework != framework:
            raise ConfigError(f"model.framework: {framework!r}, but the int8 model {description} is {model.framework!r}")
        return _Subject(registry.adaptors.get(framework), "int8", description, int8_bytes=model.model_bytes)
    return _Subject(registry.adaptors.get(framework), "fp32", description, fp32_model=model)


def _runnable(adaptor: Adaptor, precision: str, payload: bytes, example: Any) -> Any:
    """The model compiled as the tuner measures it: ``lower_fp32`` of the exported fp32 model,
    or ``lower`` of the int8 model (with no ops named: its int8 ops were read when it was tuned)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compilers' own notes, as when the tuner lowers
        if precision == "fp32":
            return adaptor.lower_fp32(adaptor.load(payload), example)
        return adaptor.lower(adaptor.deserialize(payload), (), TuneConfig((), 1), example).model


# --- accuracy --------------------------------------------------------------------------------
def _accuracy(config: Config, subject: _Subject, b_dataloader: Any) -> BenchmarkResult:
    """The metric over the accuracy dataloader, in this process, as the tuner computes it: on
    the fp32 baseline model, or on the compiled int8 model."""
    accuracy = config.evaluation.accuracy
    loader = b_dataloader if b_dataloader is not None else _yaml_loader(accuracy, "evaluation.accuracy.dataloader",
                                                                        config.model.framework)
    make_metric(accuracy.metric)
    inputs = _batches(loader, 1)
    adaptor = subject.adaptor_class()
    if subject.precision == "fp32":
        model = adaptor.baseline_model(subject.fp32_model, adaptor.load(subject.payload(adaptor, inputs[0])))
    else:
        model = _runnable(adaptor, "int8", subject.int8_bytes, inputs[0])
    counted = _Counting(loader)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a compiled model may compile again for a short last batch
        value = Evaluation(dataloader=counted, metric=accuracy.metric).run(adaptor, model)
    seconds = time.perf_counter() - started
    return BenchmarkResult("accuracy", subject.precision, config.model.framework, subject.description,
                           Adaptor.batch_size(inputs[0]), accuracy=value, metric=json.dumps(accuracy.metric),
                           samples=counted.samples, seconds=seconds)


class _Counting:
    """A loader that counts the samples it yields, so the data are read only once."""

    def __init__(self, loader: Any):
        self.loader, self.samples = loader, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.samples += Adaptor.batch_size(split_batch(batch)[0])
            yield batch


def _yaml_loader(section: Any, key: str, framework: str) -> Any:
    from .data import build_loader

    return build_loader(section.dataloader, key, section.postprocess, framework)


def _batches(loader: Any, limit: Optional[int]) -> list:
    """The inputs of the loader's first ``limit`` batches (all when None)."""
    batches = []
    try:
        for batch in loader:
            batches.append(split_batch(batch)[0])
            if limit is not None and len(batches) >= limit:
                break
    except TypeError as error:
        raise DataError(f"dataloader: can't iterate over {type(loader).__name__}: {error}") from None
    if not batches:
        raise DataError("dataloader: yielded no batches")
    return batches


# --- performance -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Which cores each instance runs on (empty lists when the instances are not pinned)."""

    cores: tuple[tuple[int, ...], ...]
    threads: int
    note: str


def plan_placement(instances: int, cores_per_instance: Optional[int], usable: Optional[list[int]] = None) -> Placement:
    """Disjoint cores per instance, distinct physical cores first; unpinned (and said so) when
    the instances need more cores than this process may use."""
    if usable is None:
        usable = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    usable = _cores_by_physical_core(usable)
    per = cores_per_instance or max(1, len(usable) // instances)
    unpinned = tuple(() for _ in range(instances))
    if not hasattr(os, "sched_setaffinity"):
        return Placement(unpinned, per, "not pinned: this platform has no os.sched_setaffinity")
    if instances * per > len(usable):
        return Placement(unpinned, per, f"not pinned: {instances} instance(s) x {per} core(s) need {instances * per} "
                                        f"cores, this process may use {len(usable)}; the instances share them")
    cores = tuple(tuple(sorted(usable[index * per:(index + 1) * per])) for index in range(instances))
    where = "; ".join(f"instance {index} on cores {','.join(map(str, group))}" for index, group in enumerate(cores))
    return Placement(cores, per, f"pinned: {where}")


def _cores_by_physical_core(cpus: list[int]) -> list[int]:
    """The first hardware thread of each physical core, then their siblings, so that instances
    get whole cores before they share one (Linux sysfs; the given order elsewhere)."""
    def core_of(cpu: int) -> tuple[str, str]:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            return (topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()
        except OSError:
            return "", str(cpu)

    seen: dict[tuple[str, str], int] = {}
    ranked = []
    for cpu in cpus:
        core = core_of(cpu)
        ranked.append((seen.get(core, 0), cpu))
        seen[core] = seen.get(core, 0) + 1
    return [cpu for _, cpu in sorted(ranked)]


def _performance(config: Config, subject: _Subject, b_dataloader: Any) -> BenchmarkResult:
    section = config.evaluation.performance or PerformanceSection()
    loader = b_dataloader if b_dataloader is not None else _yaml_loader(section, "evaluation.performance.dataloader",
                                                                        config.model.framework)
    wanted = None if section.iteration == -1 else section.warmup + section.iteration
    batches = _full_batches(_batches(loader, wanted))
    iterations = len(batches) if section.iteration == -1 else section.iteration
    placement = plan_placement(section.configs.num_of_instance, section.configs.cores_per_instance)
    payload = subject.payload(subject.adaptor_class(), batches[0])
    spec = {"adaptor": subject.adaptor_class, "precision": subject.precision, "payload": payload,
            "batches": batches, "warmup": section.warmup, "iterations": iterations, "threads": placement.threads}
    instances = _run_instances(spec, placement)
    return BenchmarkResult("performance", subject.precision, config.model.framework, subject.description,
                           Adaptor.batch_size(batches[0]), instances=instances, placement=placement.note)


def _full_batches(batches: list) -> list:
    """Batches of the first batch's size: a short last batch is left out, as LPOT's default
    ``last_batch: rollover`` does, so that every timed batch runs the same compiled shape."""
    size = Adaptor.batch_size(batches[0])
    return [inputs for inputs in batches if Adaptor.batch_size(inputs) == size]


def _run_instances(spec: dict, placement: Placement) -> list[InstanceResult]:
    """Start one process per instance, let them all warm up, then time them together."""
    with tempfile.TemporaryDirectory(prefix="lpot-ray-benchmark-") as folder, contextlib.ExitStack() as logs:
        spec_path = Path(folder) / "spec.pkl"
        spec_path.write_bytes(pickle.dumps(spec))
        processes = [_start_instance(spec_path, index, cores, placement.threads,
                                     logs.enter_context(open(Path(folder) / f"instance-{index}.log", "w")))
                     for index, cores in enumerate(placement.cores)]
        watchdog = threading.Timer(INSTANCE_TIMEOUT, lambda: [process.kill() for process in processes])
        watchdog.start()
        try:
            for index, process in enumerate(processes):
                _expect(process, index, folder, lambda line: line == _READY)
            for process in processes:  # the barrier: every instance is compiled and warm
                process.stdin.write(_GO + "\n")
                process.stdin.flush()
            rows = [_expect(process, index, folder, lambda line: line.startswith("{")) for index, process in enumerate(processes)]
        finally:
            watchdog.cancel()
            for process in processes:
                if process.poll() is None:
                    process.kill()
                process.wait()
                process.stdin.close()
                process.stdout.close()
    return [InstanceResult(**json.loads(row)) for row in rows]


def _start_instance(spec_path: Path, index: int, cores: tuple[int, ...], threads: int, log: Any) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", "import sys; from lpot_ray.benchmark import instance_main; sys.exit(instance_main(sys.argv[1:]))",
               str(spec_path), str(index), ",".join(map(str, cores))]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)


def _expect(process: subprocess.Popen, index: int, folder: str, wanted: Any) -> str:
    line = process.stdout.readline().strip()
    if wanted(line):
        return line
    process.wait()
    log = (Path(folder) / f"instance-{index}.log").read_text().strip().splitlines()
    reason = next((text for text in reversed(log) if text.strip()), f"exit code {process.returncode}")
    raise RuntimeError(f"benchmark instance {index} failed: {reason.strip()}")


def instance_main(argv: list[str]) -> int:
    """One instance, in its own process: pin, load, compile, warm up, wait, time, report."""
    spec_path, index, cores = argv[0], int(argv[1]), [int(core) for core in argv[2].split(",") if core]
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the frameworks print goes to the log, not into the protocol
    if cores:
        os.sched_setaffinity(0, cores)  # before any framework starts its threads
    spec = pickle.loads(Path(spec_path).read_bytes())
    adaptor = spec["adaptor"]()
    adaptor.set_threads(spec["threads"])
    batches = spec["batches"]
    model = _runnable(adaptor, spec["precision"], spec["payload"], batches[0])
    for step in range(spec["warmup"]):
        adaptor.predict(model, batches[step % len(batches)])
    protocol.write(_READY + "\n")
    if sys.stdin.readline().strip() != _GO:
        return 1
    timed = [batches[(spec["warmup"] + step) % len(batches)] for step in range(spec["iterations"])]
    latencies = []
    started = time.perf_counter()
    for inputs in timed:
        before = time.perf_counter()
        adaptor.predict(model, inputs)
        latencies.append((time.perf_counter() - before) * 1000)
    seconds = time.perf_counter() - started
    result = InstanceResult(index, cores, spec["threads"], spec["warmup"], len(timed), Adaptor.batch_size(batches[0]),
                            sum(Adaptor.batch_size(inputs) for inputs in timed), seconds, latencies)
    protocol.write(json.dumps(asdict(result)) + "\n")
    return 0


# --- showing results -------------------------------------------------------------------------
def results_table(results: dict[str, BenchmarkResult]) -> Any:
    """A rich table per mode: the instances and their total, or the accuracy."""
    from rich.console import Group
    from rich.table import Table

    tables = []
    for result in results.values():
        title = f"lpot-ray benchmark: {result.mode}, {result.precision} {result.framework} model ({result.model})"
        if result.mode == "accuracy":
            table = Table(title=title, show_header=False)
            table.add_row("accuracy", f"{result.accuracy:.4f} ({result.metric})")
            table.add_row("samples", f"{result.samples} in batches of {result.batch_size}, {result.seconds:.2f} s")
            tables.append(table)
            continue
        table = Table(title=title, caption=result.placement)
        for column in ("instance", "cores", "threads", "warmup", "batches", "batch", "mean ms", "p50 ms", "p90 ms",
                       "p99 ms", "samples/s"):
            table.add_column(column, justify="left" if column == "cores" else "right")
        for instance in result.instances:
            row = instance.summary()
            table.add_row(str(instance.instance), ",".join(map(str, instance.cores)) or "any", str(instance.threads),
                          str(instance.warmup), str(instance.iterations), str(instance.batch_size),
                          *(f"{row[key]:.3f}" for key in ("mean_ms", "p50_ms", "p90_ms", "p99_ms")), f"{instance.throughput:.1f}")
        table.add_row("total", "", "", "", str(sum(instance.iterations for instance in result.instances)),
                      str(result.batch_size), f"{result.latency_ms:.3f}", "", "", "", f"{result.throughput:.1f}",
                      style="bold")
        tables.append(table)
    return Group(*tables)
