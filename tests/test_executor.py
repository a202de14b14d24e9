"""Ray workers: cooperative cancellation and surviving a worker that dies mid-trial."""

import contextlib
import time

import pytest

from lpot_ray.adaptors.pytorch import PyTorchAdaptor
from lpot_ray.config import load_config
from lpot_ray.evaluation import Evaluation
from lpot_ray.executor import Executor
from lpot_ray.space import TuningSpace
from lpot_ray.worker import WorkerJob

from conftest import base_conf


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
    return WorkerJob(PyTorchAdaptor, payload, batches, evaluation, space.ops), space


def wait_for_workers(executor, count, limit=120):
    deadline = time.monotonic() + limit
    while executor.free_slots() < count and time.monotonic() < deadline:
        executor.wait(timeout=1)
    assert executor.free_slots() == count


def wait_for(executor, count, limit=120):
    rows, deadline = [], time.monotonic() + limit
    while len(rows) < count and time.monotonic() < deadline:
        rows += executor.wait(timeout=1)
    return rows


@contextlib.contextmanager
def ray_workers(job, count):
    """An executor of ``count`` ready Ray workers and no driver slot."""
    executor = Executor(job, in_process=False)
    executor.add_ray_workers(count, cpus_per_worker=1)
    try:
        wait_for_workers(executor, count)
        yield executor
    finally:
        executor.shutdown()


def test_a_cancelled_trial_stops_between_batches_and_frees_its_worker(ray_session, job_and_space):
    job, space = job_and_space
    with ray_workers(job, 1) as executor:
        executor.submit(0, space.model_wise_configs()[0])
        time.sleep(1.5)  # the trial is in its evaluation by now
        started = time.monotonic()
        executor.cancel(0)
        assert executor.wait(timeout=30) == []  # the cancelled trial reports nothing
        assert time.monotonic() - started < 3  # 5 batches x 0.5 s would take longer than this
        assert executor.free_slots() == 1


def test_a_worker_killed_mid_trial_costs_only_a_rerun(ray_session, job_and_space):
    job, space = job_and_space
    with ray_workers(job, 2) as executor:
        configs = space.model_wise_configs()
        executor.submit(0, configs[0])
        executor.submit(1, configs[1])
        time.sleep(1.5)
        ray_session.kill(executor.slots[0].actor, no_restart=True)
        rows = wait_for(executor, 2)
        assert sorted(row["seq"] for row in rows) == [0, 1]
        assert all(row["status"] == "ok" for row in rows)


def test_a_retry_with_no_ray_worker_left_is_reported_failed_not_left_hanging():
    executor = Executor(job=None, in_process=False)
    executor.queue.append((5, None, 1))  # a trial whose worker died, waiting for a retry
    assert executor.busy()
    (row,) = executor.wait(timeout=0.5)
    assert row["seq"] == 5 and row["status"] == "failed" and "no Ray worker is left" in row["reason"]
    assert not executor.busy()


def test_a_worker_no_node_can_take_is_dropped_after_the_start_timeout(ray_session, job_and_space, caplog):
    job, _ = job_and_space
    executor = Executor(job, in_process=False)
    executor.start_timeout = 2
    try:
        executor.add_ray_workers(1, cpus_per_worker=1, resources={"accelerator_x": 1})  # no node has one
        deadline = time.monotonic() + 30
        while executor.starting and time.monotonic() < deadline:
            executor.wait(timeout=0.5)
        assert not executor.starting and not executor.slots
        assert "worker-1 did not start within 2 s: no node has its resources free; dropped" in caplog.text
    finally:
        executor.shutdown()


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
