"""The connection to Ray, made in the background so that a tuning never waits for it.

Starting a private local Ray takes seconds; a small tuning on a laptop can be over by then.
``RaySession`` connects from a thread of its own while the driver already evaluates trials, and
the worker pool adds Ray workers once the connection is up. The thread lives until the session is
released: Ray ties the processes it starts to the thread that started them, so that thread must
outlive them. Releasing never blocks the caller: a private Ray still starting is shut down by the
thread once it is up, and the next session waits for that to finish first.

Connection order: ``address`` (argument or YAML) > ``RAY_ADDRESS`` > a Ray this process already
initialised (reused, never shut down here) > a private local Ray (shut down at the end).

A cluster address is probed with a plain TCP connection first, so a wrong address fails in
seconds with an error naming it (Ray itself retries for minutes). Ray 2.5x clusters may require
token authentication, which ``ray.init`` with an explicit address only uses when
``RAY_AUTH_MODE=token``: when a token is at hand and the mode is unset, token mode is turned on
for this process (a token-mode client reaches a cluster without authentication too).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from .errors import ClusterError

MAX_WORKERS_PER_CPU = 4  # worker processes per CPU, each holding the model: more only thrash
log = logging.getLogger("lpot_ray")

if TYPE_CHECKING:
    from .config import Config

_previous_shutdown = threading.Lock()  # held by a releasing session until its Ray is down


@dataclass(frozen=True)
class RayPlan:
    """How many workers to run on which Ray; the driver counts as worker 0. The one place where
    worker counts are worked out: ``resolve`` (whether Ray is wanted at all), ``planned_workers``
    (before Ray is up, for the strategies' round sizes) and ``ray_workers`` (once the cluster's
    resources are known)."""

    address: Optional[str] = None
    workers: Optional[int] = None  # None: one per cpus_per_worker of the cluster's CPUs
    cpus_per_worker: float = 1.0
    verbose: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources
    start_timeout: float = 300.0  # seconds a worker may wait for a node before it is dropped

    @classmethod
    def resolve(cls, configs: Sequence["Config"], address: Optional[str] = None, workers: Optional[int] = None,
                verbose: bool = False) -> Optional["RayPlan"]:
        """One plan for the jobs of ``configs`` sharing the workers: the first address given, the
        most workers asked for, and per worker the most CPUs and custom resources any job asks
        for (each worker serves every job). None when the driver is to work alone: ``workers: 1``,
        or one CPU and no cluster named."""
        address = address or next((config.ray.address for config in configs if config.ray.address), None)
        asked = [config.ray.workers for config in configs if config.ray.workers]
        workers = workers or (max(asked) if asked else None)
        if workers == 1:
            return None
        if not (workers or address or os.environ.get("RAY_ADDRESS") or (os.cpu_count() or 1) > 1):
            return None
        resources: dict[str, float] = {}
        for config in configs:
            for name, amount in config.ray.resources_per_worker.items():
                resources[name] = max(amount, resources.get(name, 0.0))
        return cls(address, workers, max(config.ray.cpus_per_worker for config in configs), verbose, resources,
                   max(config.ray.worker_start_timeout for config in configs))

    def planned_workers(self) -> int:
        """Workers the tuning expects before its Ray workers are up: ``workers``, else one per
        ``cpus_per_worker`` of the CPUs it will have (those of a Ray this process already runs,
        else this machine's); outside a cluster, no more than those CPUs hold."""
        capacity = self.capacity(running_ray_cpus() or os.cpu_count() or 1)
        if not self.workers:
            return capacity
        return self.workers if self.cluster_address() else min(self.workers, capacity)

    def capacity(self, cpus: float) -> int:
        """Workers (the driver included) that ``cpus`` CPUs hold: one per ``cpus_per_worker``,
        and never more than ``MAX_WORKERS_PER_CPU`` per CPU, each being a process with the model."""
        return max(1, min(int(cpus // self.cpus_per_worker), int(cpus * MAX_WORKERS_PER_CPU)))

    def cluster_address(self) -> Optional[str]:
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def check_reachable(self) -> None:
        """Raise ClusterError at once if a cluster address is given and nothing answers there."""
        if self.cluster_address():
            check_reachable(self.cluster_address())

    def connect_eagerly(self) -> bool:
        """A cluster or a Ray already running costs little to reach; a private Ray is started
        only once the tuning shows it has more work than the driver alone."""
        return bool(self.cluster_address() or ray_running())

    def ray_workers(self, cluster: dict[str, float]) -> int:
        """Worker actors to start next to the driver: ``workers - 1`` if given, else one per
        ``cpus_per_worker`` of the cluster's CPUs less the driver's, and no more than its custom
        resources can hold (the driver needs none of them)."""
        cpus = cluster.get("CPU", 1)
        capacity = self.capacity(cpus)
        if self.workers:
            if self.cluster_address() or self.workers <= capacity:
                return self.workers - 1  # a cluster may grow (an autoscaler) to take them
            log.warning("ray.workers: %d asked, but this machine's %g CPUs hold %d of cpus_per_worker %g; running %d "
                        "(the driver and %d Ray workers)", self.workers, cpus, capacity, self.cpus_per_worker,
                        capacity, capacity - 1)
        elif int(cpus // self.cpus_per_worker) > capacity:
            log.warning("ray.cpus_per_worker: %g would start %d workers; capped at %d (%d per CPU)", self.cpus_per_worker,
                        int(cpus // self.cpus_per_worker), capacity, MAX_WORKERS_PER_CPU)
        count = capacity - 1
        for name, amount in self.resources_per_worker.items():
            count = min(count, int(cluster.get(name, 0) // amount))
        return max(0, count)

    def connect(self) -> "RaySession":
        return RaySession(self.address, self.verbose)


class RaySession:
    def __init__(self, address: Optional[str] = None, verbose: bool = False):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.verbose = verbose
        self.ready = threading.Event()
        self.error: Optional[BaseException] = None
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._own, name="lpot-ray-connection")
        self._thread.start()

    def _own(self) -> None:
        with _previous_shutdown:
            import ray

            owned = False
            try:
                if not ray.is_initialized():
                    if self.address:
                        _use_token_auth_if_available()
                    # A private Ray's workers run at the driver's priority: Ray adds 15 to the
                    # niceness its workers inherit, which gives trials a fraction of a busy machine
                    # (RAY_worker_niceness still says otherwise).
                    private = {} if self.address or "RAY_worker_niceness" in os.environ else {
                        "_system_config": {"worker_niceness": 0}}
                    ray.init(
                        address=self.address or "local",
                        include_dashboard=False if not self.address else None,
                        log_to_driver=self.verbose,
                        logging_level=logging.INFO if self.verbose else logging.ERROR,
                        **private,
                    )
                    owned = True
            except BaseException as error:  # reported to the driver, which goes on without Ray
                self.error = _cluster_error(self.address, error) if self.address else error
            finally:
                self.ready.set()
            self._released.wait()
            if owned:
                ray.shutdown()

    def cluster_cpus(self) -> float:
        return self.cluster_resources().get("CPU", 1.0)

    def cluster_resources(self) -> dict[str, float]:
        import ray

        return {name: float(amount) for name, amount in ray.cluster_resources().items()}

    def wait_connected(self, timeout: float) -> None:
        """Raise ClusterError unless the cluster connection is up within ``timeout`` seconds."""
        if not self.ready.wait(timeout):
            raise ClusterError(f"Ray cluster {self.address!r}: no answer within {timeout:.0f} s")
        if self.error is not None:
            raise self.error

    def release(self, wait: bool = False) -> None:
        """Let the thread shut down a Ray it started, once that Ray is up."""
        self._released.set()
        if wait:
            self._thread.join()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail at once, naming the address, when nothing listens there: Ray would retry for minutes."""
    endpoint = _host_port(address)
    if endpoint is None:
        return  # "auto", "local" or a form only Ray knows: let Ray judge it
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as error:
        raise ClusterError(f"Ray cluster {address!r}: nothing answers at {endpoint[0]}:{endpoint[1]} ({error}); "
                           "give the head node's address and GCS port (`ray start --head --port`, 6379 by default)") from None


def _host_port(address: str) -> Optional[tuple[str, int]]:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _use_token_auth_if_available() -> None:
    """Turn on Ray's token authentication for this process when a token exists (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, as Ray does
    itself for ``address="auto"`` but not for an explicit address."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication
        return
    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        os.environ["RAY_AUTH_MODE"] = "token"
        Config.initialize("")  # the C++ side reads the mode from its cached configuration


def _cluster_error(address: str, error: BaseException) -> ClusterError:
    """Ray's connection errors say little; name the address and what to check."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        hint = "if the cluster uses token authentication, check that the token given is the cluster's"
    else:
        hint = ("if the cluster uses token authentication, set RAY_AUTH_MODE=token and give the cluster's token "
                "in RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` "
                "on the head node prints it)")
    return ClusterError(f"Ray cluster {address!r}: can't connect: {type(error).__name__}: {text}; {hint}")


def ray_running() -> bool:
    """Whether this process runs Ray already (``ray.init`` by the user, a test, another tuning),
    without importing it; False while another thread is still importing it."""
    is_initialized = getattr(sys.modules.get("ray"), "is_initialized", None)
    return bool(is_initialized is not None and is_initialized())


def running_ray_cpus() -> Optional[float]:
    """The CPUs of the Ray this process already runs, or None: the workers a tuning gets there
    follow them, not this machine's count."""
    if not ray_running():
        return None
    try:
        return sys.modules["ray"].cluster_resources().get("CPU")
    except Exception:  # a Ray shutting down: plan for this machine
        return None
