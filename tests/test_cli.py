"""The lpot-ray command line, run as a user would: a subprocess."""

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from lpot_ray.config import ExitPolicy
from lpot_ray.engine import Criterion, Engine
from lpot_ray.history import History
from lpot_ray.strategies.basic import BasicStrategy

from fakes import FakeExecutor, make_space, sensitive_ops_accuracy


def lpot_ray(*args):
    command = [shutil.which("lpot-ray")] if shutil.which("lpot-ray") else [sys.executable, "-m", "lpot_ray"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=120)


@pytest.fixture
def workspace(tmp_path):
    space = make_space()
    history = History.start(tmp_path / "ws", None, {"model": "m"})
    outcome = Engine(BasicStrategy(space), FakeExecutor(sensitive_ops_accuracy({"op1": 0.05}), 2), history,
                     Criterion(0.9, absolute=0.01), ExitPolicy(timeout=60), space.fp32_macs_fraction).run()
    history.set_meta("result", {"key": outcome.passing[0].key})
    history.close()
    return tmp_path / "ws", outcome


def test_history_as_json_sorted_with_the_chosen_trial_marked(workspace):
    path, outcome = workspace
    done = lpot_ray("history", str(path), "--json", "--sort", "accuracy")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == len([trial for trial in outcome.trials if trial.status != "cancelled"])
    accuracies = [row["accuracy"] for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    (chosen,) = [row for row in rows if row["chosen"]]
    assert chosen["fp32_ops"] == ["op1"] and chosen["passed"]


def test_history_as_a_table(workspace):
    path, _ = workspace
    done = lpot_ray("history", str(path / "history.db"))
    assert done.returncode == 0 and "(chosen)" in done.stdout and "op1" in done.stdout


def test_history_of_what_is_not_one_is_bad_input(tmp_path):
    done = lpot_ray("history", str(tmp_path / "missing"))
    assert done.returncode == 2 and "no tuning history there" in done.stderr
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE x (y)")
    done = lpot_ray("history", str(tmp_path / "other.db"))
    assert done.returncode == 2 and "can't open as a tuning history" in done.stderr
