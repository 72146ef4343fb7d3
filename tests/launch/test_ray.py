"""``ditcache ray-generate`` on one local 2-CPU Ray cluster: replicas load the model once and serve
many requests with the same outputs as ``ditcache generate``; a rank that dies, raises or overruns
fails only its attempt (the replica restarts, the request is retried elsewhere); a killed job resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ditcache.launch import generate, ray_generate  # noqa: E402  (after the skip: it imports ray)
from ray_local import gone, local_cluster  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DIGITS = [f"a handwritten {d}" for d in range(10)]
BOOM = "a handwritten 9"  # the request a fault plan targets
RAISES = "a handwritten 8"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    with local_cluster("rt_"):
        yield


# The bundled reference model, 8 steps, cache on with the shipped Wan2.1-T2V-1.3B params, so the
# telemetry has skipped steps.
MODEL_ARGS = [
    "--model", "reference", "--steps", "8", "--model-type", "Wan2.1-T2V-1.3B", "--no-progress", "--timeout", "30",
]
# Two replicas on the 2-CPU cluster: fractions of a CPU per rank.
CFG_REPLICAS = ["--cfg-parallel", "2", "--ranks", "4", "--cpus-per-rank", "0.5"]
ONE_RANK_REPLICAS = ["--ranks", "2", "--cpus-per-rank", "0.5"]


def _argv(args: list[str], prompts: list[str], out: Path, *extra: str) -> list[str]:
    return [*MODEL_ARGS, *args, "--output-dir", str(out), "--load-timeout", "180", *extra,
            *(a for p in prompts for a in ("--prompt", p))]


def _parse(argv: list[str]):
    return ray_generate.build_parser().parse_args(argv)


def _placement_released() -> bool:
    """Every placement group removed and both CPUs free again (teardown is asynchronous)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        groups = ray.util.placement_group_table().values()
        if all(g["state"] == "REMOVED" for g in groups) and ray.available_resources().get("CPU") == 2:
            return True
        time.sleep(0.2)
    return False


_SINGLE: dict[str, generate.RunResult] = {}


def _single_process(prompt: str, tmp_path: Path) -> generate.RunResult:
    """``ditcache generate --prompt prompt`` (same seed) in this process, once per prompt."""
    if prompt not in _SINGLE:
        argv = [*MODEL_ARGS, "--prompt", prompt, "--output", str(tmp_path / f"single-{len(_SINGLE)}.png")]
        _SINGLE[prompt] = generate.run(generate.build_parser().parse_args(argv))
    return _SINGLE[prompt]


def _assert_matches_single_process(result, tmp_path: Path) -> None:
    single = _single_process(result.label, tmp_path)
    torch.testing.assert_close(result.output.frames, single.output.frames, atol=1e-4, rtol=0)
    assert result.output.stack_passes == single.output.stack_passes
    assert result.output.cache_stats == single.output.cache_stats


# A RankServer whose serve() runs the fault the plan beside this file names for the request's prompt,
# on the plan's replica rank; "once" faults fire on the first attempt of the whole job only.
FAULTY_ENTRY = '''
import itertools, json, os, signal, time
from pathlib import Path
from ditcache.launch.ray_rank import RankServer
from ditcache.parallel.groups import Group

PLAN = Path(__file__).with_suffix(".json")


def explode():
    raise ValueError("exploded on purpose")


FAULTS = {
    "raise": explode,
    "sigkill": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "hang": lambda: time.sleep(3600),
    "sigstop": lambda: os.kill(os.getpid(), signal.SIGSTOP),
}


class Server(RankServer):
    def serve(self, args):
        plan = json.loads(PLAN.read_text()).get(args.prompt[0])
        if not plan or os.environ["RANK"] != str(plan["rank"]) or not self.arm(plan, args.prompt[0]):
            return super().serve(args)
        fault = FAULTS[plan["fault"]]
        if self.groups.config.world_size == 1:
            fault()
        # mid-request: at this rank's third all-gather, its CFG partner waiting in the same collective
        calls, all_gather = itertools.count(1), Group.all_gather
        Group.all_gather = lambda *a, **k: fault() if next(calls) == 3 else all_gather(*a, **k)
        try:
            return super().serve(args)
        finally:
            Group.all_gather = all_gather

    def arm(self, plan, prompt):
        if not plan.get("once"):
            return True
        try:
            os.close(os.open(PLAN.with_name(prompt.replace(" ", "-") + ".fired"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            return False
'''


def _faulty_entry(tmp_path: Path, plan: dict) -> str:
    entry = tmp_path / "faulty.py"
    entry.write_text(textwrap.dedent(FAULTY_ENTRY))
    entry.with_suffix(".json").write_text(json.dumps(plan))
    return f"{entry}:Server"


def test_twelve_requests_on_two_cfg_replicas_match_single_process_runs_through_a_killed_rank(tmp_path):
    """12 requests on 2 replicas of a CFG pair each; one request's rank 1 is SIGKILLed at its third
    all-gather: that attempt fails naming the rank, the request succeeds on the other replica, the
    killed replica restarts (loading its model again) and the job completes."""
    # BOOM first, so the killed replica's restart overlaps the other's work; two prompts repeat (each
    # request still gets its own file)
    prompts = [BOOM, *DIGITS[:9], DIGITS[0], DIGITS[1]]
    entry = _faulty_entry(tmp_path, {BOOM: {"fault": "sigkill", "rank": 1, "once": True}})
    job = ray_generate.run(
        _parse(_argv(CFG_REPLICAS, prompts, tmp_path / "ray", "--entry", entry, "--request-timeout", "60")),
        keep_frames=True,
    )
    assert [r.label for r in job.results] == prompts and job.record.status == "done"
    assert [Path(r.path).name for r in job.results][:2] == ["000-a-handwritten-9.png", "001-a-handwritten-0.png"]
    written = json.loads(job.results_file.read_text())
    assert written["status"] == "done"
    assert written["layout"] == {"replicas": 2, "ranks_per_replica": 2, "cfg": 2, "sp": 1, "ring": 1}
    for result, entry_record in zip(job.results, written["requests"]):
        _assert_matches_single_process(result, tmp_path)
        assert entry_record["status"] == "done"
        assert entry_record["result"]["summary"] == result.output.summary()
        assert entry_record["result"]["path"] == result.path and Path(result.path).stat().st_size > 0
        # the cfg pair exchanged telemetry: the replica's rank 0 reports both branches
        assert len(result.rank_wall_time_s) == 2 and set(result.output.branch_steps) == {"cond", "uncond"}
        # serving never loads: every rank still counts the one model it loaded at start
        assert set(result.rank_model_loads.values()) == {1}
    assert "4 skipped" in job.results[0].output.summary()  # the cache did something

    boom = job.record.requests[0]
    first, second = boom.attempts
    killed = first.replica
    assert first.status == "failed" and second.status == "done" and second.replica == 1 - killed
    assert first.error.startswith(
        f"rank {2 * killed + 1} failed on request 0 ('{BOOM}') on replica {killed}: its actor process died"
    ), first.error
    assert all(len(r.attempts) == 1 for r in job.record.requests if r.prompt != BOOM)
    # Every rank process loaded its model exactly once: the killed replica's two processes per rank
    # (before and after the restart) count 2 per global rank, the other replica's 1.
    assert set(job.record.loads.values()) == {1} and len(job.record.loads) == 6
    assert job.record.replica_starts == {killed: 2, 1 - killed: 1}
    loads = {2 * killed: 2, 2 * killed + 1: 2, 2 * (1 - killed): 1, 2 * (1 - killed) + 1: 1}
    assert job.record.model_loads() == dict(sorted(loads.items()))
    assert written["model_loads"] == {str(r): n for r, n in sorted(loads.items())}
    assert gone({pid for _, pid in job.record.loads})
    assert _placement_released()


def test_request_over_timeout_or_raising_fails_with_its_message_and_the_others_complete(tmp_path, capsys):
    """With --retries 0: a request that hangs past --request-timeout and one whose rank raises each
    fail once with their message (their replicas restart); the other requests complete."""
    entry = _faulty_entry(tmp_path, {BOOM: {"fault": "hang", "rank": 0}, RAISES: {"fault": "raise", "rank": 0}})
    prompts = [DIGITS[0], BOOM, RAISES, DIGITS[1], DIGITS[2]]
    started = time.monotonic()
    code = ray_generate.main(_argv(ONE_RANK_REPLICAS, prompts, tmp_path / "out", "--entry", entry,
                                   "--request-timeout", "6", "--retries", "0"))
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == 1, err
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert record["status"] == "failed"
    assert [r["status"] for r in record["requests"]] == ["done", "failed", "failed", "done", "done"]
    (hung,), (raised,) = record["requests"][1]["attempts"], record["requests"][2]["attempts"]
    assert hung["error"] == (
        f"request 1 ('{BOOM}') did not finish within 6 s on replica {hung['replica']}: "
        f"rank(s) [{hung['replica']}] still running"
    )
    assert raised["error"] == (
        f"rank {raised['replica']} failed on request 2 ('{RAISES}') on replica {raised['replica']}: "
        "ValueError: exploded on purpose"
    )
    assert f"error: request 1 ('{BOOM}') failed: request 1 ('{BOOM}') did not finish within 6 s" in err
    assert f"error: request 2 ('{RAISES}') failed: rank " in err and "Traceback" not in err
    assert "3 request(s) done on 2 replica(s) x 1 rank(s)" in out and "2 failed" in out
    # two failed attempts, two restarts; the deadline, not the hang, ended the job
    assert sum(record["replica_starts"].values()) == 4
    assert elapsed < 150, elapsed
    assert _placement_released()


def test_a_stopped_rank_is_named_not_the_partner_that_timed_out_waiting_for_it(tmp_path):
    """Rank 0 of a CFG pair is SIGSTOPped mid-request: its partner's collective times out, and the
    attempt's error names rank 0 as the one that stopped responding."""
    entry = _faulty_entry(tmp_path, {BOOM: {"fault": "sigstop", "rank": 0}})
    args = [arg if arg != "30" else "4" for arg in MODEL_ARGS]  # --timeout 4: collectives give up fast
    argv = [*args, *CFG_REPLICAS[:2], "--ranks", "2", "--cpus-per-rank", "1", "--output-dir", str(tmp_path / "out"),
            "--load-timeout", "180", "--entry", entry, "--request-timeout", "60", "--retries", "0", "--prompt", BOOM]
    started = time.monotonic()
    code = ray_generate.main(argv)
    assert code == 1
    (attempt,) = json.loads((tmp_path / "out" / "results.json").read_text())["requests"][0]["attempts"]
    assert attempt["error"].startswith("rank(s) [0] stopped responding (neither finished nor failed"), attempt
    assert f"; rank 1 failed on request 0 ('{BOOM}') on replica 0: StepSyncError" in attempt["error"], attempt
    assert time.monotonic() - started < 120
    assert _placement_released()


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _status(results: Path) -> list[str]:
    try:
        return [r["status"] for r in json.loads(results.read_text())["requests"]]
    except (OSError, ValueError):
        return []


def test_resume_after_a_killed_job_runs_only_what_was_not_done(tmp_path):
    """The driver, run as its own process on this cluster, is SIGKILLed while a request hangs; the
    record it leaves says what was done, and --resume runs the rest (and a done request whose output
    went missing)."""
    prompts = [DIGITS[0], DIGITS[1], BOOM, DIGITS[3]]
    out = tmp_path / "out"
    entry = _faulty_entry(tmp_path, {BOOM: {"fault": "hang", "rank": 0}})
    argv = _argv(["--ranks", "1", "--cpus-per-rank", "0.5"], prompts, out, "--entry", entry)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    address = ray.get_runtime_context().gcs_address
    log = tmp_path / "driver.log"
    with log.open("wb") as sink:
        driver = subprocess.Popen(
            [sys.executable, "-m", "ditcache.launch.ray_generate", "--address", address, *argv],
            env=env, stdout=sink, stderr=subprocess.STDOUT,
        )
    try:
        _wait_for(lambda: _status(out / "results.json") == ["done", "done", "running", "pending"] or
                  driver.poll() is not None, 120, "the job to reach its hanging request")
        assert driver.poll() is None, log.read_text()
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    record = json.loads((out / "results.json").read_text())
    assert record["status"] == "running" and _status(out / "results.json") == ["done", "done", "running", "pending"]

    (out / "001-a-handwritten-1.png").unlink()  # done, but its output is gone: it runs again
    Path(entry.rpartition(":")[0]).with_suffix(".json").write_text("{}")  # no more hang
    job = ray_generate.run(_parse([*argv, "--resume", "--request-timeout", "60"]))
    assert [r.index for r in job.results] == [1, 2, 3]
    assert [(r.status, r.resumed) for r in job.record.requests] == [
        ("done", True), ("done", False), ("done", False), ("done", False)
    ]
    assert all(len(r.attempts) == 1 for r in job.record.requests)
    assert job.record.model_loads() == {0: 1}
    assert json.loads(job.results_file.read_text())["status"] == "done"
    assert all((out / f"{i:03d}-{ray_generate.slug(p)}.png").is_file() for i, p in enumerate(prompts))
    assert _placement_released()


def test_argument_errors_exit_2_before_starting_ranks(tmp_path, capsys):
    assert ray_generate.main(["--model", "sd15", "--prompt", "x", "--output-dir", str(tmp_path)]) == 2
    assert "unknown --model 'sd15'" in capsys.readouterr().err
    missing = tmp_path / "none.txt"
    assert ray_generate.main(["--prompts-file", str(missing), "--output-dir", str(tmp_path)]) == 2
    assert f"--prompts-file {missing} does not exist" in capsys.readouterr().err
    assert ray_generate.main(["--prompt", "a 3", "--output", str(tmp_path / "x.png")]) == 2
    assert "--output-dir" in capsys.readouterr().err
    (tmp_path / "000-a-3.png").write_bytes(b"")
    assert ray_generate.main(["--prompt", "a 3", "--output-dir", str(tmp_path)]) == 2
    assert "000-a-3.png already exists" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps({"settings": {"seed": "1"}, "requests": []}))
    assert ray_generate.main(["--prompt", "a 3", "--output-dir", str(tmp_path), "--resume"]) == 2
    assert "was written with other settings" in capsys.readouterr().err
