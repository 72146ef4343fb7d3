"""The quality benchmark: every method is the public pipeline call, each peer config builds and runs,
the compute counter counts real work, the end-to-end smoke run writes the JSON schema."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import ditcache
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE

from bench import peers
from bench.quality.calibration import calibrate
from bench.quality.metrics import BlockCounter, ComputeCounter, block_flop_shares, telemetry_block_calls
from bench.quality.runners import PEERS, SMOKE_GRID, MethodSet, build_peers
from bench.quality.workload import CALIB_SEED, EVAL_SEED, Workload, make_batch, make_samples, make_workload

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"
RUN_KEYS = {"model", "steps", "method", "setting", "compute_fraction", "psnr", "psnr_ci95", "per_image_mse"}


def _present(path: Path, *marks: pytest.MarkDecorator):
    missing = pytest.mark.skipif(not (path / "model_index.json").is_file(), reason=f"{path.name} is not present")
    return pytest.param(path, marks=[missing, *marks], id=path.name)


@pytest.fixture(scope="module")
def base_work() -> Workload:
    if not (REFERENCE_DIGITS / "model_index.json").is_file():
        pytest.skip("the bundled reference model is not present")
    torch.set_num_threads(1)
    return make_workload(REFERENCE_DIGITS, REFERENCE_DIGITS.name, steps=10, shift=5.0, guidance=4.0)


@pytest.fixture(scope="module")
def shares(base_work) -> dict:
    return block_flop_shares(base_work.pipeline, "a handwritten 0")


def test_smoke_run_writes_the_json_schema(tmp_path):
    if not (REFERENCE_DIGITS / "model_index.json").is_file():
        pytest.skip("the bundled reference model is not present")
    from bench.quality.__main__ import main

    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    assert main(["--smoke", "--out-json", str(out_json), "--out-png", str(out_png)]) == 0
    data = json.loads(out_json.read_text())
    assert {"runs", "frontier", "screened_settings", "efficiency", "env", "not_applicable"} <= set(data)
    assert out_png.stat().st_size > 0
    runs = data["runs"]
    assert runs and all(RUN_KEYS <= set(r) for r in runs)
    (base,) = [r for r in runs if r["method"] == "uncached"]
    assert base["compute_fraction"] == 1.0 and base["psnr"] == data["env"]["psnr_cap_db"]
    assert {r["method"] for r in runs} >= {"ditcache-tuned", "teacache", "diffusers-fbc"}
    for r in runs:
        assert 0 < r["compute_fraction"] <= 1.0 + 1e-9
        assert len(r["per_image_mse"]) == data["env"]["eval_samples"][str(r["steps"])]
    per_band = data["frontier"]["reference-digits"]["8"]
    assert set(per_band) == {"1.5x", "2x", "3x", "4x", "5x"}
    for cell in per_band.values():
        assert set(cell) >= {"methods", "best_peer", "margin_vs_best_peer", "margins"}
        for margin in cell["margins"].values():
            low, high = margin["ci95"]
            assert low <= margin["margin_db"] + 1e-6 and margin["margin_db"] <= high + 1e-6
    counts = data["screened_settings"]["reference-digits"]["8"]
    assert set(counts) == {*PEERS, "ditcache-tuned"}
    assert {e["batch"] for e in data["efficiency"]} == {"batch_1", "batch_2"}
    env = data["env"]
    lo, hi = env["eval_seeds"]
    assert not set(range(lo, hi + 1)) & set(range(env["screen_seeds"][0], env["screen_seeds"][1] + 1))
    assert env["calibration_seed"] not in range(lo, hi + 1)


@pytest.mark.slow
def test_workloads_in_worker_processes_give_the_rows_of_one_process(tmp_path):
    """--jobs 2 spreads the workloads over spawned processes: the same settings are screened and evaluated
    at the same compute as in one process, and every PSNR agrees to the hundredth (a process that ran
    other workloads first may round the last float bits differently)."""
    if not (REFERENCE_DIGITS / "model_index.json").is_file():
        pytest.skip("the bundled reference model is not present")
    from bench.quality.__main__ import main

    outs = {}
    for jobs in (1, 2):
        out = tmp_path / f"q{jobs}.json"
        assert main(["--smoke", "--steps", "6", "8", "--jobs", str(jobs), "--no-timing", "--no-plot",
                     "--out-json", str(out)]) == 0  # fmt: skip
        outs[jobs] = json.loads(out.read_text())
    assert outs[2]["env"]["jobs"] == 2 and {r["steps"] for r in outs[2]["runs"]} == {6, 8}
    assert outs[1]["screened_settings"] == outs[2]["screened_settings"]
    for key in ("runs", "screening"):
        one, two = outs[1][key], outs[2][key]
        assert [(r["model"], r["steps"], r["method"], r["setting"], r["compute_fraction"]) for r in one] == [
            (r["model"], r["steps"], r["method"], r["setting"], r["compute_fraction"]) for r in two
        ], key
        assert all(abs(a["psnr"] - b["psnr"]) < 0.01 for a, b in zip(one, two)), key


@pytest.mark.parametrize(
    "kind,options",
    [
        ("fbc", {"threshold": 0.2}),
        ("magcache", {"threshold": 0.3, "max_skip_steps": 2, "retention_ratio": 0.2, "num_inference_steps": 10,
                      "mag_ratios": [1.0] * 10}),
        ("taylorseer", {"cache_interval": 3, "max_order": 1}),
        ("seacache", {"threshold": 0.5, "max_consecutive_cached": 3}),
        ("pab", {"spatial_attention_block_skip_range": 2, "cross_attention_block_skip_range": 2}),
    ],
)  # fmt: skip
def test_each_peer_config_builds_and_runs_one_request(base_work, shares, kind, options):
    config = peers.make_diffusers_config(kind, **options)
    hooked = peers.hooked_pipeline(base_work.pipeline, {"transformer": config})
    counter = ComputeCounter(hooked, shares)
    out = hooked("a handwritten 0", num_inference_steps=10,
                 guidance_scale=4.0, sigma_shift=5.0, seed=EVAL_SEED, progress=False)  # fmt: skip
    assert torch.isfinite(out.frames).all()
    assert 0 < sum(counter.counts.values()) < 2 * 10 * base_work.num_layers - 1e-9, kind


def test_fastercache_does_not_apply_to_one_call_per_branch(base_work, shares):
    """FasterCache builds, but with one transformer call per CFG branch it fails at batch 1 (its block
    hook halves a batch it takes for [uncond, cond]) and skips nothing at batch 2: not in the grid."""
    assert "fastercache" in peers.NOT_APPLICABLE
    hooked = peers.hooked_pipeline(base_work.pipeline, {"transformer": peers.make_diffusers_config("fastercache")})
    counter = ComputeCounter(hooked, shares)
    with pytest.raises(IndexError):
        hooked("a handwritten 0", num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0, seed=EVAL_SEED,
               progress=False)  # fmt: skip
    counter.start()
    hooked(["a handwritten 0", "a handwritten 1"], num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0,
           seed=EVAL_SEED, progress=False)  # fmt: skip
    assert sum(counter.counts.values()) == pytest.approx(2 * 10 * base_work.num_layers)


def test_compute_counter_equals_telemetry_for_ditcache_caches(base_work, shares):
    """Whole-block skipping is counted in whole blocks: the weighted counter equals the telemetry."""
    counter = ComputeCounter(base_work.pipeline, shares)
    for cache in (None, ditcache.AdaTaylorConfig(model_type="Reference-Digits", n_derivatives=1),
                  ditcache.TeaCacheConfig(coefficients=(0.0, 0.0, 0.0, 1.0, 0.0), thresh=0.3, warmup=2)):  # fmt: skip
        counter.start()
        out = base_work.pipeline("a handwritten 3", num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0,
                                 seed=EVAL_SEED, cache=cache, progress=False)  # fmt: skip
        expected = telemetry_block_calls(out, base_work.num_layers, 0)
        assert counter.counts == pytest.approx({k: float(v) for k, v in expected.items()})


def test_flop_shares_sum_to_one(shares):
    assert shares["attn1"] + shares["attn2"] + shares["ffn"] == pytest.approx(1.0)
    assert min(shares["attn1"], shares["attn2"], shares["ffn"]) > 0


def test_pab_counts_only_the_attention_it_skips(base_work, shares):
    config = peers.make_diffusers_config("pab", spatial_attention_block_skip_range=2)
    hooked = peers.hooked_pipeline(base_work.pipeline, {"transformer": config})
    counter = ComputeCounter(hooked, shares)
    hooked("a handwritten 1", num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0, seed=EVAL_SEED,
           progress=False)  # fmt: skip
    full = 2 * 10 * base_work.num_layers
    # cond and uncond calls share PAB's counter: every 2nd self-attention call runs
    assert sum(counter.counts.values()) == pytest.approx(full * (1 - shares["attn1"] / 2))


@pytest.mark.parametrize("model_dir", [_present(REFERENCE_DIGITS), _present(REFERENCE_DIGITS_MOE)])
def test_method_runs_are_the_public_pipeline_call(model_dir):
    """Each direct run gives what the pipeline gives for the same cache config, one request per sample."""
    torch.set_num_threads(1)
    work = make_workload(model_dir, model_dir.name, steps=8, shift=5.0, guidance=4.0)
    calib = calibrate(work, make_batch(2, CALIB_SEED))
    methods = MethodSet(work, block_flop_shares(work.pipeline, "a handwritten 0"))
    build_peers(methods, calib, SMOKE_GRID)
    samples = make_samples(2, EVAL_SEED)
    assert {run.method for run in methods.runs} == set(PEERS)
    for run in methods.runs:
        frames, counts, _ = run(work, samples)
        if run.cache is not None:
            cache = ditcache.cache_config(run.cache.name, **run.cache.options())
            expected = torch.cat([
                work.pipeline(f"a handwritten {label}", num_inference_steps=8, guidance_scale=4.0, sigma_shift=5.0,
                              seed=seed, cache=cache, progress=False).frames
                for label, seed in zip(samples.labels, samples.seeds)
            ])  # fmt: skip
            torch.testing.assert_close(frames, expected, atol=0, rtol=0, msg=run.method)
        assert 0 < sum(counts.values()) <= 2 * 8 * work.num_layers * len(samples) + 1e-9


def test_first_block_hook_matches_the_library_rule(base_work):
    """diffusers' FirstBlockCache hook and the library's "first_block" rule: same samples, same block count."""
    batch = make_batch(2, EVAL_SEED)
    hooked = peers.hooked_pipeline(base_work.pipeline, {"transformer": peers.make_diffusers_config("fbc", threshold=0.1)})
    counter = BlockCounter(hooked)
    hook_out = hooked(batch.prompts, num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0, seed=EVAL_SEED,
                      progress=False)  # fmt: skip
    rule_out = base_work.pipeline(batch.prompts, num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0,
                                  seed=EVAL_SEED, cache=ditcache.FirstBlockCacheConfig(threshold=0.1), progress=False)  # fmt: skip
    assert counter.counts == telemetry_block_calls(rule_out, base_work.num_layers, 1)
    torch.testing.assert_close(hook_out.frames, rule_out.frames, atol=1e-4, rtol=0)


def test_diffusers_schedules_match_the_hooks(base_work, shares):
    curve = [1.0, 1.02, 0.99, 0.98, 1.01, 0.97, 0.95, 0.9, 0.99, 1.0]
    for thresh, K, retention in [(0.05, 2, 0.2), (0.5, 3, 0.1)]:
        config = peers.make_diffusers_config("magcache", threshold=thresh, max_skip_steps=K, retention_ratio=retention,
                                             num_inference_steps=10, mag_ratios=curve)  # fmt: skip
        hooked = peers.hooked_pipeline(base_work.pipeline, {"transformer": config})
        counter = BlockCounter(hooked)
        hooked("a handwritten 2", num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0, seed=EVAL_SEED,
               progress=False)  # fmt: skip
        plan = peers.diffusers_magcache_plan(curve, 10, thresh, K, retention)
        assert [s for s in range(10) if counter.per_step[("cond", s)]] == plan
    config = peers.make_diffusers_config("taylorseer", cache_interval=3, max_order=1, disable_cache_before_step=3)
    hooked = peers.hooked_pipeline(base_work.pipeline, {"transformer": config})
    counter = BlockCounter(hooked)
    hooked("a handwritten 2", num_inference_steps=10, guidance_scale=4.0, sigma_shift=5.0, seed=EVAL_SEED,
           progress=False)  # fmt: skip
    assert [s for s in range(10) if counter.per_step[("cond", s)]] == peers.diffusers_taylorseer_plan(10, 3, 3)
    assert peers.hooked_block_names(hooked.adapters["transformer"].transformer, peers.TAYLORSEER_BLOCK_IDENTIFIERS) == [
        f"blocks.{i}" for i in range(base_work.num_layers)
    ]


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
