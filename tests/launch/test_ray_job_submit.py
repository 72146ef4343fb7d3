"""``ray job submit --working-dir`` of ``ditcache ray-generate`` to a local Ray head with its job
server (the dashboard): the job joins that cluster, serves every prompt and writes its record."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytest.importorskip("ray")

from ditcache.parallel.testing import free_port  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the environment's `ray` and `ditcache` commands
PROMPTS = ["a handwritten 1", "a handwritten 4", "a handwritten 7"]


def _job_server_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=5) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def _log_tail(temp_dir: Path, name: str, lines: int = 5) -> str:
    logs = sorted(temp_dir.glob(f"session_*/logs/{name}"))
    if not logs:
        return f"(no {name})"
    return " | ".join(logs[-1].read_text(errors="replace").strip().splitlines()[-lines:])


@pytest.fixture
def ray_head():
    """A Ray head on this machine with its dashboard (the job server) on free ports, started by
    ``ray start --block`` in its own session; yields (job server URL, env). Every process it started
    is ended on the way out, by pid. Skips, saying why, when the job server does not come up."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rj_", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    ports = {
        "--port": free_port(), "--dashboard-port": dashboard, "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(), "--object-manager-port": free_port(),
    }
    command = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
               "--dashboard-host", "127.0.0.1", "--temp-dir", str(temp_dir), "--disable-usage-stats",
               *(str(part) for option in ports.items() for part in option)]
    log = temp_dir / "ray-start.log"
    with log.open("wb") as sink:
        head = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    started: dict[int, psutil.Process] = {}
    try:
        deadline = time.monotonic() + 90
        while not _job_server_up(url) and head.poll() is None and time.monotonic() < deadline:
            started.update({p.pid: p for p in psutil.Process(head.pid).children(recursive=True)})
            time.sleep(0.5)
        if not _job_server_up(url):
            why = "exited" if head.poll() is not None else "did not answer within 90 s"
            pytest.skip(
                f"the Ray job server (dashboard) on this machine {why}: ray start: "
                f"{' | '.join(log.read_text(errors='replace').strip().splitlines()[-3:])}; dashboard.log: "
                f"{_log_tail(temp_dir, 'dashboard.log')}"
            )
        yield url, env
    finally:
        if head.poll() is None:
            started.update({p.pid: p for p in psutil.Process(head.pid).children(recursive=True)})
            head.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
            try:
                head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                head.kill()
        _, alive = psutil.wait_procs(list(started.values()), timeout=30)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not alive, f"processes of the Ray head left running: {[p.pid for p in alive]}"


def test_ray_job_submit_runs_ray_generate_on_the_cluster(ray_head, tmp_path):
    url, env = ray_head
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    (working_dir / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "out"
    command = [
        str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", str(working_dir), "--",
        "ditcache", "ray-generate", "--model", "reference", "--steps", "8", "--prompts-file", "prompts.txt",
        "--output-dir", str(out), "--ranks", "2", "--cpus-per-rank", "0.5", "--no-progress", "--load-timeout", "180",
    ]
    try:
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"ray job submit did not finish within 300 s: {exc.stdout!r}")
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs
    assert "succeeded" in logs, logs
    assert "3 request(s) done on 2 replica(s) x 1 rank(s)" in logs, logs
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "done" and record["layout"]["replicas"] == 2
    assert [r["prompt"] for r in record["requests"]] == PROMPTS
    assert record["model_loads"] == {"0": 1, "1": 1}
    for i, request in enumerate(record["requests"]):
        assert request["status"] == "done" and Path(request["output"]).stat().st_size > 0
        assert Path(request["output"]).name.startswith(f"{i:03d}-a-handwritten-")
