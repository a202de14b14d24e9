"""Running lpot-ray as a user would, on a YAML naming a model file and the digits data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import yaml

CHANNELS_LAST = {"Transpose": {"perm": [1, 2, 0]}}  # the digits dataset gives [1, 8, 8] samples


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lpot_ray", *args], capture_output=True, text=True, timeout=timeout)


def digits_conf(tmp_path: Path, framework: str, model_path, transform: Optional[dict] = None, **quantization) -> dict:
    """A tuning YAML (as a dict) for a digits model file, one in-process worker."""
    def loader(split: str, batch_size: int) -> dict:
        section = {"batch_size": batch_size, "dataset": {"digits": {"split": split}}}
        return {**section, "transform": transform} if transform else section

    return {
        "model": {"name": "digits", "framework": framework, "path": str(model_path)},
        "quantization": {"calibration": {"sampling_size": 100, "dataloader": loader("calibration", 32)}, **quantization},
        "evaluation": {"accuracy": {"metric": {"topk": 1}, "dataloader": loader("evaluation", 64)}},
        "tuning": {"workspace": {"path": str(tmp_path / "ws")}},
        "ray": {"workers": 1},
    }


def tune_yaml(tmp_path: Path, conf: dict) -> subprocess.CompletedProcess:
    (tmp_path / "conf.yaml").write_text(yaml.safe_dump(conf, sort_keys=False))
    return run_cli("tune", str(tmp_path / "conf.yaml"))


def assert_history_and_report(workspace: Path) -> None:
    """``lpot-ray history`` marks one chosen trial; ``lpot-ray report`` draws its plots."""
    history = run_cli("history", str(workspace), "--json", timeout=120)
    rows = json.loads(history.stdout)
    assert history.returncode == 0 and rows and sum(row["chosen"] for row in rows) == 1
    report = run_cli("report", str(workspace), timeout=120)
    assert report.returncode == 0 and '<img alt="fp32_ops"' in (workspace / "report.html").read_text()
