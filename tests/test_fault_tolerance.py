"""Nothing that finished is lost: a driver killed with SIGKILL mid-run resumes to the same end."""

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import torch

import lpot_ray
from lpot_ray.demo.torch_digits import digits_cnn

from conftest import base_conf

DRIVER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import lpot_ray
    from lpot_ray.demo.torch_digits import digits_cnn, digits_loaders

    weights, conf = sys.argv[1], json.loads(sys.argv[2])
    model = digits_cnn()
    model.load_state_dict(torch.load(weights))
    _, calibration, evaluation = digits_loaders()

    def slow_eval(candidate):
        time.sleep(0.4)
        with torch.no_grad():
            hits = sum(int((candidate(x).argmax(1) == y).sum()) for x, y in evaluation)
        return hits / len(evaluation.dataset)

    lpot_ray.tune(model.eval(), conf, q_dataloader=calibration, eval_func=slow_eval)
    """
)


def accuracy(model, loader):
    with torch.no_grad():
        return sum(int((model(x).argmax(1) == y).sum()) for x, y in loader) / len(loader.dataset)


def recorded(db) -> int:
    try:
        with sqlite3.connect(db) as connection:
            return connection.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_a_driver_killed_mid_run_resumes_without_rerunning_and_ends_the_same(outlier_digits, tmp_path):
    import json

    model, calibration, evaluation = outlier_digits
    weights = tmp_path / "weights.pt"
    torch.save(model.state_dict(), weights)
    conf = base_conf(tmp_path, accuracy_criterion={"absolute": 0.02}, exit_policy={"timeout": 600, "max_trials": 40})
    del conf["evaluation"]
    conf["ray"]["workers"] = 1
    db = tmp_path / "ws" / "history.db"

    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(weights), json.dumps(conf)],
                              env={**os.environ, "RAY_ADDRESS": ""}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while recorded(db) < 4 and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished_before = recorded(db)
    assert finished_before >= 4, driver.stderr.read().decode()[-2000:]

    reloaded = digits_cnn()
    reloaded.load_state_dict(torch.load(weights))
    reloaded.eval()
    resumed = lpot_ray.tune(reloaded, conf, q_dataloader=calibration, resume_file=db,
                            eval_func=lambda candidate: accuracy(candidate, evaluation))
    undisturbed_conf = {**conf, "tuning": {**conf["tuning"], "workspace": {"path": str(tmp_path / "calm")}}}
    undisturbed = lpot_ray.tune(reloaded, undisturbed_conf, q_dataloader=calibration,
                                eval_func=lambda candidate: accuracy(candidate, evaluation))
    assert resumed.config == undisturbed.config
    assert resumed.n_evaluated == undisturbed.n_trials - finished_before  # nothing finished ran twice
    assert resumed.n_trials == undisturbed.n_trials
