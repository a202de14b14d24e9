"""Tuning on a real multi-node Ray cluster: two ``ray start`` nodes on this machine.

The cluster uses token authentication with a token file of its own; drivers get only
``RAY_AUTH_TOKEN_PATH`` (not ``RAY_AUTH_MODE``), so lpot_ray must turn token mode on itself.
Every process the fixture starts is stopped by PID at the end (never ``ray stop``, which would
stop any other Ray of the machine).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import base_conf
from test_cli import save_pt2, write_conf

WORKER_PORTS = range(10002, 20000)  # Ray's worker ports: client ports stay out of them
FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 2}
CLUSTER_DIR = Path(__file__).resolve().parents[1] / "cluster"

DRIVER = textwrap.dedent(
    """
    import json, logging, sys, time
    import lpot_ray
    from lpot_ray import registry
    from lpot_ray.demo.torch_digits import digits_loaders

    model_path, conf, address = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] or None
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = registry.adaptors.get("pytorch")().load_file(model_path)
    _, calibration, evaluation = digits_loaders()

    def slow_eval(candidate):
        time.sleep(1.0)  # trials last long enough for the Ray workers to join
        hits = sum(int((candidate(x).argmax(1) == y).sum()) for x, y in evaluation)
        return hits / len(evaluation.dataset)

    result = lpot_ray.tune(model, conf, q_dataloader=calibration, eval_func=slow_eval, address=address)
    print("RESULT " + json.dumps({"key": result.config.key if result.passed else None, "trials": result.n_trials}))
    """
)


# --- the cluster -------------------------------------------------------------------------------
def free_port() -> int:
    """A free TCP port outside Ray's worker port range."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in WORKER_PORTS:
            return port


@dataclass
class Node:
    process: subprocess.Popen
    log: Path
    node_id: str = ""

    def wait_started(self, limit: float = 90) -> None:
        deadline = time.monotonic() + limit
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the node's process group, then its descendants in groups of their own (workers)."""
        descendants = descendants_of(self.process.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for pid in descendants:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def descendants_of(root: int) -> list[int]:
    """Every live descendant of ``root``, from /proc (Ray's workers start process groups of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@dataclass
class LocalCluster:
    """A head (1 CPU, dashboard for jobs) and one more node (2 CPUs), each with one ``lpot_slot``
    custom resource; token auth on, dead nodes noticed within about a second."""

    root: Path  # logs and the token
    ray_root: Path  # Ray's temp dirs: short, for Ray's unix socket paths (107 bytes at most)
    address: str = ""
    dashboard: str = ""
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self):
        self.token = self.root / "auth_token"
        self.token.write_text(secrets.token_hex(32))

    def client_env(self) -> dict:
        """What a driver on this machine has: the token's path, nothing else about auth."""
        env = {key: value for key, value in os.environ.items()
               if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        return {**env, "RAY_AUTH_TOKEN_PATH": str(self.token), "RAY_USAGE_STATS_ENABLED": "0"}

    def start_node(self, name: str, *options: str) -> Node:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
        command = ["ray", "start", "--block", "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.ray_root / name),
                   "--min-worker-port", str(WORKER_PORTS.start), "--max-worker-port", str(WORKER_PORTS.stop - 1),
                   *[item for flag in ports for item in (flag, str(free_port()))], *options]
        log = self.root / f"{name}.log"
        env = {**self.client_env(), "RAY_AUTH_MODE": "token"}
        process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        node = Node(process, log)
        self.nodes.append(node)
        node.wait_started()
        return node

    def start(self) -> None:
        port, dashboard = free_port(), free_port()
        self.address, self.dashboard = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
        slot = json.dumps({"lpot_slot": 1})
        self.start_node("head", "--head", "--port", str(port), "--num-cpus", "1", "--resources", slot, "--include-dashboard", "true",
                        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                        "--ray-client-server-port", str(free_port()), "--system-config", json.dumps(FAST_HEALTH_CHECK))
        self.start_node("node2", "--address", self.address, "--num-cpus", "2", "--resources", slot)
        ids = self.node_ids()
        assert len(ids) == 2, ids
        for node, cpus in zip(self.nodes, (1, 2), strict=True):
            node.node_id = ids[cpus]

    def node_ids(self) -> dict:
        """CPUs -> node id of every live node, asked from a process of its own."""
        script = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                  "print(json.dumps({int(n['Resources']['CPU']): n['NodeID'] for n in ray.nodes() if n['Alive']}))")
        done = subprocess.run([sys.executable, "-c", script % self.address], env={**self.client_env(), "RAY_AUTH_MODE": "token"},
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return {int(cpus): node for cpus, node in json.loads(done.stdout.strip().splitlines()[-1]).items()}

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.kill()
        shutil.rmtree(self.ray_root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), Path(tempfile.mkdtemp(prefix="lpot-ray-")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# --- helpers -----------------------------------------------------------------------------------
@dataclass
class Driver:
    """A tuning driven from a process of its own, its output in files the test can watch."""

    process: subprocess.Popen
    out: Path
    err: Path

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def finish(self, limit: float = 240) -> dict:
        self.process.wait(timeout=limit)
        assert self.process.returncode == 0, self.log()[-3000:]
        (line,) = [line for line in self.out.read_text().splitlines() if line.startswith("RESULT ")]
        return json.loads(line.removeprefix("RESULT "))


def driver_conf(tmp_path, **ray) -> dict:
    """24 configs in product order, the best kept: enough trials for every worker, and a choice
    that does not depend on which worker ran what."""
    conf = base_conf(tmp_path, strategy={"name": "exhaustive"}, exit_policy={"timeout": 600, "max_trials": 24})
    del conf["evaluation"]
    conf["ray"] = ray
    return conf


def start_driver(cluster: LocalCluster, model_path: Path, conf: dict, address: str = "") -> Driver:
    root = Path(conf["tuning"]["workspace"]["path"]).parent
    out, err = root / "driver.out", root / "driver.err"
    process = subprocess.Popen([sys.executable, "-c", DRIVER, str(model_path), json.dumps(conf), address],
                               env=cluster.client_env(), stdout=out.open("w"), stderr=err.open("w"))
    return Driver(process, out, err)


def trials(db: Path) -> list[dict]:
    try:
        with sqlite3.connect(db) as connection:
            rows = connection.execute("SELECT seq, status, worker, figures, reason FROM trials ORDER BY seq").fetchall()
    except sqlite3.Error:
        return []
    return [{"seq": seq, "status": status, "worker": worker, "node": json.loads(figures).get("node"), "reason": reason}
            for seq, status, worker, figures, reason in rows]


@pytest.fixture(scope="module")
def digits_pt2(trained_digits, tmp_path_factory):
    return save_pt2(trained_digits[0], tmp_path_factory.mktemp("model") / "digits.pt2")


@pytest.fixture(scope="module")
def undisturbed(cluster, digits_pt2, tmp_path_factory):
    """A tuning driven from another process, the address given in ``ray.address``; one worker per
    node, as each node has one ``lpot_slot``."""
    conf = driver_conf(tmp_path_factory.mktemp("undisturbed"), address=cluster.address, resources_per_worker={"lpot_slot": 1})
    driver = start_driver(cluster, digits_pt2, conf)
    result = driver.finish()
    return result, trials(Path(conf["tuning"]["workspace"]["path"]) / "history.db"), driver.log()


# --- the tests ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_driver_elsewhere_places_workers_on_both_nodes(cluster, undisturbed):
    result, rows, log = undisturbed
    assert result["key"] is not None and result["trials"] == len(rows) >= 4
    assert all(row["status"] == "ok" for row in rows), rows
    nodes = {row["node"] for row in rows if row["worker"] != "driver"}
    assert nodes == {node.node_id for node in cluster.nodes}, (nodes, log[-2000:])  # one worker per node
    assert any(row["worker"] == "driver" for row in rows)  # the driver is worker 0 as ever


@pytest.mark.slow
def test_a_tuning_submitted_as_a_ray_job_leaves_its_history_in_its_workspace(cluster, trained_digits, tmp_path):
    job = tmp_path / "job"
    job.mkdir()
    save_pt2(trained_digits[0], job / "digits.pt2")
    conf = yaml.safe_load(write_conf(job, "digits.pt2").read_text())
    conf["tuning"]["workspace"]["path"] = str(tmp_path / "history")  # absolute: where the driver runs, the head
    conf["ray"] = {"workers": 2}
    (job / "conf.yaml").write_text(yaml.safe_dump(conf))
    command = [shutil.which("ray"), "job", "submit", "--address", cluster.dashboard, "--working-dir", str(job),
               "--", "lpot-ray", "tune", "conf.yaml"]
    done = subprocess.run(command, env={**cluster.client_env(), "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0 and "succeeded" in done.stdout, (done.stdout + done.stderr)[-3000:]
    assert "int8 accuracy" in done.stdout  # the job's output is streamed back
    assert (tmp_path / "history" / "history.db").is_file() and (tmp_path / "history" / "int8_model" / "model.pt2").is_file()
    assert trials(tmp_path / "history" / "history.db")[0]["status"] == "ok"


@pytest.mark.slow
def test_a_node_lost_mid_run_costs_nothing_but_time(cluster, undisturbed, digits_pt2, tmp_path):
    expected, _, _ = undisturbed
    doomed = cluster.nodes[1]
    conf = driver_conf(tmp_path, resources_per_worker={"lpot_slot": 1}, worker_start_timeout=5)
    driver = start_driver(cluster, digits_pt2, conf, address=cluster.address)  # the address as an argument
    deadline = time.monotonic() + 180
    while f"ready on node {doomed.node_id}" not in driver.log():
        assert driver.process.poll() is None and time.monotonic() < deadline, driver.log()[-3000:]
        time.sleep(0.2)
    time.sleep(1)  # its worker is in the middle of a trial
    doomed.kill()
    result = driver.finish()
    log, rows = driver.log(), trials(tmp_path / "ws" / "history.db")
    assert "failed while running trial" in log, log[-3000:]  # a trial was lost with the node, and re-run
    assert "did not start within 5 s" in log  # its replacement waited for the lost node's slot, then was dropped
    assert all(row["status"] == "ok" for row in rows), rows
    assert result["key"] == expected["key"] and result["trials"] == expected["trials"]


def test_an_address_nothing_answers_at_fails_at_once_naming_it(trained_digits, tmp_path):
    import lpot_ray
    from lpot_ray.errors import ClusterError

    model, calibration, evaluation = trained_digits
    started = time.monotonic()
    with pytest.raises(ClusterError, match=r"Ray cluster '127.0.0.1:1': nothing answers at 127.0.0.1:1"):
        lpot_ray.tune(model, base_conf(tmp_path), q_dataloader=calibration, eval_dataloader=evaluation, address="127.0.0.1:1")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "ws").exists()  # nothing was started


def test_workers_per_cluster_cpus_and_custom_resources():
    from lpot_ray.ray_session import RayPlan

    cluster = {"CPU": 8.0, "accelerator_x": 3.0}
    assert RayPlan().ray_workers(cluster) == 7  # the driver is worker 0
    assert RayPlan(cpus_per_worker=2).ray_workers(cluster) == 3
    assert RayPlan(resources_per_worker={"accelerator_x": 1}).ray_workers(cluster) == 3
    assert RayPlan(resources_per_worker={"accelerator_y": 1}).ray_workers(cluster) == 0
    assert RayPlan(workers=4, resources_per_worker={"accelerator_x": 1}).ray_workers(cluster) == 3


def test_worker_counts_a_machine_cannot_hold_are_capped_with_a_warning(caplog):
    from lpot_ray.ray_session import RayPlan

    machine = {"CPU": 2.0}
    assert RayPlan(workers=10000).ray_workers(machine) == 1  # a private Ray: the driver and one worker
    assert "ray.workers: 10000 asked, but this machine's 2 CPUs hold 2 of cpus_per_worker 1; running 2" in caplog.text
    assert RayPlan(cpus_per_worker=0.0001).ray_workers(machine) == 7  # not 20,000 processes
    assert "ray.cpus_per_worker: 0.0001 would start 19999 workers; capped at 8 (4 per CPU)" in caplog.text
    assert RayPlan(workers=10000, address="10.0.0.5:6379").ray_workers(machine) == 9999  # a cluster may grow
    assert RayPlan(workers=10000).planned_workers() <= 4 * os.cpu_count()


def test_the_planned_workers_follow_a_ray_this_process_runs(monkeypatch):
    """Strategies size their rounds by the planned workers: with a Ray of 4 CPUs already up,
    ``workers: 4`` gets 4 even on a 2-core machine (as many as the pool then starts), not 2."""
    from lpot_ray import ray_session
    from lpot_ray.ray_session import RayPlan

    monkeypatch.setattr(ray_session.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(ray_session, "running_ray_cpus", lambda: None)
    assert RayPlan(workers=4).planned_workers() == 2 == RayPlan().planned_workers()
    monkeypatch.setattr(ray_session, "running_ray_cpus", lambda: 4.0)
    assert RayPlan(workers=4).planned_workers() == 4 == RayPlan().planned_workers()
    assert RayPlan(workers=4).planned_workers() == 1 + RayPlan(workers=4).ray_workers({"CPU": 4.0})


def test_resources_per_worker_is_validated():
    from lpot_ray.config import load_config
    from lpot_ray.errors import ConfigError

    conf = {"model": {"framework": "pytorch"}, "ray": {"resources_per_worker": {"accelerator_x": 1}}}
    assert load_config(conf).ray.resources_per_worker == {"accelerator_x": 1.0}
    for bad, message in (({"CPU": 1}, "use cpus_per_worker"), ({"accelerator_x": 0}, "must be > 0")):
        with pytest.raises(ConfigError, match=message):
            load_config({**conf, "ray": {"resources_per_worker": bad}})


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_cluster_launcher_configs_meet_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER_DIR / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # as `ray up` does, defaults filled in
    assert 'lpot_ray[torch]' in " ".join(config["setup_commands"])  # every node installs lpot_ray and its framework
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # and gets the cluster's token
    for command in config["head_start_ray_commands"][-1:] + config["worker_start_ray_commands"][-1:]:
        assert "RAY_AUTH_MODE=token ray start" in command


def test_kuberay_job_runs_lpot_ray():
    job = yaml.safe_load((CLUSTER_DIR / "rayjob.yaml").read_text())
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    assert "lpot-ray tune" in job["spec"]["entrypoint"] or "tune_on_cluster.py" in job["spec"]["entrypoint"]
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert any(package.startswith("lpot_ray[") for package in runtime_env["pip"])


def test_a_private_rays_workers_run_at_the_drivers_priority():
    """Ray starts its workers at niceness 15; a private Ray of lpot_ray's runs them at the driver's."""
    script = textwrap.dedent("""
        import os, ray
        from lpot_ray.ray_session import RaySession

        os.nice(2)
        session = RaySession()
        session.ready.wait()
        assert session.error is None, session.error
        reports = ray.remote(lambda: os.nice(0)).options(num_cpus=0)
        print("niceness", os.nice(0), ray.get(reports.remote()))
        session.release()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["niceness", "2", "2"]

