"""The live display while tuning and the final summary, rendered to a string instead of a TTY."""

import io
import logging
from types import SimpleNamespace

from rich.console import Console

from lpot_ray.config import ExitPolicy
from lpot_ray.engine import Criterion, Engine
from lpot_ray.history import History
from lpot_ray.progress import Snapshot, TuningProgress, progress_table, summary_table
from lpot_ray.result import TuneResult
from lpot_ray.strategies.basic import BasicStrategy
from lpot_ray.trial import ExecutorStatus, Status, Trial

from fakes import FakeExecutor, make_space, sensitive_ops_accuracy


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def render(renderable) -> str:
    console = Console(file=io.StringIO(), width=120)
    console.print(renderable)
    return console.file.getvalue()


def run_engine(tmp_path, progress, timeout=60):
    space = make_space()
    history = History.start(tmp_path / "ws", None, {"model": "m"})
    try:
        engine = Engine(BasicStrategy(space), FakeExecutor(sensitive_ops_accuracy({"op1": 0.05}), 2), history,
                        Criterion(0.9, absolute=0.01), ExitPolicy(timeout=timeout), space.fp32_macs_fraction, progress)
        outcome = engine.run()
    finally:
        progress.close()
        history.close()
    return outcome


def test_live_table_on_a_terminal_shows_trials_workers_best_and_time(tmp_path):
    console = terminal()
    progress = TuningProgress(console=console)
    assert progress.live_enabled
    outcome = run_engine(tmp_path, progress)
    text = console.file.getvalue()
    done = sum(trial.status != Status.CANCELLED for trial in outcome.trials)
    best = outcome.passing[0]
    assert f"{done} done (0 failed" in text
    assert "workers busy" in text and "/ 2" in text
    assert f"trial {best.seq}: accuracy {best.accuracy:.4f} (needs >= 0.8900)" in text and "1 fp32 ops" in text
    assert "elapsed" in text and "time-out left" in text and "of 60 s" in text
    assert "\x1b[" in text  # drawn with terminal control codes, redrawn in place


def test_plain_log_lines_when_not_a_terminal(tmp_path, caplog):
    console = Console(file=io.StringIO(), width=120)  # a pipe or a file
    progress = TuningProgress(console=console)
    assert not progress.live_enabled
    with caplog.at_level(logging.INFO, logger="lpot_ray"):
        outcome = run_engine(tmp_path, progress)
    assert console.file.getvalue() == ""
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("trial ")]
    assert len(lines) == sum(trial.status != Status.CANCELLED for trial in outcome.trials)
    assert any(line.endswith("passed") for line in lines)


def fake_engine(told, in_flight=2, slots=3, starting=1, elapsed=12.0, timeout=60):
    workers = ExecutorStatus(free=0, pending=True, workers=slots, busy=in_flight, starting=starting)
    executor = SimpleNamespace(status=lambda: workers)
    passing = [trial for trial in told if trial.passed]
    return SimpleNamespace(told=told, in_flight=dict.fromkeys(range(in_flight)), executor=executor,
                           passing=lambda: passing, criterion=Criterion(0.95, relative=0.01), elapsed=elapsed,
                           exit_policy=ExitPolicy(timeout=timeout))


def test_snapshot_counts_and_the_time_out_left():
    config = make_space().model_wise_configs()[0]
    told = [Trial(0, config, accuracy=0.5), Trial(1, config, status=Status.FAILED), Trial(2, config, status=Status.CANCELLED),
            Trial(3, config.with_fallback(["op1"]), accuracy=0.949, passed=True, objective=0.125)]
    snapshot = Snapshot.of(fake_engine(told))
    assert (snapshot.done, snapshot.failed, snapshot.cancelled, snapshot.running) == (3, 1, 1, 2)
    assert (snapshot.busy, snapshot.slots, snapshot.starting) == (2, 3, 1) and snapshot.best.seq == 3
    text = render(progress_table(snapshot))
    assert "3 done (1 failed, 1 cancelled), 2 running" in text and "2 / 3 (+1 starting)" in text
    assert "trial 3: accuracy 0.9490 (needs >= 0.9405), objective 0.125, 1 fp32 ops" in text
    assert "48 s of 60 s" in text and "12 s" in text
    text = render(progress_table(Snapshot.of(fake_engine(told[:2], timeout=0))))
    assert "none yet" in text and "none: stops at the first passing config" in text


def test_summary_table_passed_and_not():
    passed = TuneResult(model=None, config=None, accuracy=0.9731, objectives={"latency_ms": 0.3, "fp32_latency_ms": 0.6,
                        "latency_ratio": 2.0}, baseline=0.9764, n_trials=5, n_evaluated=3, int8_ops=("conv1", "fc1"),
                        fp32_ops=("conv2",), passed=True, stopped_by="strategy finished", workspace="ws")
    text = render(summary_table(passed, wall_seconds=12.34))
    for expected in ("int8 accuracy", "0.9731", "0.9764 (baseline)", "2: conv1, fc1", "1: conv2",
                     "fp32 0.60 ms, int8 0.30 ms (fp32/int8 2.00x)", "5 (3 evaluated now)", "12.3 s", "strategy finished"):
        assert expected in text
    failed = TuneResult(model=None, config=None, accuracy=None, objectives={}, baseline=0.9764, n_trials=2, n_evaluated=2,
                        int8_ops=(), fp32_ops=(), passed=False, stopped_by="max_trials 2")
    text = render(summary_table(failed))
    assert "no config met the criterion" in text and "max_trials 2" in text and "int8 accuracy" not in text
