"""Ray workers: cooperative cancellation and surviving a worker that dies mid-trial."""

import contextlib
import threading
import time

import pytest

from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.config import Approach, load_config
from lpot_ray.evaluation import Evaluation
from lpot_ray import pool as pool_module
from lpot_ray.pool import Waiting, WorkerPool
from lpot_ray.ray_session import RayPlan
from lpot_ray.space import TuningSpace
from lpot_ray.trial import EvaluateRequest
from lpot_ray.worker import TrialRunner, WorkerJob

from conftest import base_conf

JOB = "job"


class SlowLoader:
    """An evaluation loader that takes ``delay`` seconds per batch."""

    def __init__(self, loader, delay):
        self.loader = loader
        self.delay = delay

    def __iter__(self):
        for batch in self.loader:
            time.sleep(self.delay)
            yield batch


@pytest.fixture
def job_and_space(digits):
    model, calibration, evaluation = digits
    adaptor = PyTorchAdaptor()
    batches = [images for images, _ in calibration]
    payload = adaptor.prepare(model, batches[0])
    space = TuningSpace.build(adaptor.capabilities(adaptor.load(payload)),
                              load_config({"model": {"framework": "pytorch"}}).quantization)
    evaluation = Evaluation(dataloader=SlowLoader(evaluation, 0.5), metric={"topk": 1})
    return WorkerJob(PyTorchAdaptor, Approach.STATIC, payload, batches, evaluation, space.ops), space


def ray_only_pool(job):
    """A pool for one job whose driver runs nothing: only the Ray workers added to it."""
    pool = WorkerPool(plan=None, use_driver=False)
    pool.add_job(JOB, TrialRunner(job, "driver"))
    return pool


def wait_for_workers(pool, count, limit=120):
    deadline = time.monotonic() + limit
    while pool.share(JOB) < count and time.monotonic() < deadline:
        pool.results(JOB, timeout=1)
    assert pool.share(JOB) == count


def wait_for(pool, count, limit=120):
    outcomes, deadline = [], time.monotonic() + limit
    while len(outcomes) < count and time.monotonic() < deadline:
        outcomes += pool.results(JOB, timeout=1)
    return outcomes


@contextlib.contextmanager
def ray_workers(job, count):
    """A pool of ``count`` ready Ray workers and no driver slot."""
    pool = ray_only_pool(job)
    pool.add_ray_workers(count, cpus_per_worker=1)
    try:
        wait_for_workers(pool, count)
        yield pool
    finally:
        pool.shutdown()


def test_a_cancelled_trial_stops_between_batches_and_frees_its_worker(ray_session, job_and_space):
    job, space = job_and_space
    with ray_workers(job, 1) as pool:
        pool.submit(JOB, 0, EvaluateRequest(space.model_wise_configs()[0]))
        time.sleep(1.5)  # the trial is in its evaluation by now
        started = time.monotonic()
        pool.cancel(JOB, 0)
        assert pool.results(JOB, timeout=30) == []  # the cancelled trial reports nothing
        assert time.monotonic() - started < 3  # 5 batches x 0.5 s would take longer than this
        assert pool.share(JOB) == 1


def test_a_worker_killed_mid_trial_costs_only_a_rerun(ray_session, job_and_space):
    job, space = job_and_space
    with ray_workers(job, 2) as pool:
        configs = space.model_wise_configs()
        pool.submit(JOB, 0, EvaluateRequest(configs[0]))
        pool.submit(JOB, 1, EvaluateRequest(configs[1]))
        time.sleep(1.5)
        ray_session.kill(pool.slots[0].actor, no_restart=True)
        outcomes = wait_for(pool, 2)
        assert sorted(outcome.seq for outcome in outcomes) == [0, 1]
        assert all(outcome.status == "ok" for outcome in outcomes)


def test_a_trial_past_its_time_limit_is_reported_failed_and_stops_at_its_next_batch(ray_session, job_and_space):
    job, space = job_and_space
    with ray_workers(job, 1) as pool:
        pool.set_trial_timeout(JOB, 1.0)
        pool.submit(JOB, 0, EvaluateRequest(space.model_wise_configs()[0]))
        (outcome,) = wait_for(pool, 1, limit=30)
        assert outcome.status == "failed" and outcome.reason == "timed out after 1 s (tuning.exit_policy.trial_timeout)"
        assert 1.0 <= outcome.duration < 2.5  # 5 batches x 0.5 s would take longer
        deadline = time.monotonic() + 10
        while pool.share(JOB) < 1 and time.monotonic() < deadline:  # the worker frees itself at its next batch
            pool.results(JOB, timeout=0.2)
        assert pool.share(JOB) == 1 and pool.slots[0].name == "worker-1"


def test_a_worker_whose_timed_out_trial_does_not_stop_is_replaced(ray_session, job_and_space, monkeypatch):
    monkeypatch.setattr(pool_module, "TIMEOUT_GRACE", 1.0)
    job, space = job_and_space
    job.evaluation.dataloader.delay = 3600  # each batch blocks for an hour: no batch boundary to stop at
    with ray_workers(job, 1) as pool:
        stuck = pool.slots[0]
        pool.set_trial_timeout(JOB, 1.0)
        pool.submit(JOB, 0, EvaluateRequest(space.model_wise_configs()[0]))
        (outcome,) = wait_for(pool, 1, limit=30)
        assert outcome.reason == "timed out after 1 s (tuning.exit_policy.trial_timeout)"
        wait_for_workers(pool, 1)  # a new worker took the stuck one's place
        assert pool.slots[0] is not stuck and pool.slots[0].name == stuck.name


def test_a_retry_with_no_ray_worker_left_is_reported_failed_not_left_hanging(job_and_space):
    job, space = job_and_space
    with ray_only_pool(job) as pool:
        with pool.lock:  # a trial whose worker died, waiting for a retry
            pool.states[JOB].waiting.append(Waiting(5, EvaluateRequest(space.model_wise_configs()[0]), attempt=1))
        assert pool.status(JOB).pending
        (outcome,) = wait_for(pool, 1, limit=5)
        assert outcome.seq == 5 and outcome.status.is_failure and "no Ray worker is left" in outcome.reason
        assert outcome.status == "worker_lost"  # run again on resume, unlike a config that failed
        assert not pool.status(JOB).pending


def test_a_worker_no_node_can_take_is_dropped_after_the_start_timeout(ray_session, job_and_space, caplog):
    job, _ = job_and_space
    with ray_only_pool(job) as pool:
        pool.start_timeout = 2
        pool.add_ray_workers(1, cpus_per_worker=1, resources={"accelerator_x": 1})  # no node has one
        deadline = time.monotonic() + 30
        while pool.starting and time.monotonic() < deadline:
            pool.results(JOB, timeout=0.5)
        assert not pool.starting and not pool.slots
        assert "worker-1 did not start within 2 s: no node has its resources free; dropped" in caplog.text


def test_a_node_without_the_framework_is_named_and_the_tuning_goes_on(ray_session, digits, tmp_path, caplog, monkeypatch):
    import logging
    import os
    import socket
    import time

    import lpot_ray
    from lpot_ray import registry
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor
    from lpot_ray.errors import MissingFrameworkError

    driver = os.getpid()

    class DriverOnlyTorch(PyTorchAdaptor):  # as if the worker's node had no torch installed
        def __init__(self):
            if os.getpid() != driver:
                raise MissingFrameworkError("pytorch", "torch")
            super().__init__()

    monkeypatch.setitem(registry.adaptors._entries, "driver_only_torch", DriverOnlyTorch)  # for this test only
    model, calibration, evaluation = digits

    def slow_eval(candidate):
        time.sleep(0.5)
        return 1.0

    conf = base_conf(tmp_path, exit_policy={"timeout": 600, "max_trials": 6}, strategy={"name": "exhaustive"})
    conf["model"]["framework"] = "driver_only_torch"
    del conf["evaluation"]
    with caplog.at_level(logging.WARNING, logger="lpot_ray"):
        result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=slow_eval)
    assert result.passed and result.n_trials == 6
    assert (f"worker-1 could not start: node {socket.gethostname()}: framework 'pytorch' is not installed: "
            "pip install 'lpot_ray[torch]'") in caplog.text


class UpAtOnce:
    """A connection to the Ray this test process runs; records its release."""

    address = "127.0.0.1:1"
    error = None

    def __init__(self):
        self.ready = threading.Event()  # set by the test once its job is in the pool
        self.released = threading.Event()

    def cluster_resources(self):
        return {"CPU": 2.0}

    def release(self):
        self.released.set()


def test_ray_is_released_only_once_the_pools_thread_no_longer_uses_it(ray_session, job_and_space, monkeypatch):
    """A tuning may end while the pool's thread still copies the jobs into Ray (seconds for a
    large model): Ray used after its release ends the process, so the release waits for it."""
    job, _ = job_and_space
    session, copying, go_on = UpAtOnce(), threading.Event(), threading.Event()
    monkeypatch.setattr(RayPlan, "connect", lambda self: session)
    monkeypatch.setattr(pool_module, "SHUTDOWN_WAIT", 0.2)
    monkeypatch.setattr(pool_module, "ship_user_code_by_value", lambda job: (copying.set(), go_on.wait(30)))
    pool = WorkerPool(plan=RayPlan(address=session.address, workers=2))
    pool.add_job(JOB, TrialRunner(job, "driver"))
    session.ready.set()
    assert copying.wait(30)
    pool.shutdown()
    assert not session.released.is_set()  # the pool's thread is still at work in Ray
    go_on.set()
    assert session.released.wait(30)
    assert pool.starting == [] and pool.slots == []  # no worker was started after the end
