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

    fresh = History.start(tmp_path, None, FINGERPRINT)  # the killed driver holds the workspace no longer
    assert len(fresh) == 0
    fresh.close()
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


def test_another_programs_database_is_refused_and_left_untouched(tmp_path):
    foreign = tmp_path / "history.db"
    with sqlite3.connect(foreign) as connection:
        connection.execute("CREATE TABLE trials (x INTEGER)")
    for open_it in (lambda: History(foreign, read_only=True), lambda: History.start(tmp_path / "ws", foreign, FINGERPRINT)):
        with pytest.raises(HistoryError, match=r"history.db: not an lpot_ray tuning history \(its tables are trials\)"):
            open_it()
    tables = sqlite3.connect(foreign).execute("SELECT name FROM sqlite_master").fetchall()
    assert tables == [("trials",)]  # nothing written into it


def test_a_damaged_history_is_named_and_a_new_tuning_keeps_it_aside(tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "history.db").write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 20)
    with pytest.raises(HistoryError, match="history.db: can't open as a tuning history: file is not a database"):
        History.start(tmp_path / "elsewhere", workspace, FINGERPRINT)
    History.start(workspace, None, FINGERPRINT).close()  # a fresh tuning in that workspace starts
    assert len(list(workspace.glob("history-*.db"))) == 1


def test_a_garbled_trial_row_is_named(tmp_path):
    history = History.start(tmp_path, None, FINGERPRINT)
    record_some(history, count=2)
    history.connection.execute("UPDATE trials SET config = '{broken' WHERE seq = 1")
    with pytest.raises(HistoryError, match=r"history.db: trial 1 is damaged and can't be read \(JSONDecodeError"):
        history.trials()


def test_a_workspace_that_is_a_file_is_named(tmp_path):
    (tmp_path / "ws").write_text("not a folder")
    with pytest.raises(HistoryError, match="tuning.workspace.path: .*ws is a file; it must be a folder"):
        History.start(tmp_path / "ws", None, FINGERPRINT)


def test_a_report_that_cannot_be_written_names_the_path(tmp_path):
    from lpot_ray.errors import ConfigError
    from lpot_ray.report import write_report

    record_some(History.start(tmp_path, None, FINGERPRINT))
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(ConfigError, match="blocker/report.html: can't write the report there"):
        write_report(str(tmp_path), str(tmp_path / "blocker" / "report.html"))


def test_a_workspace_is_one_tunings_at_a_time_and_says_who_holds_it(tmp_path):
    first = History.start(tmp_path, None, FINGERPRINT)
    for second in (lambda: History.start(tmp_path, None, FINGERPRINT), lambda: History.start(tmp_path, tmp_path, FINGERPRINT)):
        with pytest.raises(HistoryError, match=rf"another tuning is using this workspace \(pid {os.getpid()} on "):
            second()
    assert len(first) == 0  # its history was not kept aside under it
    first.close()
    History.start(tmp_path, tmp_path, FINGERPRINT).close()  # free again



def test_a_workspace_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(HistoryError, match="tuning.workspace.path: can't make the folder .*file/ws"):
        History.start(tmp_path / "file" / "ws", None, FINGERPRINT)
