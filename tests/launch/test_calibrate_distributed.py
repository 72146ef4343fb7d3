"""``ditcache calibrate`` on 1, 2 and 4 ranks over the same prompts writes the same curve, once.

Every layout runs the real entry (``calibrate.run``) on a tiny pixel-space model directory with 15
image tokens (the SP shards are 8 + 7): CFG-parallel ranks each measure one branch, SP ranks (Ulysses or ring) their
shard, data-parallel replicas half of the prompt batches; one all-reduce pools the sums and counts,
rank 0 writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import torchrun, write_tiny_digit_model

from ditcache.launch import calibrate
from ditcache.parallel.testing import run_ranks, values_or_raise

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PROMPTS = ["a handwritten 3", "seven", "digit 1", "a handwritten 8"]  # 4 batches of 1
# name -> (world, cfg, ulysses, ring): replicas are what is left, world / (cfg x ulysses x ring)
LAYOUTS = {"cfg2": (2, 2, 1, 1), "dp2_sp2": (4, 1, 2, 1), "dp2_cfg2": (4, 2, 1, 1), "ring2": (2, 1, 1, 2)}


def _args(model: Path, output: Path, *extra: str) -> list[str]:
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return ["--model", "wan", "--model-dir", str(model), "--steps", "6", "--batch-size", "1", "--no-progress",
            "--model-name", "Tiny-Digits", "--output", str(output), *prompts, *extra]


def _calibrate(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    path, data = calibrate.run(calibrate.build_parser().parse_args(argv))
    return (None if path is None else str(path)), data


def _rank_job(rank: int, world: int, model: str, out_dir: str, cfg: int, ulysses: int, ring: int) -> dict[str, Any]:
    parallel = ["--cfg-parallel", str(cfg), "--ulysses", str(ulysses), "--ring", str(ring), "--timeout", "180"]
    result = {"guided": _calibrate(_args(Path(model), Path(out_dir) / "guided.json", *parallel))}
    if cfg == 1:  # guidance off: no uncond branch anywhere (and none to give a CFG partner)
        off = _args(Path(model), Path(out_dir) / "off.json", "--guidance-scale", "1", *parallel)
        result["guidance_off"] = _calibrate(off)
    return result


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_tiny_digit_model(tmp_path_factory.mktemp("tiny-digits"))


@pytest.fixture(scope="module")
def single(model, tmp_path_factory) -> dict[str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("single")
    return {
        "guided": _calibrate(_args(model, out / "guided.json"))[1],
        "guidance_off": _calibrate(_args(model, out / "off.json", "--guidance-scale", "1"))[1],
    }


def _max_curve_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    return max(
        abs(x - y) for key in ("cond_mag_ratios", "uncond_mag_ratios") for x, y in zip(a[key], b[key], strict=True)
    )


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_writes_the_single_process_curve_once(name, model, single, tmp_path):
    world, cfg, ulysses, ring = LAYOUTS[name]
    ranks = values_or_raise(run_ranks(_rank_job, world, str(model), str(tmp_path), cfg, ulysses, ring, timeout_s=420))
    runs = ["guided", "guidance_off"] if cfg == 1 else ["guided"]
    for run in runs:
        paths = [r[run][0] for r in ranks]
        assert paths[0] is not None and paths[1:] == [None] * (world - 1)  # one writer: rank 0
        written = json.loads(Path(paths[0]).read_text())
        diff = _max_curve_diff(written, single[run])
        print(f"{name} {run}: max curve diff vs 1 rank {diff:.1e}")
        assert diff <= 1e-6
        assert written["provenance"]["requests"] == single[run]["provenance"]["requests"]
        assert written["provenance"]["tokens_per_step"] == single[run]["provenance"]["tokens_per_step"]
        for r in ranks[1:]:  # every rank ends with the pooled statistics
            assert _max_curve_diff(r[run][1], written) == 0.0
    if cfg == 1:
        off = json.loads(Path(ranks[0]["guidance_off"][0]).read_text())
        assert "no uncond pass ran" in off["provenance"]["uncond_from"]
    # Nothing else in the folder: the atomic write left no temp file behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{r}.json" for r in ("guided", "off")[: len(runs)])


@pytest.mark.parametrize("layout", [["--cfg-parallel", "2"], []], ids=["cfg2", "dp2"])
def test_torchrun_auto_tune_chooses_what_one_process_chooses(model, tmp_path, layout):
    """The tuner's check runs (every forecast's plan, run on the recorded prompts) are measured over
    the CFG pair or over the replicas' prompts and pooled: two ranks choose and write what one does."""
    tune = ["--target-speedup", "2", "--tune-prompts", str(len(PROMPTS))]
    _, alone = _calibrate(_args(model, tmp_path / "alone.json", *tune))
    out = tmp_path / "tuned.json"
    run = torchrun("calibrate.py", 2, *_args(model, out, *layout, *tune))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 1 and f"wrote {out}" in run.stdout
    data = json.loads(out.read_text())
    assert data["provenance"]["requests"] == {"cond": len(PROMPTS), "uncond": len(PROMPTS)}
    assert data["forecast"] == alone["forecast"] and data.get("compute_steps") == alone.get("compute_steps")
    checked = data["provenance"]["tuned"]["forecasts_checked"]
    expected = alone["provenance"]["tuned"]["forecasts_checked"]
    assert len(checked) == len(expected) > 1
    for mine, theirs in zip(checked, expected):
        assert mine["check_mse"] == pytest.approx(theirs["check_mse"], rel=1e-4)
