"""The quality benchmark: every method is the public pipeline call, the peers' rules and hooks do what
they claim, the end-to-end smoke run, and the matched-compute report."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ditcache
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE

from bench import peers
from bench.quality.calibration import calibrate
from bench.quality.metrics import BlockCounter, telemetry_block_calls
from bench.quality.report import matched_table, pareto_front
from bench.quality.runners import SMOKE_GRID, build_methods, hooked_run
from bench.quality.workload import CALIB_SEED, EVAL_SEED, Workload, make_batch, make_workload

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
REQUIRED_RUN_KEYS = {"method", "setting", "compute_fraction", "speedup", "psnr", "psnr_ci95", "ssim", "accuracy"}


def _present(path: Path, *marks: pytest.MarkDecorator):
    missing = pytest.mark.skipif(not (path / "model_index.json").is_file(), reason=f"{path.name} is not present")
    return pytest.param(path, marks=[missing, *marks], id=path.name)


@pytest.fixture(scope="module")
def base_work() -> Workload:
    if not (REFERENCE_DIGITS / "model_index.json").is_file():
        pytest.skip("the bundled reference model is not present")
    torch.set_num_threads(1)
    return make_workload(REFERENCE_DIGITS, REFERENCE_DIGITS.name, steps=10, shift=5.0, guidance=4.0)


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    if not (REFERENCE_DIGITS / "model_index.json").is_file():
        pytest.skip("the bundled reference model is not present")
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--smoke", "--threads", "1",
         "--out-json", str(out_json), "--out-png", str(out_png)],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert set(data) >= {"runs", "env", "screening", "matched"}
    assert out_png.stat().st_size > 0
    runs = data["runs"]
    assert runs and all(REQUIRED_RUN_KEYS <= set(r) for r in runs)
    for r in runs:
        assert isinstance(r["method"], str) and isinstance(r["setting"], dict)
        assert 0 < r["compute_fraction"] <= 1.0 + 1e-9
        assert r["speedup"] > 0 and 0 <= r["accuracy"] <= 1 and -1 <= r["ssim"] <= 1
        low, high = r["psnr_ci95"]
        assert low <= r["psnr"] + 1e-6 and r["psnr"] <= high + 1e-6
    (base,) = [r for r in runs if r["method"] == "uncached"]
    assert base["compute_fraction"] == 1.0
    assert base["psnr"] == max(r["psnr"] for r in runs) == data["env"]["psnr_cap_db"]
    assert base["ssim"] == 1.0 and base["speedup"] == 1.0
    methods = {r["method"] for r in runs}
    assert {"ditcache-ada_taylor-o1", "diffusers-fbc", "diffusers-magcache", "teacache", "first-block"} <= methods
    assert any(m.startswith("diffusers-taylorseer") for m in methods)
    assert any(r["compute_fraction"] < 1.0 for r in runs if r["method"].startswith("ditcache-"))
    env = data["env"]
    assert env["steps"] == 10 and env["samples_per_model"] == 4
    assert set(env["eval_seeds"]).isdisjoint(env["calibration"]["reference-digits"]["seeds"])


@pytest.mark.parametrize("model_dir", [_present(REFERENCE_DIGITS), _present(REFERENCE_DIGITS_MOE)])
def test_method_runs_are_the_public_pipeline_call(model_dir):
    """Each ditcache-side run gives what the pipeline gives for the same cache config (rebuilt from its
    registered name), and its telemetry's block count is what forward hooks on the blocks count."""
    torch.set_num_threads(1)
    work = make_workload(model_dir, model_dir.name, steps=8, shift=5.0, guidance=4.0)
    calib = calibrate(work, make_batch(2, CALIB_SEED))
    methods = build_methods(work, calib, SMOKE_GRID, (1.0, 100.0))
    batch = make_batch(3, EVAL_SEED)
    counter = BlockCounter(work.pipeline)
    direct = [run for run in methods.runs if run.counter is None]
    assert {"uncached", "ditcache-ada_taylor-o1", "teacache", "first-block"} <= {run.method for run in direct}
    for run in direct:
        counter.start()
        out, calls = run(work, batch)
        assert calls == counter.counts, run.method
        cache = None if run.cache is None else ditcache.cache_config(run.cache.name, **run.cache.options())
        expected = work.pipeline(batch.prompts, num_inference_steps=8, guidance_scale=4.0, sigma_shift=5.0,
                                 seed=EVAL_SEED, cache=cache, progress=False)  # fmt: skip
        torch.testing.assert_close(out.frames, expected.frames, atol=0, rtol=0, msg=run.method)


def test_batch_head_has_the_batch_noise(base_work):
    """Screening and timing batches are heads of a batch: their samples are the batch's first ones."""
    whole = base_work.pipeline(make_batch(4, EVAL_SEED).prompts, num_inference_steps=3, seed=EVAL_SEED, progress=False)
    head = base_work.pipeline(make_batch(4, EVAL_SEED).head(2).prompts, num_inference_steps=3, seed=EVAL_SEED,
                              progress=False)  # fmt: skip
    torch.testing.assert_close(head.frames, whole.frames[:2])


def test_first_block_rule_matches_the_diffusers_hook(base_work):
    """The library's "first_block" cache is diffusers' FirstBlockCache rule: same samples, same block count."""
    batch = make_batch(3, EVAL_SEED)
    config = peers.make_diffusers_config("fbc", threshold=0.1)
    hooked = hooked_run(base_work, "diffusers-fbc", {}, {"transformer": config})
    hook_out, hook_calls = hooked(base_work, batch)
    counter = BlockCounter(base_work.pipeline)
    rule_out = base_work.pipeline(batch.prompts, num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0,
                                  seed=EVAL_SEED, cache=ditcache.FirstBlockCacheConfig(threshold=0.1), progress=False)  # fmt: skip
    assert hook_calls == counter.counts == telemetry_block_calls(rule_out, base_work.num_layers, 1)
    assert sum(hook_calls.values()) < 2 * 10 * base_work.num_layers
    torch.testing.assert_close(hook_out.frames, rule_out.frames, atol=1e-4, rtol=0)


def test_diffusers_magcache_plan_matches_the_hook(base_work):
    curve = [1.0, 1.02, 0.99, 0.98, 1.01, 0.97, 0.95, 0.9, 0.99, 1.0]
    layers = base_work.num_layers
    for thresh, K, retention in [(0.05, 2, 0.2), (0.5, 3, 0.1), (100.0, 1, 0.2)]:
        config = peers.make_diffusers_config("magcache", threshold=thresh, max_skip_steps=K, retention_ratio=retention,
                                             num_inference_steps=10, mag_ratios=curve)  # fmt: skip
        run = hooked_run(base_work, "diffusers-magcache", {}, {"transformer": config})
        run(base_work, make_batch(2, EVAL_SEED))
        for branch in ("cond", "uncond"):  # the hook keys its state by cache_context: same plan per branch
            per_step = [run.counter.per_step[(branch, s)] for s in range(10)]
            plan = peers.diffusers_magcache_plan(curve, 10, thresh, K, retention)
            assert [s for s in range(10) if per_step[s]] == plan
            assert set(per_step) <= {0, layers}


def test_diffusers_taylorseer_hooks_whole_blocks(base_work):
    transformer = base_work.pipeline.adapters["transformer"].transformer
    names = peers.hooked_block_names(transformer, peers.TAYLORSEER_BLOCK_IDENTIFIERS)
    assert names == [f"blocks.{i}" for i in range(base_work.num_layers)]
    config = peers.make_diffusers_config("taylorseer", cache_interval=3, max_order=1)
    run = hooked_run(base_work, "diffusers-taylorseer-o1", {}, {"transformer": config})
    run(base_work, make_batch(2, EVAL_SEED))
    per_step = [run.counter.per_step[("cond", s)] for s in range(10)]
    # diffusers' schedule: steps < 3, then (step - 3 - 1) % 3 == 0; predicted steps run no block at all
    assert [s for s in range(10) if per_step[s]] == [0, 1, 2, 4, 7]
    assert set(per_step) <= {0, base_work.num_layers}


def _private_uses(path: Path) -> list[str]:
    """``x._name`` attribute uses and ``from ditcache... import _name`` imports in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{path.name}:{node.lineno} .{node.attr}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ditcache"):
            found += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("_")]
    return found


def test_bench_uses_no_private_ditcache_name():
    assert [use for path in sorted(BENCH.rglob("*.py")) for use in _private_uses(path)] == []


def _imported_modules(path: Path) -> list[str]:
    modules = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            modules.append(node.module or "")
        elif isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
    return modules


def test_quality_benchmark_reaches_pipelines_only_through_the_public_api():
    """The pipeline modules move between releases; the benchmark reaches them through ``ditcache.*``."""
    allowed = {"ditcache.runtime.scheduler", "ditcache.runtime.reference"}
    paths = [*sorted((BENCH / "quality").glob("*.py"))] + [BENCH / f"{n}.py" for n in ("peers", "taylor_form", "transfer")]
    for path in paths:
        for module in _imported_modules(path):
            assert not module.startswith("ditcache.runtime") or module in allowed, f"{path.name} imports {module}"


def test_pareto_front_and_matching():
    assert pareto_front([(1, 10), (2, 9), (2, 5), (3, 9.5), (1.5, 8)]) == [(1, 10), (3, 9.5)]
    rows = [
        {"model": "m", "method": "ditcache-ada_taylor-o1", "psnr": 40.0, "ideal_speedup": 2.0, "speedup": 1.9},
        {"model": "m", "method": "ditcache-ada_taylor-o1", "psnr": 30.0, "ideal_speedup": 3.1, "speedup": 2.9},
        {"model": "m", "method": "diffusers-fbc", "psnr": 33.0, "ideal_speedup": 1.95, "speedup": 1.5},
        {"model": "m", "method": "diffusers-fbc", "psnr": 45.0, "ideal_speedup": 1.5, "speedup": 1.4},
    ]
    table = matched_table(rows)
    assert table["m"]["2x"]["margin_db_o1_vs_best_peer"] == pytest.approx(7.0)
    assert table["m"]["2x"]["winner"] == "ditcache-ada_taylor-o1"
    assert table["m"]["3x"]["best"]["diffusers-fbc"] is None
    assert matched_table(rows, "speedup")["m"]["2x"]["best"]["diffusers-fbc"] is None
