"""The ``lpot-ray`` command line.

    lpot-ray history WORKSPACE [--sort accuracy|objective|duration|seq] [--json]

Exit codes: 0 done, 2 bad input (a file, key or value named on one line).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from .errors import LpotRayError
from .history import History, resolve_db_path
from .trial import Trial

EXIT_OK, EXIT_BAD_INPUT = 0, 2
SORT_KEYS = {
    "seq": lambda trial: trial.seq,
    "accuracy": lambda trial: -(trial.accuracy if trial.accuracy is not None else float("-inf")),
    "objective": lambda trial: trial.objective if trial.objective is not None else float("inf"),
    "duration": lambda trial: -trial.duration,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lpot-ray", description="Ray-distributed int8 tuning, LPOT-compatible.")
    commands = parser.add_subparsers(dest="command", required=True)
    history = commands.add_parser("history", help="every trial of a tuning workspace, as a table")
    history.add_argument("workspace", help="the workspace folder, or its history.db")
    history.add_argument("--sort", choices=sorted(SORT_KEYS), default="seq", help="order of the rows (default: seq)")
    history.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    try:
        return show_history(args.workspace, args.sort, args.json)
    except LpotRayError as error:
        print(f"lpot-ray: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


def show_history(workspace: str, sort: str, as_json: bool) -> int:
    path = resolve_db_path(workspace)
    if not path.is_file():
        print(f"lpot-ray: {path}: no tuning history there", file=sys.stderr)
        return EXIT_BAD_INPUT
    history = History(path, read_only=True)
    try:
        trials = sorted(history.trials(), key=SORT_KEYS[sort])
        result = history.get_meta("result") or {}
    finally:
        history.close()
    if as_json:
        print(json.dumps([_row(trial, result) for trial in trials], indent=2))
        return EXIT_OK
    _print_table(trials, result, str(path))
    return EXIT_OK


def _row(trial: Trial, result: dict) -> dict:
    return {
        "seq": trial.seq, "kind": trial.kind, "key": trial.key, "status": trial.status, "accuracy": trial.accuracy,
        "passed": trial.passed, "objective": trial.objective, "fp32_ops": list(trial.config.fp32_ops),
        "worker": trial.worker, "duration": trial.duration, "reason": trial.reason,
        "chosen": trial.key == result.get("key"), "config": trial.config.to_dict(),
    }


def _print_table(trials: list[Trial], result: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("seq", "status", "accuracy", "passed", "fp32 MACs", "fp32 ops", "worker", "seconds"):
        table.add_column(column, justify="right" if column in ("seq", "accuracy", "fp32 MACs", "seconds") else "left")
    for trial in trials:
        chosen = " (chosen)" if trial.key == result.get("key") else ""
        status = trial.status if trial.kind == "trial" else f"{trial.kind} {trial.status}"
        table.add_row(
            str(trial.seq), status + chosen,
            "-" if trial.accuracy is None else f"{trial.accuracy:.4f}",
            "yes" if trial.passed else "",
            "-" if trial.objective is None else f"{trial.objective:.3f}",
            ", ".join(trial.config.fp32_ops) or "-",
            trial.worker, f"{trial.duration:.2f}",
        )
    Console().print(table)


if __name__ == "__main__":
    raise SystemExit(main())
