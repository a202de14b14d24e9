"""The durable trial store: one SQLite database per tuning workspace.

Every finished trial is one transaction (WAL journal), committed before the strategy hears of it,
so a driver killed at any moment leaves a consistent database. Configs and figures are JSON
columns, never pickles. The ``meta`` table holds the job's fingerprint (model weights, space,
criterion, strategy, seed) so a resume of a different job is refused, and the fp32 baseline so a
resume measures nothing again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import HistoryError
from .space import TuneConfig
from .trial import Status, Trial

DB_NAME = "history.db"
LOCK_NAME = ".lock"
_COLUMNS = ("seq", "config", "status", "accuracy", "passed", "objective", "reason", "worker", "started", "duration",
            "figures", "kind")
log = logging.getLogger("lpot_ray")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    accuracy REAL,
    passed INTEGER NOT NULL,
    objective REAL,
    reason TEXT NOT NULL,
    worker TEXT NOT NULL,
    started REAL NOT NULL,
    duration REAL NOT NULL,
    figures TEXT NOT NULL,
    recorded REAL NOT NULL,
    kind TEXT NOT NULL
);
"""


def resolve_db_path(location: Union[str, os.PathLike]) -> Path:
    """A history database path from itself or from the workspace folder holding it."""
    path = Path(location)
    return path / DB_NAME if path.is_dir() else path


class History:
    def __init__(self, path: Union[str, os.PathLike], read_only: bool = False):
        self.path = Path(path)
        self.lock: Optional[WorkspaceLock] = None  # held by a tuning writing here, until ``close``
        try:
            if read_only:
                self.connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
                self._check_ours()
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.connection = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._check_ours()  # before writing anything into someone else's database
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=NORMAL")
            self.connection.executescript(_SCHEMA)
        except (sqlite3.Error, OSError) as error:
            raise HistoryError(f"{self.path}: can't open as a tuning history: {error}") from None

    def _check_ours(self) -> None:
        """A database that holds tables but not ours (another program's SQLite file) is refused."""
        tables = {name for (name,) in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return
        columns = {row[1] for row in self.connection.execute("PRAGMA table_info(trials)")}
        if "meta" not in tables or not set(_COLUMNS) <= columns:
            raise HistoryError(f"{self.path}: not an lpot_ray tuning history (its tables are {', '.join(sorted(tables))})")

    @classmethod
    def start(cls, workspace: Union[str, os.PathLike], resume: Optional[Union[str, os.PathLike]], fingerprint: dict) -> "History":
        """Open the history to resume, or a fresh one in the workspace (an old one is kept aside).
        The workspace is the tuning's own until ``close``: a second tuning there is refused."""
        path = resolve_db_path(resume) if resume is not None else Path(workspace) / DB_NAME
        if resume is not None and not path.is_file():
            raise HistoryError(f"{path}: no tuning history to resume there")
        lock = WorkspaceLock(path.parent, "the resumed history's folder" if resume is not None else "tuning.workspace.path")
        history = None
        try:
            if resume is None and path.exists():
                _keep_aside(path)
            history = cls(path)
            history.lock = lock
            if resume is not None:
                history.check_fingerprint(fingerprint)
            else:
                history.set_meta("fingerprint", fingerprint)
            return history
        except BaseException:
            if history is not None:
                history.close()
            lock.release()
            raise

    # --- meta --------------------------------------------------------------------------------
    def set_meta(self, key: str, value: Any) -> None:
        with self.connection:
            self.connection.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def get_meta(self, key: str) -> Any:
        with self._reading(f"meta {key!r}"):
            row = self.connection.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else json.loads(row[0])

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """A damaged database or row becomes an error naming the file and what was being read."""
        try:
            yield
        except (sqlite3.Error, ValueError, KeyError, TypeError) as error:
            raise HistoryError(f"{self.path}: {what} is damaged and can't be read ({type(error).__name__}: {error})") from None

    def check_fingerprint(self, fingerprint: dict) -> None:
        stored = self.get_meta("fingerprint")
        if stored is None:
            raise HistoryError(f"{self.path}: not an lpot_ray tuning history (no fingerprint)")
        differing = [part for part in sorted(set(stored) | set(fingerprint)) if stored.get(part) != _jsonable(fingerprint.get(part))]
        if differing:
            raise HistoryError(
                f"{self.path}: can't resume: this job differs from the recorded one in {', '.join(differing)}"
            )

    # --- trials ------------------------------------------------------------------------------
    def record(self, trial: Trial) -> None:
        row = (
            trial.key, trial.seq, json.dumps(trial.config.to_dict(), sort_keys=True), trial.status.value, trial.accuracy,
            int(trial.passed), trial.objective, trial.reason, trial.worker, trial.started, trial.duration,
            json.dumps(trial.figures, sort_keys=True), time.time(), trial.kind.value,
        )
        with self.connection:
            self.connection.execute("INSERT OR REPLACE INTO trials VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)

    def trials(self) -> list[Trial]:
        with self._reading("the trials table"):
            rows = self.connection.execute(f"SELECT {', '.join(_COLUMNS)} FROM trials ORDER BY seq").fetchall()
        trials = []
        for seq, config, status, accuracy, passed, objective, reason, worker, started, duration, figures, kind in rows:
            with self._reading(f"trial {seq}"):
                trials.append(Trial(
                    seq=seq, config=TuneConfig.from_dict(json.loads(config)), status=_status(status, reason),
                    accuracy=accuracy, passed=bool(passed), objective=objective, reason=reason, worker=worker,
                    started=started, duration=duration, figures=json.loads(figures), kind=kind,
                ))
        return trials

    def __len__(self) -> int:
        """Trials of candidate configs (requests such as per-op inspections not counted)."""
        return self.connection.execute("SELECT COUNT(*) FROM trials WHERE kind = 'trial'").fetchone()[0]

    def close(self) -> None:
        self.connection.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None




class WorkspaceLock:
    """One tuning per workspace at a time: an exclusive ``flock`` on ``<workspace>/.lock``, which
    the system drops when the holding process ends however it ends, so a killed driver never
    holds a workspace. The file says who holds it, for the error that a second tuning gets."""

    def __init__(self, folder: Path, key: str):
        """``key`` names where the folder came from, for the errors."""
        if folder.exists() and not folder.is_dir():
            raise HistoryError(f"{key}: {folder} is a file; it must be a folder (it will hold {DB_NAME})")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.file = open(folder / LOCK_NAME, "a+")
        except OSError as error:
            raise HistoryError(f"{key}: can't make the folder {folder} or write in it: {error.strerror or error}") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held; any other error (no locks on this file system) is not a holder
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise HistoryError(f"{folder}: another tuning is using this workspace ({holder}); let it finish, or "
                               "give this one another tuning.workspace.path") from None
        except OSError as error:  # a file system without locks (some network mounts)
            log.warning("%s: the workspace can't be locked (%s); a second tuning there would not be refused",
                        folder, error.strerror or error)
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            with contextlib.suppress(OSError):
                fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


def _keep_aside(path: Path) -> None:
    """Rename an earlier history out of the way, its write-ahead log folded in first: a driver
    that was killed leaves its latest trials in ``history.db-wal``, not in the database file."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.execute("PRAGMA journal_mode=DELETE")
    except sqlite3.OperationalError as error:  # locked, typically
        raise HistoryError(f"{path}: an earlier history is there and can't be kept aside ({error}); "
                           "is another tuning using this workspace?") from None
    except sqlite3.DatabaseError as error:  # not a database, or a damaged one: kept aside as it is
        log.warning("%s: the earlier history there is damaged (%s); kept aside, a new one starts", path, error)
    finally:
        connection.close()
    path.rename(path.with_name(f"history-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.db"))


def _status(stored: str, reason: str) -> Status:
    """A stored status; histories written before ``worker_lost`` existed marked such trials
    failed with a reason beginning "worker lost:"."""
    if stored == Status.FAILED.value and reason.startswith("worker lost:"):
        return Status.WORKER_LOST
    return Status(stored)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))
