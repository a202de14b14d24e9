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
    assert done.returncode == 2 and "other.db: not an lpot_ray tuning history (its tables are x)" in done.stderr


def save_pt2(model, path):
    import torch

    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(model.eval(), (torch.zeros(4, 1, 8, 8),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(path))
    return path


def write_conf(tmp_path, model_path, **tuning):
    import yaml

    conf = {
        "model": {"name": "digits", "framework": "pytorch", "path": str(model_path)},
        "quantization": {"calibration": {"sampling_size": 100, "dataloader": {
            "batch_size": 32, "dataset": {"digits": {"split": "calibration"}}}}},
        "evaluation": {"accuracy": {"metric": {"topk": 1}, "dataloader": {
            "batch_size": 64, "dataset": {"digits": {"split": "evaluation"}}}}},
        "tuning": {"workspace": {"path": str(tmp_path / "ws")}, **tuning},
        "ray": {"workers": 1},
    }
    path = tmp_path / "conf.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def test_tune_from_a_yaml_alone(trained_digits, tmp_path):
    model_path = save_pt2(trained_digits[0], tmp_path / "digits.pt2")
    done = lpot_ray("tune", str(write_conf(tmp_path, model_path)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "int8 accuracy" in done.stdout
    assert (tmp_path / "ws" / "history.db").is_file() and (tmp_path / "ws" / "int8_model" / "model.pt2").is_file()
    again = lpot_ray("tune", str(write_conf(tmp_path, model_path)), "--resume")
    assert again.returncode == 0 and "(0 evaluated now)" in again.stdout


def test_tune_that_finds_no_passing_config_exits_1(outlier_digits, tmp_path):
    model_path = save_pt2(outlier_digits[0], tmp_path / "outliers.pt2")
    conf = write_conf(tmp_path, model_path, accuracy_criterion={"absolute": 0.02}, exit_policy={"max_trials": 2})
    done = lpot_ray("tune", str(conf))
    assert done.returncode == 1, done.stderr[-2000:]
    assert "no config met the criterion" in done.stdout


def test_tune_bad_input_exits_2_with_one_line(trained_digits, tmp_path):
    import yaml

    model_path = save_pt2(trained_digits[0], tmp_path / "digits.pt2")
    done = lpot_ray("tune", str(write_conf(tmp_path, tmp_path / "missing.pt2")))
    assert done.returncode == 2 and "missing.pt2: file not found" in done.stderr
    not_a_model = tmp_path / "notes.pt2"
    not_a_model.write_text("hello")
    done = lpot_ray("tune", str(write_conf(tmp_path, not_a_model)))
    assert done.returncode == 2 and "not a torch.export .pt2 file" in done.stderr
    conf = write_conf(tmp_path, model_path)
    raw = yaml.safe_load(conf.read_text())
    raw["evaluation"]["accuracy"]["dataloader"]["dataset"] = {"cifar": {}}
    conf.write_text(yaml.safe_dump(raw))
    done = lpot_ray("tune", str(conf))
    assert done.returncode == 2
    assert "`evaluation.accuracy.dataloader.dataset`: unknown dataset 'cifar'; known: COCORaw, COCORecord, GLUE, ImageFolder, ImageRecord, ImagenetRaw, digits, dummy_v2, numpy" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_report_is_one_offline_page_with_its_plots_and_the_chosen_trial(trained_digits, tmp_path):
    model_path = save_pt2(trained_digits[0], tmp_path / "digits.pt2")
    conf = write_conf(tmp_path, model_path, accuracy_criterion={"relative": 0.01}, exit_policy={"timeout": 60, "max_trials": 3})
    assert lpot_ray("tune", str(conf)).returncode == 0
    done = lpot_ray("report", str(tmp_path / "ws"), "-o", str(tmp_path / "out" / "report.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp_path / "out" / "report.html").read_text()
    for plot in ("accuracy_vs_objective", "fp32_ops", "timeline"):
        assert f'<img alt="{plot}" src="data:image/png;base64,' in page
        assert (tmp_path / "out" / f"report_{plot}.png").stat().st_size > 1000
    assert "http://" not in page and "https://" not in page  # works offline
    chosen = json.loads(lpot_ray("history", str(tmp_path / "ws"), "--json").stdout)
    (chosen_key,) = [row["key"] for row in chosen if row["chosen"]]
    assert f"chosen trial key {chosen_key}" in page and "<tr class=chosen>" in page
    assert '<table id="pareto">' in page and "Pareto front" in page
    assert '"conv2"' in page or "conv2" in page  # the ops and the configuration are shown
    assert "Where the time went" in page and "lower_int8" in page


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is installed by .ci/run")
def test_report_renders_in_headless_chromium_with_its_plots(trained_digits, tmp_path):
    import numpy as np
    from PIL import Image

    model_path = save_pt2(trained_digits[0], tmp_path / "digits.pt2")
    assert lpot_ray("tune", str(write_conf(tmp_path, model_path))).returncode == 0
    page = tmp_path / "ws" / "report.html"
    assert lpot_ray("report", str(tmp_path / "ws")).returncode == 0
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    blue = (abs(pixels[..., 0] - 31) < 10) & (abs(pixels[..., 1] - 119) < 10) & (abs(pixels[..., 2] - 180) < 10)
    assert blue.sum() > 500  # the per-op bars (int8 ops in blue) were drawn from the embedded PNG
    assert (pixels.sum(axis=2) < 600).mean() > 0.02  # ink on the page, not a blank or broken render
