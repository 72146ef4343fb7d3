"""``ditcache serve`` on a local 2-CPU Ray cluster, driven over real HTTP on localhost: concurrent
requests on two replica groups (a CFG pair each), a bad field answered 4xx naming it, outputs equal
to ``ditcache generate``'s, and a killed rank answered 5xx while its group restarts and recovers."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")

from ditcache.launch import generate, serve  # noqa: E402  (after the skips: it imports Ray Serve)
from ditcache.parallel.testing import free_port  # noqa: E402
from ray_local import local_cluster  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL_ARGS = ["--model", "reference", "--model-type", "Wan2.1-T2V-1.3B", "--timeout", "30"]
IMAGES, VIDEOS = "/v1/images/generations", "/v1/videos/generations"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with local_cluster("rs_"):
        yield


def _call(url: str, body: dict[str, Any] | None = None, timeout_s: float = 180) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of a GET (``body`` None) or a JSON POST."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, _json(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())


def _json(raw: bytes) -> dict[str, Any]:
    """The body as JSON; Serve's proxy answers in plain text while the application is not up yet."""
    try:
        return json.loads(raw)
    except ValueError:
        return {"detail": raw.decode(errors="replace")}


def _concurrently(calls: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: _call(*call), calls))


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:g} s waiting for {what}"
        time.sleep(0.5)


def _healthy(url: str, server: subprocess.Popen) -> bool:
    if server.poll() is not None:
        return True  # exited: the assertion after the wait reports it
    try:
        return _call(f"{url}/health", timeout_s=10)[0] == 200
    except OSError:  # not listening yet
        return False


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_http_service_serves_concurrent_requests_refuses_bad_fields_and_recovers_a_killed_rank(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    address = ray.get_runtime_context().gcs_address
    argv = [
        *MODEL_ARGS, "--address", address, "--port", str(port), "--replicas", "2", "--cfg-parallel", "2",
        "--cpus-per-rank", "0.5", "--request-timeout", "60", "--load-timeout", "180",
        "--output-dir", str(tmp_path / "out"),
    ]
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "ditcache.launch.serve", *argv], env=env, stdout=sink,
                                  stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: _healthy(url, server), 240, "GET /health to answer 200")
        assert server.poll() is None, log.read_text()
        status, health = _call(f"{url}/health")
        assert status == 200 and health["status"] == "ok", health
        assert health["groups"]["running"] == 2 and health["ranks_per_group"] == 2

        image = {"prompt": "a handwritten 3", "steps": 8}
        video = {"prompt": "a handwritten 5", "steps": 4, "frames": 3, "size": "16x16", "cache": "none"}
        to_file = {"prompt": "a handwritten 7", "steps": 8, "response_format": "path",
                   "cache_options": {"n_derivatives": 0}}
        bad = {"prompt": "a handwritten 1", "steps": 0}
        replies = _concurrently([(f"{url}{IMAGES}", image), (f"{url}{VIDEOS}", video), (f"{url}{IMAGES}", to_file),
                                 (f"{url}{IMAGES}", bad)])
        assert [status for status, _ in replies] == [200, 200, 200, 422], replies
        assert replies[3][1]["detail"].startswith("steps: "), replies[3]
        for _, body in replies[:3]:
            telemetry = body["telemetry"]
            assert telemetry["rank_model_loads"] == {"0": 1, "1": 1} and telemetry["group_starts"] == 1
            assert set(telemetry["cache"]["branches"]) == {"cond", "uncond"}  # the cfg pair's both branches
        assert {body["telemetry"]["group"] for _, body in replies[:3]} == {0, 1}  # both groups served

        # The image equals `ditcache generate`'s for the same prompt and seed; the cache skipped steps.
        single = generate.run(generate.build_parser().parse_args(
            [*MODEL_ARGS, "--steps", "8", "--prompt", image["prompt"], "--output", str(tmp_path / "single.png")]
        ))
        served = replies[0][1]
        assert served["data"][0]["format"] == "png"
        difference = _pixels(base64.b64decode(served["data"][0]["b64_json"])) - _pixels(single.path.read_bytes())
        assert np.abs(difference).max() <= 1  # a 1e-4 float difference may round to the next 8-bit level
        assert served["telemetry"]["summary"].split(" | ")[:3] == single.output.summary().split(" | ")[:3]
        assert "4 skipped" in served["telemetry"]["summary"]
        mp4 = base64.b64decode(replies[1][1]["data"][0]["b64_json"])
        assert replies[1][1]["data"][0]["format"] == "mp4" and mp4[4:8] == b"ftyp"
        assert "0 skipped" in replies[1][1]["telemetry"]["summary"]  # "cache": "none"
        written = Path(replies[2][1]["data"][0]["path"])
        assert written.parent == (tmp_path / "out").resolve() and written.stat().st_size > 0

        # Values refused before any rank runs, and one every rank refuses (the group stays up).
        status, body = _call(f"{url}{IMAGES}", {"prompt": "a handwritten 2", "cache": "nope"})
        assert status == 400 and body["detail"].startswith("cache: unknown --cache 'nope'"), body
        status, body = _call(f"{url}{IMAGES}", {"prompt": "a handwritten 2", "size": "17x16", "steps": 2})
        assert status == 400 and "width=17 is not divisible by 2" in body["detail"], body
        status, body = _call(f"{url}{IMAGES}", {"prompt": "a handwritten 2", "bogus": 1, "guidance": 0.5})
        assert status == 422 and "bogus: Extra inputs are not permitted" in body["detail"], body
        assert "guidance: Value error, 0.5 must be finite and >= 1" in body["detail"], body

        # SIGKILL rank 1 of one group: its next request is a 500 naming the rank, the other group
        # keeps serving, and the group comes back with new, freshly loaded ranks.
        killed = served["telemetry"]["group"]
        old_pids = served["telemetry"]["rank_pids"]
        os.kill(int(old_pids["1"]), signal.SIGKILL)
        failed: list[dict[str, Any]] = []

        def saw_failure() -> bool:
            for status, body in _concurrently([(f"{url}{IMAGES}", image)] * 2):
                assert status in (200, 500), body
                if status == 500:
                    failed.append(body)
            return bool(failed)

        _wait_for(saw_failure, 120, "the request on the group with the killed rank")
        assert failed[0]["detail"].startswith(
            f"rank 1 failed on request 'a handwritten 3' on group {killed}: its actor process died"
        ), failed[0]
        assert failed[0]["detail"].endswith(f"group {killed} is restarting (its model reloads)")
        recovered: list[dict[str, Any]] = []

        def served_by_restarted_group() -> bool:
            for status, body in _concurrently([(f"{url}{IMAGES}", image)] * 2):
                assert status == 200, body
                if body["telemetry"]["group"] == killed:
                    recovered.append(body["telemetry"])
            return bool(recovered)

        _wait_for(served_by_restarted_group, 180, "the restarted group to serve again")
        assert recovered[0]["group_starts"] == 2 and recovered[0]["rank_model_loads"] == {"0": 1, "1": 1}
        assert set(recovered[0]["rank_pids"].values()).isdisjoint(old_pids.values())
        assert _call(f"{url}/health")[0] == 200
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            code = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert code == 0, log.read_text()
    assert "serving reference at" in log.read_text()
    assert not serve_running(), "the service was not shut down"


def serve_running() -> bool:
    """Whether the cluster still has a Serve controller (the named actor ``serve.shutdown()`` kills)."""
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def test_argument_errors_exit_2_before_starting_anything(tmp_path, capsys):
    assert serve.main(["--model", "sd15"]) == 2
    assert "unknown --model 'sd15'" in capsys.readouterr().err
    assert serve.main(["--replicas", "0"]) == 2
    assert "--replicas must be >= 1" in capsys.readouterr().err
    assert serve.main(["--cache", "nope"]) == 2
    assert "unknown --cache 'nope'" in capsys.readouterr().err
