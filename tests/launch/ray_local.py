"""A private local Ray cluster for a test module, and the check that it leaves no process behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import psutil
import ray


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie has exited)."""
    running = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running.add(pid)
        except psutil.NoSuchProcess:
            pass
    return running


def gone(pids: set[int], timeout_s: float = 20) -> bool:
    """Whether every one of ``pids`` has exited within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not alive(pids)


@contextlib.contextmanager
def local_cluster(prefix: str) -> Iterator[None]:
    """One local 2-CPU cluster (short temp dir: Ray's socket paths have a length limit); after
    ``ray.shutdown()`` no process it or the tests started may be left."""
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield
    started = {p.pid for p in psutil.Process().children(recursive=True)} - before
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = saved
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert gone(started), f"processes left after ray.shutdown(): {sorted(alive(started))}"
