"""tune_many: several models tuned at once on shared Ray workers, fairly, each with its own history."""

import os
import time

import pytest

import lpot_ray
from lpot_ray import warm, zoo
from lpot_ray.history import History

from conftest import accuracy_of, base_conf


def test_jobs_share_the_workers_fairly_and_a_broken_job_does_not_stop_the_others(
        ray_session, digits, outlier_digits, tmp_path, monkeypatch):
    model, calibration, evaluation = digits
    outliers = outlier_digits[0]
    pools = []

    class RecordedPool(warm.WorkerPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(warm, "WorkerPool", RecordedPool)  # the pool a tuning gets when no workers block is open

    def slow_eval(candidate):  # long enough for both jobs to have trials left once the Ray workers have loaded
        time.sleep(0.6)
        return accuracy_of(candidate, evaluation)

    def conf(name, max_trials=12, **tuning):
        job_conf = base_conf(tmp_path / name, exit_policy={"timeout": 600, "max_trials": max_trials}, **tuning)
        del job_conf["evaluation"]
        job_conf["ray"]["workers"] = 3
        return job_conf

    broken = conf("broken")
    broken["model"]["framework"] = "caffe"
    jobs = [
        lpot_ray.ZooJob(outliers, conf("strict", 40, accuracy_criterion={"absolute": 0.02}), name="strict",
                        q_dataloader=calibration, eval_func=slow_eval),
        dict(model=model, conf=broken, name="broken", q_dataloader=calibration, eval_func=slow_eval),
        lpot_ray.ZooJob(model, conf("loose", strategy={"name": "exhaustive"}), name="loose",  # searches all 12 trials
                        q_dataloader=calibration, eval_func=slow_eval),
    ]
    strict, failed, loose = lpot_ray.tune_many(jobs)

    assert strict.passed and set(strict.fp32_ops) == {"conv2", "fc1"}
    assert loose.passed and not failed.passed
    assert "unknown framework 'caffe'" in failed.error and failed.wall_time >= 0
    for name, result in (("strict", strict), ("loose", loose)):  # each job keeps its own history
        trials = History(tmp_path / name / "ws" / "history.db").trials()
        assert len(trials) == result.n_trials > 0

    (pool,) = pools
    both_running = [snapshot for snapshot in pool.snapshots if sum(running > 0 for running, _ in snapshot.values()) == 2]
    assert both_running, "the two jobs never ran trials at the same time"
    for snapshot in pool.snapshots:  # jobs that both have trials waiting: running counts within one
        waiting = [running for running, queued in snapshot.values() if queued]
        assert len(waiting) < 2 or max(waiting) - min(waiting) <= 1, snapshot
    workers = {trial.worker for name in ("strict", "loose") for trial in History(tmp_path / name / "ws" / "history.db").trials()}
    assert {"worker-1", "worker-2"} & workers

    table = zoo.results_table(["strict", "broken", "loose"], [strict, failed, loose])
    assert "error: `model.framework`: unknown framework 'caffe'" in table and table.count("passed") == 2


def test_two_jobs_with_the_same_workspace_are_refused_by_name(digits, tmp_path):
    model, calibration, evaluation = digits
    conf = base_conf(tmp_path)
    conf["ray"]["workers"] = 1
    first, second = lpot_ray.tune_many([
        dict(model=model, conf=conf, name="a", q_dataloader=calibration, eval_dataloader=evaluation),
        dict(model=model, conf=conf, name="b", q_dataloader=calibration, eval_dataloader=evaluation),
    ])
    assert first.passed and not second.passed
    assert f"{os.path.realpath(tmp_path / 'ws')} is also the workspace of job 'a'" in second.error


def test_zoo_command_tunes_models_of_two_frameworks_and_reports_a_broken_entry(trained_digits, tmp_path):
    import subprocess
    import sys

    import yaml

    from test_cli import save_pt2

    pt2 = save_pt2(trained_digits[0], tmp_path / "digits.pt2")
    data = {"batch_size": 32, "dataset": {"digits": {"split": "calibration"}}}
    evaluation = {"batch_size": 64, "dataset": {"digits": {"split": "evaluation"}}}

    def job(framework, path, transform=None):
        calibration, accuracy = dict(data), dict(evaluation)
        if transform:
            calibration["transform"] = accuracy["transform"] = transform
        return {"model": {"name": framework, "framework": framework, "path": str(path)},
                "quantization": {"calibration": {"sampling_size": 100, "dataloader": calibration}},
                "evaluation": {"accuracy": {"metric": {"topk": 1}, "dataloader": accuracy}}}

    (tmp_path / "pt.yaml").write_text(yaml.safe_dump(job("pytorch", pt2)))
    jobs = [{"name": "digits_pt", "config": "pt.yaml"}, {"name": "missing", "config": "nowhere.yaml"}]
    try:
        from lpot_ray.demo.keras_digits import train_digits_keras

        keras_model = train_digits_keras(epochs=3)[0]
        keras_model.save(tmp_path / "digits.keras")
        jobs.append({"name": "digits_tf", "config": job("tensorflow", tmp_path / "digits.keras",
                                                         {"Transpose": {"perm": [1, 2, 0]}})})
    except ImportError:
        pass  # without TensorFlow the zoo has one framework
    zoo_file = tmp_path / "zoo.yaml"
    zoo_file.write_text(yaml.safe_dump({"workspace": str(tmp_path / "zoo_ws"), "workers": 2, "jobs": jobs}))

    done = subprocess.run([sys.executable, "-m", "lpot_ray", "zoo", str(zoo_file)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 1, done.stderr[-2000:]  # one entry is broken
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[1:] if line.strip()}
    assert lines["digits_pt"].rstrip().endswith("passed")
    assert "error:" in lines["missing"] and "nowhere.yaml" in lines["missing"]
    assert (tmp_path / "zoo_ws" / "digits_pt" / "int8_model" / "model.pt2").is_file()
    if len(jobs) == 3:
        assert lines["digits_tf"].rstrip().endswith("passed")
        assert (tmp_path / "zoo_ws" / "digits_tf" / "int8_model" / "model.tflite").is_file()


def test_a_shared_worker_no_node_can_take_is_dropped_and_the_jobs_go_on(ray_session, digits, tmp_path, caplog):
    import logging

    model, calibration, evaluation = digits

    def slow_eval(candidate):  # the job outlasts the 2 s start-up time-out
        time.sleep(1)
        return accuracy_of(candidate, evaluation)

    conf = base_conf(tmp_path, exit_policy={"timeout": 600, "max_trials": 3}, strategy={"name": "exhaustive"})
    del conf["evaluation"]
    conf["ray"].update(resources_per_worker={"nothing_has_this": 1}, worker_start_timeout=2)
    with caplog.at_level(logging.WARNING, logger="lpot_ray"):
        (result,) = lpot_ray.tune_many([dict(model=model, conf=conf, name="a", q_dataloader=calibration, eval_func=slow_eval)])
    assert result.passed and result.n_trials == 3
    assert "worker-1 did not start within 2 s: no node has its resources free; dropped" in caplog.text


def test_tune_and_tune_many_run_a_job_through_the_same_pool(digits, tmp_path, monkeypatch):
    from lpot_ray import pool

    model, calibration, evaluation = digits
    spied = ("__init__", "submit", "results", "finalize", "job_done", "shutdown")
    calls: list[list[str]] = []
    for name in spied:
        def spy(self, *args, _name=name, _original=getattr(pool.WorkerPool, name), **kwargs):
            calls[-1].append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(pool.WorkerPool, name, spy)

    def conf(workspace):
        job_conf = base_conf(tmp_path / workspace, strategy={"name": "exhaustive"}, exit_policy={"timeout": 600, "max_trials": 3})
        job_conf["ray"]["workers"] = 1
        return job_conf

    calls.append([])
    alone = lpot_ray.tune(model, conf("alone"), q_dataloader=calibration, eval_dataloader=evaluation)
    calls.append([])
    (together,) = lpot_ray.tune_many([dict(model=model, conf=conf("together"), name="digits", q_dataloader=calibration,
                                           eval_dataloader=evaluation)])
    for recorded in calls:  # the same pool, asked the same things
        assert set(recorded) == set(spied), recorded
    assert calls[0].count("submit") == calls[1].count("submit") == 3
    assert calls[0].count("finalize") == calls[1].count("finalize") == 1
    assert alone.passed and together.passed and alone.config == together.config and alone.n_trials == together.n_trials


def test_tunings_inside_a_workers_block_reuse_its_ray_workers_which_go_at_its_end(ray_session, digits, tmp_path):
    model, calibration, evaluation = digits

    def conf(name):
        job_conf = base_conf(tmp_path / name, strategy={"name": "exhaustive"}, exit_policy={"timeout": 600, "max_trials": 4})
        del job_conf["ray"]  # the block decides the workers
        return job_conf

    with lpot_ray.workers(2) as pool:
        first = lpot_ray.tune(model, conf("first"), q_dataloader=calibration, eval_dataloader=evaluation)
        deadline = time.monotonic() + 120
        while len(pool.slots) < 2 and time.monotonic() < deadline:  # the Ray worker joins in the background
            time.sleep(0.2)
        (ray_worker,) = [slot for slot in pool.slots if not slot.is_driver]
        second = lpot_ray.tune(model, conf("second"), q_dataloader=calibration, eval_dataloader=evaluation)
        assert [slot for slot in pool.slots if not slot.is_driver] == [ray_worker]  # the same actor, not a new one
        workers = {trial.worker for trial in History(tmp_path / "second" / "ws" / "history.db").trials()}
        assert workers == {"driver", "worker-1"}
        assert pool.jobs == {} and pool.job_refs == {}  # finished jobs leave nothing behind on the workers' side
    assert first.passed and second.passed and first.config == second.config
    assert pool.slots == []
    # The block's Ray worker went with it: ray.kill is asynchronous, so a call made at once may
    # still be answered; within a minute one fails.
    deadline = time.monotonic() + 60
    with pytest.raises(ray_session.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray_session.get(ray_worker.actor.placed.remote(), timeout=60)
            time.sleep(0.5)


def test_a_config_alone_is_evaluated_in_parts_on_idle_workers_with_the_whole_evaluations_value(
        ray_session, digits, tmp_path, monkeypatch):
    from lpot_ray import session
    from lpot_ray.adaptors.pytorch import PyTorchAdaptor
    from lpot_ray.evaluation import Evaluation

    model, calibration, evaluation = digits
    monkeypatch.setattr(session, "SPLIT_WORTH_SECONDS", 0.0)  # the digits evaluation is split however short
    # The parts of one evaluation merge to exactly the whole's value.
    adaptor, fp32 = PyTorchAdaptor(), model.eval()
    whole = Evaluation(dataloader=evaluation, metric={"topk": 1})
    parts = [whole.run_shard(adaptor, fp32, (index, 3)) for index in range(3)]
    for part in parts[1:]:
        parts[0].merge(part)
    assert parts[0].result() == whole.run(adaptor, fp32)

    def conf(name, **ray):
        job_conf = base_conf(tmp_path / name, exit_policy={"timeout": 600, "max_trials": 1})
        job_conf["quantization"] = {"model_wise": {"activation": {"algorithm": "minmax"}}}  # one config to try
        job_conf["ray"] = ray
        return job_conf

    alone = lpot_ray.tune(model, conf("alone", workers=1), q_dataloader=calibration, eval_dataloader=evaluation)
    with lpot_ray.workers(2) as pool:
        deadline = time.monotonic() + 120
        while len(pool.slots) < 2 and time.monotonic() < deadline:  # both workers idle before the config comes
            time.sleep(0.2)
        split = lpot_ray.tune(model, conf("split"), q_dataloader=calibration, eval_dataloader=evaluation)
    (trial,) = History(tmp_path / "split" / "ws" / "history.db").trials()
    assert trial.figures["shards"] == 2 and set(trial.worker.split("+")) == {"driver", "worker-1"}
    (reference,) = History(tmp_path / "alone" / "ws" / "history.db").trials()
    assert trial.config == reference.config and trial.accuracy == reference.accuracy and "shards" not in reference.figures
    assert split.passed and split.config == alone.config
