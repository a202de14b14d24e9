"""What runs a request: the adaptor, the fp32 model and the data, loaded once, then requests.

``TrialRunner`` is plain Python so the same code runs in the driver's own thread and inside a
Ray actor. Per request only a config arrives and only figures leave.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .config import Approach
from .errors import ClusterError
from .evaluation import Evaluation, TrialCancelled, TrialHopeless, split_batch
from .objectives import paired_latency_ms, peak_rss_growth
from .space import Op, TuneConfig
from .timings import Stopwatch
from .trial import EvaluateRequest, Finalized, InspectRequest, Kind, Outcome, Request, Status

TIMING_BATCHES = 4  # evaluation batches latency is measured on, in turn


@dataclass
class WorkerJob:
    """Everything a worker needs for one tuning, sent once through the object store."""

    adaptor: type  # the adaptor class, so a plug-in registered only in the driver works on workers
    approach: Approach
    model_payload: bytes
    calibration: list
    evaluation: Evaluation
    ops: tuple[Op, ...]
    threads: int = 1
    q_func: Optional[Callable[[Any], Any]] = None  # quantization-aware training: trains the prepared model


class TrialRunner:
    """One job's requests on one worker. The driver passes the adaptor and fp32 model it has
    loaded already; a Ray worker builds both from the job."""

    def __init__(self, job: WorkerJob, name: str, adaptor: Any = None, model: Any = None):
        self.name = name
        self.job = job
        self.adaptor = adaptor if adaptor is not None else job.adaptor.for_approach(job.approach)
        self.previous_threads = self.adaptor.set_threads(job.threads)
        self.model = model if model is not None else self.adaptor.load(job.model_payload)
        self.example = job.calibration[0]
        self._fp32_compiled: Any = None  # compiled once, for every finalist's measurements
        self._timing_batches: Optional[list] = None
        self._fp32_outputs: dict[int, Any] = {}  # by evaluation batch, for a metric that compares with them
        self._fp32_reference: Any = None  # what they are computed with
        self._handlers: dict[Kind, Callable[[Any, Outcome, Callable[[], bool]], None]] = {
            Kind.TRIAL: self._evaluate, Kind.INSPECTION: self._inspect}

    def close(self) -> None:
        """Give the process its thread count back (it matters when the runner is the driver)."""
        self.adaptor.set_threads(self.previous_threads)

    def run(self, seq: int, request: Request, should_stop: Callable[[], bool] = lambda: False) -> Outcome:
        """Answer one request; any failure becomes a failed outcome with its reason."""
        outcome = Outcome(seq, Status.OK, worker=self.name, started=time.time())
        try:
            self._handlers[request.kind](request, outcome, should_stop)
        except TrialCancelled:
            outcome.status = Status.CANCELLED
        except TrialHopeless as hopeless:
            outcome.status, outcome.reason = Status.STOPPED_EARLY, str(hopeless)
            outcome.figures["stopped_early"] = hopeless.figures
        except Exception as error:  # a trial's failure must not end the tuning
            outcome.status, outcome.reason = Status.FAILED, _reason(error)
        outcome.duration = time.time() - outcome.started
        return outcome

    def _evaluate(self, request: EvaluateRequest, outcome: Outcome, should_stop: Callable[[], bool]) -> None:
        passes, calibrating = self.adaptor.calibration_passes, self.adaptor.calibration_seconds
        started = time.perf_counter()
        quantized = self._quantize(request.config)
        quantized_at = time.perf_counter()
        calibrate = self.adaptor.calibration_seconds - calibrating
        outcome.figures["calibration_passes"] = self.adaptor.calibration_passes - passes
        try:
            if request.shard is not None:  # a part of the evaluation: the pool merges the parts
                outcome.metric_state = self.job.evaluation.run_shard(self.adaptor, quantized, request.shard, should_stop,
                                                                     self.fp32_outputs)
            else:
                outcome.accuracy = self.job.evaluation.run(self.adaptor, quantized, should_stop, request.give_up,
                                                           self.fp32_outputs)
        finally:  # a trial stopped early has its timings too
            outcome.figures["seconds"] = {"quantize": quantized_at - started - calibrate, "calibrate": calibrate,
                                          "evaluate": time.perf_counter() - quantized_at}

    def fp32_outputs(self, position: int, inputs: Any) -> Any:
        """The fp32 model's outputs for evaluation batch ``position``, computed once per runner
        (LPOT keeps them too): what LPOT's ``compare_label: false`` compares a candidate with."""
        if position not in self._fp32_outputs:
            if self._fp32_reference is None:
                self._fp32_reference = self.adaptor.reference(self.model)
            self._fp32_outputs[position] = self.adaptor.predict(self._fp32_reference, inputs)
        return self._fp32_outputs[position]

    def _inspect(self, request: InspectRequest, outcome: Outcome, should_stop: Callable[[], bool]) -> None:
        outcome.figures["op_errors"] = self.adaptor.inspect_tensors(self.model, request.config, self.job.calibration)

    def finalize(self, config: TuneConfig, measure: bool = True) -> Finalized:
        """Lower the config to real int8 kernels, re-evaluate there, measure it against fp32."""
        clock = Stopwatch()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with clock.time("lower_int8"):
                quantized = self._quantize(config)
                lowered = self.adaptor.lower(quantized, self.job.ops, config, self.example)
            with clock.time("validate"):
                accuracy = (self.job.evaluation.run(self.adaptor, lowered.model, fp32=self.fp32_outputs)
                            if self.job.evaluation.given else None)
            with clock.time("serialize"):
                model_bytes = self.adaptor.serialize(quantized, self.example)
            figures = {"model_size_bytes": len(model_bytes), "fp32_model_size_bytes": len(self.job.model_payload)}
            if measure:
                figures.update(self._measure(lowered.model, len(model_bytes), clock))
        return Finalized(accuracy, lowered.int8_ops, lowered.fp32_ops, figures, quantized, model_bytes, lowered.bf16_ops,
                         timings=clock.seconds)

    def _quantize(self, config: TuneConfig) -> Any:
        if self.job.approach == Approach.QAT:
            return self.adaptor.quantize_aware(self.model, config, self.job.q_func, self.job.calibration)
        return self.adaptor.quantize(self.model, config, self.job.calibration)

    def _timing_inputs(self) -> list:
        """What latency is measured on: the inputs of the first evaluation batches, as the model
        will run (their real sizes and lengths), or the calibration batches where the evaluation
        is an eval_func."""
        if self._timing_batches is None:  # read once: every finalist is timed on the same batches
            loader = self.job.evaluation.dataloader
            batches = [split_batch(batch)[0] for batch in itertools.islice(loader, TIMING_BATCHES)] if loader is not None else []
            self._timing_batches = batches or list(self.job.calibration[:TIMING_BATCHES])
        return self._timing_batches

    def _measure(self, int8_model: Any, int8_bytes: int, clock: Stopwatch) -> dict:
        """Latency per batch and memory footprint, int8 against fp32 compiled the same way."""
        if self._fp32_compiled is None:
            with clock.time("lower_fp32"):
                self._fp32_compiled = self.adaptor.lower_fp32(self.model, self.example)
        fp32_model = self._fp32_compiled
        batches = self._timing_inputs()
        int8_batches, fp32_batches = itertools.cycle(batches), itertools.cycle(batches)  # called in alternation: in step
        run_int8 = lambda: self.adaptor.predict(int8_model, next(int8_batches))  # noqa: E731
        run_fp32 = lambda: self.adaptor.predict(fp32_model, next(fp32_batches))  # noqa: E731
        # Memory first, before hundreds of timed runs have warmed the allocator's free lists.
        with clock.time("footprint"):
            int8_peak, fp32_peak = peak_rss_growth(run_int8), peak_rss_growth(run_fp32)
        with clock.time("latency"):
            int8_ms, fp32_ms = paired_latency_ms(run_int8, run_fp32)
        figures = {"latency_ms": int8_ms, "fp32_latency_ms": fp32_ms, "latency_ratio": fp32_ms / int8_ms}
        if int8_peak is not None and fp32_peak is not None:
            figures.update(footprint_bytes=int8_bytes + int8_peak,
                           fp32_footprint_bytes=len(self.job.model_payload) + fp32_peak)
        return figures


class TrialWorker:
    """The Ray actor: one TrialRunner per job, and cancellation flags checked between batches.

    Creating it is cheap (jobs travel as references inside a list, which Ray does not resolve),
    so that ``placed`` measures only the wait for a node; ``ready`` then loads the first job,
    which may take long (importing the framework) and proves the node can run it; the others
    load on their first request here, so that a worker joins without waiting for every model."""

    def __init__(self, name: str):
        import ray

        self.name = name
        self.runners: dict[str, TrialRunner] = {}
        self.loading = threading.Lock()
        self.cancelled: set[tuple[str, int]] = set()
        self.node = ray.get_runtime_context().get_node_id()  # recorded with each trial: where it ran

    def placed(self) -> str:
        return self.node

    def ready(self, job_id: Optional[str], job_ref: list) -> str:
        """The node, once the first job (if any yet) is loaded here."""
        if job_id is not None:
            self._runner(job_id, job_ref)
        return self.node

    def run(self, job_id: str, job_ref: list, seq: int, request: Request) -> Outcome:
        outcome = self._runner(job_id, job_ref).run(seq, request, lambda: (job_id, seq) in self.cancelled)
        outcome.figures["node"] = self.node
        return outcome

    def _runner(self, job_id: str, job_ref: list) -> TrialRunner:
        with self.loading:  # a request waits for a load already under way instead of loading again
            if job_id not in self.runners:
                import ray

                self.runners[job_id] = load_runner(ray.get(job_ref[0]), self.name)
            return self.runners[job_id]

    def cancel(self, job_id: str, seq: int) -> None:
        self.cancelled.add((job_id, seq))

    def drop(self, job_id: str) -> None:
        """Free a finished job's model and data."""
        runner = self.runners.pop(job_id, None)
        if runner is not None:
            runner.close()


def load_runner(job: WorkerJob, name: str) -> TrialRunner:
    """A worker's runner; a node without the job's framework is named in the error."""
    try:
        return TrialRunner(job, name)
    except ImportError as error:  # MissingFrameworkError included
        import socket

        raise ClusterError(f"node {socket.gethostname()}: {error}") from None


def _reason(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    location = f" (at {os.path.basename(where.filename)}:{where.lineno})" if where else ""
    return f"{type(error).__name__}: {message}{location}"
