"""Joining a Ray cluster within a deadline, or starting a private local one.

``ray.init`` waits without limit for a cluster that is not there (an address nothing listens on, a
head recorded by a cluster that has since died), and without an address it joins whatever cluster
already runs on the node, refusing the CPU count a local start needs. Ray offers no driver-side
connect timeout, so the address is resolved here and its port probed (a TCP connect, retried until
the deadline: a head may still be starting) before ``ray.init`` runs; every failure is one line that
names the address and the fix.

What a probe cannot see: a port that accepts connections but is not Ray's. That still waits on
Ray's own retries.

A local cluster's GCS and raylet die with the driver that started them, but the raylet's agents
(dashboard agent, runtime-env agent) outlive a driver killed by SIGKILL, reparented to init. Ray has
no switch for that, so a small reaper process, started with the cluster, holds a pipe from the
driver and kills the processes the cluster started once the pipe closes, however the driver ended.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time

import psutil

import ray
from ray._private.services import canonicalize_bootstrap_address

from ditcache.errors import DitCacheError

DEFAULT_CONNECT_TIMEOUT_S = 30.0
_CLIENT_PREFIX = "ray://"
_RETRY_S = 0.25
_REAPERS: list[subprocess.Popen] = []  # one per local cluster this process started, until disconnect()


class RayConnectError(DitCacheError, ConnectionError):
    """No Ray cluster answered at the address a job was told to join."""


def connect(address: str | None, num_cpus_needed: float, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> bool:
    """Join the cluster at ``address`` (``"host:port"``, ``"auto"``, ``"ray://host:10001"``) or, with
    none, the one ``RAY_ADDRESS`` names (a driver run by ``ray job submit``), else start a private
    local cluster with at least ``num_cpus_needed`` CPUs. Returns whether this call connected (the
    caller then owns ``ray.shutdown()``); a driver that already ran ``ray.init`` is reused."""
    if ray.is_initialized():
        return False
    if timeout_s <= 0:
        raise RayConnectError(f"--connect-timeout must be > 0 seconds, got {timeout_s:g}")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None or address == "local":
        # "local": a new cluster even where one already runs on this node (ray.init would join it).
        # At least the CPUs the ranks ask for, so a many-rank CPU run on a small machine can be placed.
        cpus = max(os.cpu_count() or 1, math.ceil(num_cpus_needed))
        ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        _reap_on_exit()
        return True
    host, port = _endpoint(address)
    _probe(address, host, port, timeout_s)
    try:
        ray.init(address=address)
    except (ConnectionError, TimeoutError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RayConnectError(f"could not join the Ray cluster at {address!r}: {first}") from None
    return True


def _endpoint(address: str) -> tuple[str, int]:
    """The host and port behind ``address`` (the Ray client server's for ``ray://``)."""
    if address.startswith(_CLIENT_PREFIX):
        text = address.removeprefix(_CLIENT_PREFIX)
    else:
        try:
            text = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as exc:
            raise RayConnectError(
                f"--address {address}: {str(exc).strip().splitlines()[0]}; start a head with `ray start --head`, "
                "or omit --address to start a local cluster"
            ) from None
        if text is None:
            raise RayConnectError(f"--address {address}: no Ray cluster is recorded on this node; omit --address")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise RayConnectError(f"--address {address!r} is not host:port, 'auto' or ray://host:port")
    return host, int(port)


def _probe(address: str, host: str, port: int, timeout_s: float) -> None:
    """Return once ``host:port`` accepts a TCP connection; raise after ``timeout_s`` of trying."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(left, 5.0))):
                return
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(_RETRY_S, left))
    raise RayConnectError(
        f"no Ray cluster answered at {address} ({host}:{port}: {reason}) within {timeout_s:g} s; start one there "
        "with `ray start --head`, fix --address / RAY_ADDRESS, or omit both to start a local cluster"
    )


# Reads the pids (with their start times, so a reused pid is spared) from its first line, waits for
# the driver's end of the pipe to close, then kills those still running.
_REAPER = """
import sys, psutil
targets = [tuple(map(float, item.split("@"))) for item in sys.stdin.readline().split()]
sys.stdin.read()
for pid, started in targets:
    try:
        process = psutil.Process(int(pid))
        if abs(process.create_time() - started) < 1e-3:
            process.kill()
    except psutil.Error:
        pass
"""


def _reap_on_exit() -> None:
    """Start the reaper for every process this driver's local cluster has started so far."""
    started = psutil.Process().children(recursive=True)
    reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER], stdin=subprocess.PIPE, start_new_session=True, close_fds=True
    )
    assert reaper.stdin is not None
    reaper.stdin.write(" ".join(f"{p.pid}@{p.create_time()!r}" for p in started).encode() + b"\n")
    reaper.stdin.flush()
    # Kept open until disconnect() or the driver's end (exit, crash or SIGKILL): the reaper's signal.
    _REAPERS.append(reaper)


def disconnect(timeout_s: float = 30.0) -> None:
    """``ray.shutdown()``, then let the reapers of local clusters this process started sweep up."""
    ray.shutdown()
    while _REAPERS:
        reaper = _REAPERS.pop()
        assert reaper.stdin is not None
        reaper.stdin.close()
        try:
            reaper.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            reaper.kill()
