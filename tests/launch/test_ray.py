"""``ditcache ray-generate`` on one local Ray cluster: same output as ``ditcache generate``, and a
rank that raises, dies or hangs fails the job with a message naming it, within the timeout."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from ditcache.launch import generate, ray_generate  # noqa: E402  (after the skip: it imports ray)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PROMPTS = ["a handwritten 3", "a handwritten 7"]
BOOM = "a handwritten 9"  # the request on which a faulty entry fails


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local 2-CPU cluster for the module (short temp dir: Ray's socket paths have a length limit)."""
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    yield
    ray.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE")
    else:
        os.environ["RAY_AUTH_MODE"] = saved
    shutil.rmtree(temp_dir, ignore_errors=True)


# The bundled reference model, 8 steps, cache on with the shipped Wan2.1-T2V-1.3B params (it has none
# of its own yet), so the telemetry has skipped steps.
MODEL_ARGS = [
    "--model", "reference", "--steps", "8", "--model-type", "Wan2.1-T2V-1.3B", "--no-progress", "--timeout", "30"
]


def _prompts(args: list[str], prompts: list[str]) -> list[str]:
    return [*args, *(a for p in prompts for a in ("--prompt", p))]


def _placement_released() -> bool:
    """Every placement group removed and both CPUs free again (teardown is asynchronous)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        groups = ray.util.placement_group_table().values()
        if all(g["state"] == "REMOVED" for g in groups) and ray.available_resources().get("CPU") == 2:
            return True
        time.sleep(0.2)
    return False


# --ranks 2 as one CFG pair (two requests one after the other) or as two replicas (one request each)
LAYOUTS = {"cfg-pair": ["--cfg-parallel", "2"], "two-replicas": []}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_actor_job_matches_single_process_runs(layout, tmp_path):
    args = ray_generate.build_parser().parse_args(
        _prompts(
            [*MODEL_ARGS, *LAYOUTS[layout], "--ranks", "2", "--output-dir", str(tmp_path / "ray"),
             "--request-timeout", "120"],
            PROMPTS,
        )
    )
    job = ray_generate.run(args, keep_frames=True)
    assert [r.label for r in job.results] == PROMPTS
    assert {r.replica for r in job.results} == ({0} if layout == "cfg-pair" else {0, 1})
    assert [Path(r.path).name for r in job.results] == ["000-a-handwritten-3.png", "001-a-handwritten-7.png"]
    written = json.loads(job.results_file.read_text())

    for i, (prompt, result) in enumerate(zip(PROMPTS, job.results)):
        single_args = [*MODEL_ARGS, "--prompt", prompt, "--output", str(tmp_path / f"{i}.png")]
        single = generate.run(generate.build_parser().parse_args(single_args))
        torch.testing.assert_close(result.output.frames, single.output.frames, atol=1e-4, rtol=0)
        assert result.output.stack_passes == single.output.stack_passes
        assert result.output.cache_stats == single.output.cache_stats
        assert written[i]["summary"] == result.output.summary() and written[i]["path"] == result.path
        assert written[i]["stack_passes"] == single.output.stack_passes
        assert Path(result.path).stat().st_size > 0
        if layout == "cfg-pair":  # the cfg pair exchanged telemetry: rank 0 reports both branches
            assert set(result.rank_wall_time_s) == {0, 1} and set(result.output.branch_steps) == {"cond", "uncond"}
    # the cache did something, and the telemetry says so
    assert "4 skipped" in job.results[0].output.summary()
    assert _placement_released()


FAULTY_ENTRY = '''
import itertools, os, time
from ditcache.parallel.groups import Group
from ditcache.launch.ray_cluster import load_entry

def run(args):
    # On the BOOM request the last rank fails: at its third all-gather (mid-run, its CFG partner
    # waiting in the same collective) or, with no peer, as it starts. Every other rank generates.
    if args.prompt == [{boom}] and os.environ["RANK"] == str(int(os.environ["WORLD_SIZE"]) - 1):
        calls, all_gather = itertools.count(1), Group.all_gather

        def fail(*_):
            {fault}

        if os.environ["WORLD_SIZE"] == "1":
            fail()
        Group.all_gather = lambda *a, **k: fail() if next(calls) == 3 else all_gather(*a, **k)
    return load_entry("ditcache.launch.generate:run")(args)
'''
# fault -> (the fault, the job: layout and prompts, a pattern for what the job's error says)
FAULTS = {
    "raise": (
        'raise ValueError("exploded on purpose")', ["--cfg-parallel", "2", "--ranks", "2"], [PROMPTS[0], BOOM],
        # rank 0 learns of it either from the step sync or from the closed connection, whichever is first
        re.escape("rank 1 failed on request 1 ('a handwritten 9'): ValueError: exploded on purpose; then rank 0: ")
        + "(StepSyncError|CollectiveError: .*a peer closed its connection)",
    ),
    "exit": (
        "os._exit(1)", ["--cfg-parallel", "2", "--ranks", "2"], [PROMPTS[0], BOOM],
        re.escape("rank 1 failed on request 1 ('a handwritten 9'): its actor process died"),
    ),
    # one rank: the deadline is the only thing that can end its request
    "hang": (
        "time.sleep(3600)", ["--ranks", "1"], [BOOM],
        re.escape("request 0 ('a handwritten 9') did not finish within 10 s: rank(s) [0] still running"),
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failing_rank_fails_the_job_naming_it(fault, tmp_path, capsys):
    code, layout, prompts, message = FAULTS[fault]
    entry = tmp_path / "faulty.py"
    entry.write_text(textwrap.dedent(FAULTY_ENTRY).replace("{fault}", code).replace("{boom}", repr(BOOM)))
    timeout = 10 if fault == "hang" else 60
    argv = _prompts(
        [*MODEL_ARGS, *layout, "--output-dir", str(tmp_path / "out"), "--entry", f"{entry}:run",
         "--request-timeout", str(timeout)],
        prompts,
    )
    started = time.monotonic()
    assert ray_generate.main(argv) == 1
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()
    # A hang ends at the deadline (plus actor startup); a death or exception ends the job before its
    # request's deadline could have passed (and the message above is the rank's, not a timeout).
    assert timeout <= elapsed < timeout + 30 if fault == "hang" else elapsed < timeout, elapsed
    assert _placement_released()


PROCESS_GROUP_ENTRY = '''
import json, os, types
from pathlib import Path
import torch
from ditcache.parallel import destroy_parallel, init_parallel
from ditcache.runtime.denoise import GenerationOutput

def run(args):
    # what torchrun would give generate.py: a CFG pair that all-gathers, then tears the group down
    groups = init_parallel(cfg_degree=2, timeout_s=20)
    gathered = [int(r) for r in groups.cfg.all_gather(torch.tensor([groups.rank]))]
    destroy_parallel(groups)
    env = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    Path(args.output + f".rank{groups.rank}.json").write_text(json.dumps([gathered, env]))
    output = GenerationOutput(
        frames=torch.zeros(1, 1, 1, 1, 1), cache_stats={}, stack_passes={"transformer": {"cond": 3, "uncond": 4}},
        branch_steps={"cond": 5, "uncond": 5}, expert_steps={}, cache_memory_bytes={"transformer": 10 + groups.rank},
        sigmas=[], timesteps=[], wall_time_s=1.0 + groups.rank,
    )
    return types.SimpleNamespace(output=output, path=args.output if groups.rank == 0 else "not rank 0")
'''


def test_cfg_pair_forms_a_process_group_per_request(tmp_path):
    from argparse import Namespace

    from ditcache.parallel.config import ParallelConfig
    from ditcache.launch.ray_cluster import RayRanks, Request

    entry = tmp_path / "pg.py"
    entry.write_text(PROCESS_GROUP_ENTRY)
    requests = [Request(f"r{i}", Namespace(output=str(tmp_path / f"out-{i}"))) for i in range(2)]
    with RayRanks(ParallelConfig(cfg_degree=2, world_size=2), entry=f"{entry}:run") as ranks:
        ranks.start(timeout_s=60)
        results = ranks.run(requests, timeout_s=60)  # the second request re-forms the torn-down group
    assert [Path(r.path).name for r in results] == ["out-0", "out-1"] and {r.replica for r in results} == {0}
    for i, rank in ((i, rank) for i in range(2) for rank in range(2)):
        gathered, env = json.loads((tmp_path / f"out-{i}.rank{rank}.json").read_text())
        assert gathered == [0, 1]
        assert env == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert results[1].output.stack_passes == {"transformer": {"cond": 3, "uncond": 4}}
    assert results[1].output.wall_time_s == 1.0 and results[1].rank_wall_time_s == {0: 1.0, 1: 2.0}
    assert results[1].rank_cache_memory_bytes == {0: {"transformer": 10}, 1: {"transformer": 11}}
    assert _placement_released()


def test_argument_errors_exit_2_before_starting_ranks(tmp_path, capsys):
    assert ray_generate.main(["--model", "sd15", "--prompt", "x", "--output-dir", str(tmp_path)]) == 2
    assert "unknown --model 'sd15'" in capsys.readouterr().err
    missing = tmp_path / "none.txt"
    assert ray_generate.main(["--prompts-file", str(missing), "--output-dir", str(tmp_path)]) == 2
    assert f"--prompts-file {missing} does not exist" in capsys.readouterr().err
    assert ray_generate.main(["--prompt", "a 3", "--output", str(tmp_path / "x.png")]) == 2
    assert "--output-dir" in capsys.readouterr().err
