"""``ditcache generate`` under CFG-parallel 2 with one rank started differently: both ranks fail before
step 0 with the same one-line error naming what differs, and nothing is written.

Each case runs the real launcher on two gloo ranks (the arguments of rank 1 altered), so the
fingerprint is built by the pipeline from what the rank really parsed and loaded.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ditcache.launch import generate
from ditcache.params.userdir import PARAMS_DIR_ENV, SHIPPED_PARAMS_DIR
from ditcache.parallel.testing import run_ranks

pytestmark = pytest.mark.distributed

COMMON = ["--model", "reference", "--steps", "6", "--cfg-parallel", "2", "--no-progress", "--timeout", "30"]


def _generate(rank: int, world: int, out: str, rank1_args: list[str], rank1_params_dir: str | None) -> str:
    """One rank of ``ditcache generate``; rank 1 gets extra arguments (and maybe a params dir)."""
    extra = rank1_args if rank == 1 else []
    if rank == 1 and rank1_params_dir:
        os.environ[PARAMS_DIR_ENV] = rank1_params_dir
    args = generate.build_parser().parse_args([*COMMON, "--output", out, *extra])
    return generate.run(args).output.summary()


def _user_params(tmp_path: Path) -> Path:
    """A user params dir holding another Reference-Digits curve (thresh changed), as on one node only."""
    folder = tmp_path / "params"
    folder.mkdir()
    params = json.loads((SHIPPED_PARAMS_DIR / "Reference-Digits.json").read_text())
    params["thresh"] = params["thresh"] * 2
    (folder / "Reference-Digits.json").write_text(json.dumps(params))
    return folder


# case -> (rank 1's extra arguments, the field the error must name)
CASES = {
    "seed": (["--seed", "7"], "seed differs"),
    "guidance": (["--guidance-scale", "3.0"], "guidance_scale differs"),
    "cache": (["--cache", "none"], "cache differs"),
    "steps": (["--steps", "8"], "num_inference_steps differs"),
    "prompts": (["--prompt", "a handwritten 1"], "prompt_hash differs"),
    "params dir": ([], "params_hash differs"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_rank_started_differently_fails_both_before_step_0(case, tmp_path):
    rank1_args, named = CASES[case]
    params_dir = str(_user_params(tmp_path)) if case == "params dir" else None
    out = tmp_path / "out.png"
    started = time.monotonic()
    outcomes = run_ranks(_generate, 2, str(out), rank1_args, params_dir, timeout_s=120)
    elapsed = time.monotonic() - started
    assert [o.error_type for o in outcomes] == ["RequestMismatchError"] * 2, [o.traceback or o.value for o in outcomes]
    first = outcomes[0].error
    assert all(o.error == first for o in outcomes), [o.error for o in outcomes]
    assert first.startswith("ranks disagree on the request before step 0: ") and named in first, first
    assert "\n" not in first
    assert not out.exists()
    assert elapsed < 60, f"the mismatch took {elapsed:.0f} s to surface (the collective timeout is 30 s)"


def test_ranks_that_agree_generate(tmp_path):
    out = tmp_path / "out.png"
    outcomes = run_ranks(_generate, 2, str(out), [], None, timeout_s=120)
    assert all(o.ok for o in outcomes), [o.traceback for o in outcomes]
    assert "cfg 2" in outcomes[0].value and out.exists()


def _generate_moe(rank: int, world: int, out: str) -> str:
    """One rank of ``ditcache generate`` on the two-expert model; rank 1 guides the low-noise steps otherwise."""
    extra = ["--guidance-scale-2", "2.0"] if rank == 1 else []
    args = generate.build_parser().parse_args([*COMMON, "--model", "reference-moe", "--output", out, *extra])
    return generate.run(args).output.summary()


def test_a_rank_with_another_guidance_scale_2_fails_both_before_step_0(tmp_path):
    out = tmp_path / "out.png"
    outcomes = run_ranks(_generate_moe, 2, str(out), timeout_s=120)
    assert [o.error_type for o in outcomes] == ["RequestMismatchError"] * 2, [o.traceback or o.value for o in outcomes]
    assert "guidance_scale_2 differs (rank 0: 4.0; rank 1: 2.0)" in outcomes[0].error, outcomes[0].error
    assert not out.exists()
