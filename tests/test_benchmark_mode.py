"""LPOT's benchmark mode: instances as pinned processes, fp32 and saved int8 models, the CLI."""

import io
import json
import os

import pytest
import yaml
from rich.console import Console

import lpot_ray
from lpot_ray.benchmark import plan_placement, results_table
from lpot_ray.config import load_config
from lpot_ray.errors import ConfigError

from test_cli import lpot_ray as run_cli
from test_cli import save_pt2

USABLE_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
DIGITS = {"batch_size": 32, "dataset": {"digits": {"split": "evaluation"}}}


def bench_conf(instances=1, warmup=3, iteration=40, path=None, accuracy=True) -> dict:
    conf = {
        "model": {"name": "digits", "framework": "pytorch", **({"path": str(path)} if path else {})},
        "evaluation": {"performance": {"warmup": warmup, "iteration": iteration, "dataloader": DIGITS,
                                       "configs": {"num_of_instance": instances, "cores_per_instance": 1}}},
    }
    if accuracy:
        conf["evaluation"]["accuracy"] = {"metric": {"topk": 1}, "dataloader": DIGITS}
    return conf


@pytest.fixture(scope="module")
def saved_int8(trained_digits, tmp_path_factory):
    """A real (small) tuning, in-process, and the int8 model it saved."""
    model, calibration, evaluation = trained_digits
    folder = tmp_path_factory.mktemp("tuned")
    conf = {"model": {"framework": "pytorch"}, "evaluation": {"accuracy": {"metric": {"topk": 1}}},
            "tuning": {"workspace": {"path": str(folder / "ws")}}, "ray": {"workers": 1}}
    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_dataloader=evaluation)
    assert result.passed
    return result, result.save(folder / "int8_model")


def check_instance_figures(result, iterations, batch_size):
    for instance in result.instances:
        assert instance.iterations == iterations == len(instance.latencies_ms)
        assert instance.samples == batch_size * iterations  # a short last batch is never timed
        assert instance.throughput == pytest.approx(instance.samples / instance.seconds)
        assert sum(instance.latencies_ms) / 1000 <= instance.seconds  # each timed batch lies inside the loop
        summary = instance.summary()
        assert summary["p50_ms"] <= summary["p99_ms"] and summary["mean_ms"] > 0
    assert result.throughput == pytest.approx(sum(instance.throughput for instance in result.instances))


def test_fp32_two_instances_pinned_to_their_own_core(trained_digits):
    model, _, evaluation = trained_digits  # b_dataloader: the torch loader replaces the YAML's (batches of 64)
    results = lpot_ray.Benchmark(bench_conf(instances=2, accuracy=False))(model, b_dataloader=evaluation)
    assert list(results) == ["performance"]
    result = results["performance"]
    assert result.precision == "fp32" and result.batch_size == 64 and len(result.instances) == 2
    check_instance_figures(result, iterations=40, batch_size=64)
    if USABLE_CORES >= 2:
        cores = [instance.cores for instance in result.instances]
        assert all(len(group) == 1 for group in cores) and cores[0] != cores[1]
        assert result.placement.startswith("pinned: instance 0 on cores")
    else:
        assert all(instance.cores == [] for instance in result.instances) and "not pinned" in result.placement
    accuracy, batch_size, seconds = result  # LPOT's (accuracy, batch_size, result_list)
    assert accuracy is None and batch_size == 64 and len(seconds) == 80


def test_saved_int8_model_accuracy_and_performance(trained_digits, saved_int8):
    tuned, folder = saved_int8
    results = lpot_ray.Benchmark(bench_conf(iteration=30))(str(folder))
    assert set(results) == {"accuracy", "performance"}
    assert results["accuracy"].precision == results["performance"].precision == "int8"
    # The compiled int8 model, as the tuner evaluated it: the same predictions, give or take a sample.
    assert results["accuracy"].samples == 297  # the digits evaluation split, read once
    assert abs(results["accuracy"].accuracy - tuned.accuracy) <= 1.5 / results["accuracy"].samples
    check_instance_figures(results["performance"], iterations=30, batch_size=32)
    fp32 = lpot_ray.Benchmark(bench_conf())(trained_digits[0], mode="accuracy")
    assert list(fp32) == ["accuracy"] and fp32["accuracy"].accuracy == pytest.approx(tuned.baseline)

    console = Console(file=io.StringIO(), width=150)
    console.print(results_table(results))
    text = console.file.getvalue()
    assert "accuracy, int8 pytorch" in text and "performance, int8 pytorch" in text and "samples/s" in text
    assert f"{results['performance'].throughput:.1f}" in text  # the total row


def test_placement_pins_disjoint_cores_or_says_why_not():
    placement = plan_placement(2, 2, usable=[0, 1, 2, 3])
    assert placement.cores == ((0, 1), (2, 3)) and placement.threads == 2
    crowded = plan_placement(3, 2, usable=[0, 1])
    assert crowded.cores == ((), (), ()) and crowded.note.startswith("not pinned: 3 instance(s) x 2 core(s) need 6 cores")
    assert plan_placement(2, None, usable=[0, 1, 2, 3]).threads == 2  # the usable cores shared out


def test_performance_section_is_validated():
    config = load_config({"model": {"framework": "pytorch"}, "evaluation": {"performance": {}}})
    assert (config.evaluation.performance.warmup, config.evaluation.performance.iteration) == (5, -1)
    with pytest.raises(ConfigError, match=r"`evaluation.performance.iteration`: 0 must be -1"):
        load_config({"model": {"framework": "pytorch"}, "evaluation": {"performance": {"iteration": 0}}})


def write(tmp_path, conf) -> str:
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def test_cli_benchmark_json(trained_digits, tmp_path):
    model_path = save_pt2(trained_digits[0], tmp_path / "digits.pt2")
    done = run_cli("benchmark", write(tmp_path, bench_conf(instances=1, iteration=25, path=model_path)), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    assert set(results) == {"accuracy", "performance"}
    performance = results["performance"]
    assert [row["instance"] for row in performance["instances"]] == [0]
    assert performance["placement"].startswith("pinned: instance 0 on cores")
    assert all(row["iterations"] == 25 and row["samples"] == 25 * 32 for row in performance["instances"])
    assert performance["throughput"] == pytest.approx(sum(row["throughput"] for row in performance["instances"]))
    assert results["accuracy"]["accuracy"] > 0.9 and results["accuracy"]["precision"] == "fp32"


@pytest.mark.parametrize("change, expected", [
    (lambda conf: conf["evaluation"]["performance"].update(warmup=-1), "`evaluation.performance.warmup`: -1"),
    (lambda conf: conf["evaluation"]["performance"]["configs"].update(cores=2),
     "`evaluation.performance.configs.cores` is not a known key; allowed here: cores_per_instance, num_of_instance"),
    (lambda conf: conf.update(nas={"approach": "basic"}), "`nas` is an LPOT option lpot_ray does not support yet"),
    (lambda conf: conf["model"].update(path="/nonexistent/missing.pt2"), "missing.pt2: file not found"),
])
def test_cli_benchmark_bad_input_exits_2_naming_the_key(tmp_path, change, expected):
    conf = bench_conf(path=tmp_path / "digits.pt2")
    change(conf)
    done = run_cli("benchmark", write(tmp_path, conf), "--mode", "performance")
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_cli_benchmark_missing_model_option_exits_2(tmp_path):
    done = run_cli("benchmark", write(tmp_path, bench_conf()), "--model", str(tmp_path / "nowhere.pt2"))
    assert done.returncode == 2 and "--model:" in done.stderr and "nowhere.pt2: file not found" in done.stderr
