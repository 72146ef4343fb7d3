"""Joining Ray: an address where no cluster answers fails within the deadline with one line naming it;
without an address a private local cluster starts even where another head already runs."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import psutil
import pytest

pytest.importorskip("ray")

from ditcache.launch.ray_connect import RayConnectError, connect  # noqa: E402
from ditcache.parallel.testing import free_port  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("scheme", ["gcs", "client", "RAY_ADDRESS"])
def test_an_address_with_no_cluster_fails_within_the_deadline(scheme, monkeypatch):
    port = free_port()  # nothing listens there
    address = {"gcs": f"127.0.0.1:{port}", "client": f"ray://127.0.0.1:{port}", "RAY_ADDRESS": None}[scheme]
    if scheme == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(RayConnectError) as caught:
        connect(address, 1, timeout_s=2)
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "within 2 s" in message and "ray start --head" in message
    assert "\n" not in message
    assert 2 <= elapsed < 6, elapsed


def test_a_bad_timeout_is_refused():
    with pytest.raises(RayConnectError, match="--connect-timeout must be > 0 seconds, got 0"):
        connect(f"127.0.0.1:{free_port()}", 1, timeout_s=0)


DRIVER = """
import ray
from ditcache.launch.ray_connect import connect
assert connect(None, 1, timeout_s=30)
print(ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


@pytest.mark.slow
def test_without_an_address_a_local_cluster_starts_beside_a_running_head():
    """``ray.init()`` would join the running head and refuse ``num_cpus``; ``connect`` starts its own."""
    temp_dir = tempfile.mkdtemp(prefix="rh_", dir="/tmp")
    port = free_port()
    # Head and driver share a Ray temp dir, so the driver finds the head as `ray.init()` would.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the head is up once its GCS port answers
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the test's Ray head did not start within 60 s")
        driver = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(DRIVER)], env=env, capture_output=True, text=True, timeout=120
        )
        assert driver.returncode == 0, driver.stderr[-2000:]
        gcs = driver.stdout.strip().splitlines()[-1]
        assert not gcs.endswith(f":{port}"), f"the driver joined the running head at {gcs}"
    finally:
        os.killpg(head.pid, 15)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


KILLED_DRIVER = """
import time
from ditcache.launch.ray_connect import connect
connect(None, 1, timeout_s=30)
print("connected", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_killed_driver_takes_its_local_cluster_with_it():
    temp_dir = tempfile.mkdtemp(prefix="rk_", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": temp_dir}
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_DRIVER)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert driver.stdout is not None and driver.stdout.readline().strip() == "connected"
        started = [p for p in psutil.Process(driver.pid).children(recursive=True)]
        names = {p.name() for p in started}
        assert {"gcs_server", "raylet"} <= names, names
        driver.kill()
        driver.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in started):
            time.sleep(0.5)
        left = [f"{p.pid} {p.name()}" for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not left, f"left running after the driver was killed: {left}"
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
