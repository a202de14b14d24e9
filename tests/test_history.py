"""The SQLite history: durable trials, kept aside never lost, fingerprint checks."""

import os
import sqlite3
import subprocess
import sys

import pytest

from lpot_ray.errors import HistoryError
from lpot_ray.history import History
from lpot_ray.trial import Trial

from fakes import make_space

FINGERPRINT = {"model": "abc", "space": {}, "criterion": {"relative": 0.01}, "strategy": "basic", "seed": 1}


def record_some(history, count=3):
    for seq, config in enumerate(make_space(n_ops=3).model_wise_configs()[:1] * count):
        history.record(Trial(seq, config.with_fallback([f"op{seq}"]), accuracy=0.5 + seq / 10))


def test_an_earlier_history_left_by_a_killed_driver_is_kept_aside_with_its_trials(tmp_path):
    driver = (
        "import os, sys; sys.path.insert(0, sys.argv[2])\n"
        "from lpot_ray.history import History\n"
        "from test_history import FINGERPRINT, record_some\n"
        "record_some(History.start(sys.argv[1], None, FINGERPRINT))\n"
        "os._exit(0)  # killed: no close, no checkpoint\n"
    )
    subprocess.run([sys.executable, "-c", driver, str(tmp_path), os.path.dirname(__file__)], check=True)
    assert (tmp_path / "history.db-wal").stat().st_size > 0

    fresh = History.start(tmp_path, None, FINGERPRINT)
    assert len(fresh) == 0
    (aside,) = [path for path in tmp_path.glob("history-*.db")]
    assert len(History.start(tmp_path, aside, FINGERPRINT)) == 3


def test_resume_reads_the_trials_back_in_proposal_order(tmp_path):
    history = History.start(tmp_path, None, FINGERPRINT)
    record_some(history)
    history.close()
    resumed = History.start(tmp_path, tmp_path, FINGERPRINT)
    assert [trial.seq for trial in resumed.trials()] == [0, 1, 2]
    assert [trial.config.fp32_ops for trial in resumed.trials()] == [("op0",), ("op1",), ("op2",)]


def test_a_different_job_is_refused_naming_what_differs(tmp_path):
    History.start(tmp_path, None, FINGERPRINT).close()
    with pytest.raises(HistoryError, match="differs from the recorded one in criterion, seed"):
        History.start(tmp_path, tmp_path / "history.db", {**FINGERPRINT, "seed": 2, "criterion": {"absolute": 0.1}})


def test_what_is_not_a_history_is_refused(tmp_path):
    with pytest.raises(HistoryError, match="no tuning history to resume there"):
        History.start(tmp_path, tmp_path / "missing.db", FINGERPRINT)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (y)")
    with pytest.raises(HistoryError, match="not an lpot_ray tuning history"):
        History.start(tmp_path, other, FINGERPRINT)
