"""Nothing hangs: a trial or a baseline blocked in the user's code ends at its time limit."""

import threading
import time

import pytest
import torch

import lpot_ray
from lpot_ray import pool
from lpot_ray.errors import EvaluationError
from lpot_ray.history import History

from conftest import accuracy_of, base_conf


@pytest.fixture
def release():
    """An event that blocked evaluations wait for; set at the end so that their threads end."""
    event = threading.Event()
    yield event
    event.set()


def test_a_trial_blocked_in_the_eval_func_times_out_and_the_tuning_goes_on(digits, tmp_path, release, monkeypatch):
    monkeypatch.setattr(pool, "TIMEOUT_GRACE", 0.5)
    model, calibration, evaluation = digits
    quantized_calls = []

    def eval_func(candidate):
        if isinstance(candidate, torch.fx.GraphModule):  # a quantized candidate
            quantized_calls.append(candidate)
            if len(quantized_calls) == 1:
                release.wait()  # the first one blocks, like a read from a network share that never answers
        return accuracy_of(candidate, evaluation)

    conf = base_conf(tmp_path, exit_policy={"trial_timeout": 3})
    conf["ray"] = {"workers": 1}  # the driver alone: its thread is the one blocked
    del conf["evaluation"]
    started = time.monotonic()
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=eval_func)
    assert result.passed and time.monotonic() - started < 60
    first, second = History(tmp_path / "ws" / "history.db").trials()
    assert first.status == "failed" and first.reason == "timed out after 3 s (tuning.exit_policy.trial_timeout)"
    assert second.status == "ok" and result.config == second.config


def test_a_baseline_blocked_in_the_eval_func_fails_at_its_limit_naming_it(digits, tmp_path, release):
    model, calibration, _ = digits
    conf = base_conf(tmp_path, exit_policy={"trial_timeout": 1})
    del conf["evaluation"]
    started = time.monotonic()
    with pytest.raises(EvaluationError, match=r"fp32 baseline: no result after 1 s \(tuning.exit_policy.trial_timeout\)"):
        lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=lambda candidate: release.wait())
    assert time.monotonic() - started < 30


def test_the_default_trial_limit_follows_the_baseline():
    from lpot_ray.config import Approach, ExitPolicy
    from lpot_ray.session import trial_limit

    assert trial_limit(ExitPolicy(), 2.0, Approach.STATIC) == 10 * 2.0 + 300
    assert trial_limit(ExitPolicy(trial_timeout=7), 2.0, Approach.STATIC) == 7
    assert trial_limit(ExitPolicy(trial_timeout=0), 2.0, Approach.STATIC) is None  # 0: no limit
    assert trial_limit(ExitPolicy(), 2.0, Approach.QAT) is None  # training may take far longer than evaluating


def test_a_tuning_ending_while_a_timed_out_trial_still_blocks_the_driver_returns(digits, tmp_path, release, monkeypatch):
    monkeypatch.setattr(pool, "TIMEOUT_GRACE", 600.0)  # the blocked trial is not given up before the tuning ends
    model, calibration, evaluation = digits

    def eval_func(candidate):
        if isinstance(candidate, torch.fx.GraphModule):
            release.wait()
        return accuracy_of(candidate, evaluation)

    conf = base_conf(tmp_path, exit_policy={"trial_timeout": 2, "max_trials": 1})
    conf["ray"] = {"workers": 1}
    del conf["evaluation"]
    started = time.monotonic()
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=eval_func)
    assert not result.passed and "timed out after 2 s" in result.reason
    assert time.monotonic() - started < 60  # shutdown did not wait for the blocked thread


def test_a_replaced_trial_thread_runs_the_calls_waiting_behind_the_blocked_one(release):
    thread = pool.TrialThread()
    blocked = thread.submit(release.wait)
    waiting = thread.submit(lambda: "ran")
    while not blocked.running():  # the pool gives up only on a call that has started
        time.sleep(0.01)
    thread.replace()
    assert waiting.result(timeout=10) == "ran" and not blocked.done()
    assert thread.submit(lambda: 2).result(timeout=10) == 2


def test_a_calibration_loader_that_blocks_fails_at_the_limit_naming_it(digits, tmp_path, release):
    from lpot_ray.errors import DataError

    model, calibration, evaluation = digits

    def blocking():
        yield next(iter(calibration))
        release.wait()  # the second batch never comes
        yield next(iter(calibration))

    conf = base_conf(tmp_path, exit_policy={"trial_timeout": 1})
    with pytest.raises(DataError, match=r"q_dataloader: no calibration batch after 1 s \(tuning.exit_policy.trial_timeout\)"):
        lpot_ray.tune(model, conf, q_dataloader=blocking(), eval_dataloader=evaluation)
