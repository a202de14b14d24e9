"""The connection to Ray, made in the background so that a tuning never waits for it.

Starting a private local Ray takes seconds; a small tuning on a laptop can be over by then.
``RaySession`` connects from a thread of its own while the driver already evaluates trials, and
the executor adds Ray workers once the connection is up. The thread lives until the session is
released: Ray ties the processes it starts to the thread that started them, so that thread must
outlive them. Releasing never blocks the caller: a private Ray still starting is shut down by the
thread once it is up, and the next session waits for that to finish first.

Connection order: ``address`` (argument or YAML) > ``RAY_ADDRESS`` > a Ray this process already
initialised (reused, never shut down here) > a private local Ray (shut down at the end).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Optional

_previous_shutdown = threading.Lock()  # held by a releasing session until its Ray is down


@dataclass(frozen=True)
class RayPlan:
    """How many workers to run on which Ray; the driver counts as worker 0."""

    address: Optional[str] = None
    workers: Optional[int] = None  # None: one per cpus_per_worker of the cluster's CPUs
    cpus_per_worker: float = 1.0
    verbose: bool = False

    def connect_eagerly(self) -> bool:
        """A cluster or a Ray already running costs little to reach; a private Ray is started
        only once the tuning shows it has more work than the driver alone."""
        ray = sys.modules.get("ray")
        return bool(self.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()))

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
                    ray.init(
                        address=self.address or "local",
                        include_dashboard=False if not self.address else None,
                        log_to_driver=self.verbose,
                        logging_level=logging.INFO if self.verbose else logging.ERROR,
                    )
                    owned = True
            except BaseException as error:  # reported to the driver, which goes on without Ray
                self.error = error
            finally:
                self.ready.set()
            self._released.wait()
            if owned:
                ray.shutdown()

    def cluster_cpus(self) -> float:
        import ray

        return float(ray.cluster_resources().get("CPU", 1))

    def release(self, wait: bool = False) -> None:
        """Let the thread shut down a Ray it started, once that Ray is up."""
        self._released.set()
        if wait:
            self._thread.join()
