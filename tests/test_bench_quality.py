"""The quality benchmark: end-to-end smoke run, sampling-loop parity with WanPipeline, peer rules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

import peers  # noqa: E402
import quality  # noqa: E402

from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE  # noqa: E402

needs_reference = pytest.mark.skipif(
    not (REFERENCE_DIGITS / "model_index.json").is_file(), reason="the bundled reference model is not present"
)


def _present(path: Path):
    return pytest.param(path, marks=pytest.mark.skipif(not (path / "model_index.json").is_file(),
                                                       reason=f"{path.name} is not present"))  # fmt: skip
REQUIRED_RUN_KEYS = {"method", "setting", "compute_fraction", "speedup", "psnr", "ssim", "accuracy"}


@needs_reference
def test_smoke_run_end_to_end(tmp_path):
    out_json, out_png = tmp_path / "q.json", tmp_path / "q.png"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "quality.py"), "--smoke", "--threads", "1",
         "--out-json", str(out_json), "--out-png", str(out_png)],  # fmt: skip
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert set(data) >= {"runs", "env"}
    assert out_png.stat().st_size > 0
    runs = data["runs"]
    assert runs and all(REQUIRED_RUN_KEYS <= set(r) for r in runs)
    for r in runs:
        assert isinstance(r["method"], str) and isinstance(r["setting"], dict)
        assert 0 < r["compute_fraction"] <= 1.0 + 1e-9
        assert r["speedup"] > 0 and 0 <= r["accuracy"] <= 1 and -1 <= r["ssim"] <= 1
    uncached = [r for r in runs if r["method"] == "uncached"]
    assert len(uncached) == 1
    base = uncached[0]
    assert base["compute_fraction"] == 1.0
    assert base["psnr"] == max(r["psnr"] for r in runs) == data["env"]["psnr_cap_db"]
    assert base["ssim"] == 1.0 and base["speedup"] == 1.0
    methods = {r["method"] for r in runs}
    assert {"ditcache-ada_taylor-o1", "diffusers-fbc", "diffusers-magcache", "teacache"} <= methods
    assert any(m.startswith("diffusers-taylorseer") for m in methods)
    # Cached methods really skip block passes.
    assert any(r["compute_fraction"] < 1.0 for r in runs if r["method"].startswith("ditcache-"))
    env = data["env"]
    assert env["steps"] == 10 and env["samples_per_model"] == 4
    assert set(range(env["eval_seeds"][0], env["eval_seeds"][1] + 1)).isdisjoint(
        range(*[s + i for s, i in zip(env["calibration"]["reference-digits"]["seeds"], (0, 1))])
    )


@pytest.mark.parametrize("model_dir", [_present(REFERENCE_DIGITS), _present(REFERENCE_DIGITS_MOE)], ids=["base", "moe"])
def test_sampling_loop_matches_the_pipeline(model_dir):
    """The benchmark's loop gives the pipeline's samples, uncached and with per-expert AdaTaylorCaches."""
    torch.set_num_threads(1)
    steps = 8
    work = quality.make_workload(model_dir, model_dir.name, steps=steps, shift=5.0, guidance=4.0)
    seeds, labels = [11, 12], [3, 7]
    batch = quality.make_batch(work, labels, seeds)
    counter = quality.attach_counter(work, [])
    uncached = quality.AdapterRunner(work, "uncached", {}, {e: None for e in work.used_experts()})
    params = quality.params_from_dict(
        {"K": 2, "thresh": 10.0, "retention_ratio": 0.2, "cond_mag_ratios": [1.0] * steps,
         "uncond_mag_ratios": [1.0] * steps}  # fmt: skip
    )
    caches = quality.ada_caches(work, params, 1, 2)
    cached = quality.AdapterRunner(work, "o1", {}, caches)
    with torch.inference_mode():
        frames_u, calls_u = quality.sample(work, batch, uncached.predict, counter)
        cached.reset()
        frames_c, calls_c = quality.sample(work, batch, cached.predict, counter)
    assert calls_u == {"cond": steps * work.num_layers, "uncond": steps * work.num_layers}
    plan = quality._plan_of(work, caches)
    assert calls_c["cond"] == sum(len(cond) for _, cond, _ in plan) * work.num_layers < calls_u["cond"]
    for i, (seed, label) in enumerate(zip(seeds, labels)):
        common = dict(num_inference_steps=steps, guidance_scale=4.0, sigma_shift=5.0, seed=seed, progress=False)
        prompt = f"a handwritten {label}"
        ref = work.pipeline(prompt, enable_ada_taylor_cache=False, **common).frames
        torch.testing.assert_close(frames_u[i : i + 1], ref, atol=2e-5, rtol=0)
        fresh = quality.ada_caches(work, params, 1, 2)
        feature_cache = fresh if len(fresh) > 1 else fresh["transformer"]
        ref_c = work.pipeline(prompt, cache=feature_cache, **common).frames
        torch.testing.assert_close(frames_c[i : i + 1], ref_c, atol=2e-5, rtol=0)


def test_fixed_interval_plan_and_forecast():
    assert peers.fixed_interval_plan(12, 3, 3) == [0, 1, 2, 5, 8, 11]
    assert peers.fixed_interval_plan(12, 2, 2, init_step=5) == [5, 6, 8, 10]
    cache = peers.FixedIntervalTaylorCache(10, interval=3, order=1, warmup=2)
    x = torch.zeros(1, 4, 2)
    for step in range(10):
        residual = torch.full_like(x, 2.0 * step + 1.0)  # linear in the step: order 1 is exact
        if cache.should_compute(True):
            cache.update(x + residual, x, True)
        else:
            torch.testing.assert_close(cache.approximate(x, True), x + residual)
    assert cache.stats()["cond"]["computed_steps"] == [0, 1, 4, 7]


def test_teacache_rule_accumulates_and_reuses():
    cache = peers.TeaCacheRule(6, coefficients=[1.0, 0.0], thresh=0.25, warmup=1)  # rescale(d) = d
    x = torch.zeros(1, 2, 2)
    decisions = []
    for step, temb in enumerate([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]):
        cache.observe(torch.full((1, 3), temb), True)
        compute = cache.should_compute(True)
        decisions.append(compute)
        if compute:
            cache.update(x + step, x, True)
        else:
            assert torch.all(cache.approximate(x, True) == cache._branches[True].residual)
    # relative changes ~0.1, 0.09, 0.083, 0.077, 0.071: skip while the sum stays under 0.25
    assert decisions == [True, False, False, True, False, False]


def test_fit_teacache_polynomial_recovers_a_polynomial():
    xs = [0.01 * i for i in range(1, 30)]
    ys = [3 * x**2 + 0.5 * x + 0.01 for x in xs]
    coeffs = peers.fit_teacache_polynomial(xs, ys)
    assert coeffs[-3:] == pytest.approx([3.0, 0.5, 0.01], abs=1e-6)


def _run_steps(model, steps, contexts=("cond",)):
    """Run ``steps`` forwards per context; returns block calls per (context, step) via the FFN counter."""
    counter = quality.BlockCounter()
    counter.attach(model)
    x = torch.randn(1, 4, 1, 4, 4)
    emb = torch.randn(1, 6, 8)
    calls = {}
    with torch.inference_mode():
        for step in range(steps):
            for name in contexts:
                before = counter.count
                with model.cache_context(name):
                    model(x * (1 - step / steps), torch.tensor([1000.0 * (1 - step / steps)]), emb, return_dict=False)
                calls[(name, step)] = counter.count - before
    return calls


def test_diffusers_magcache_plan_matches_the_hook(make_tiny_wan):
    curve = [1.0, 1.02, 0.99, 0.98, 1.01, 0.97, 0.95, 0.9, 0.99, 1.0]
    for thresh, K, retention in [(0.05, 2, 0.2), (0.5, 3, 0.1), (100.0, 1, 0.2)]:
        model = peers.hooked_copy(
            make_tiny_wan(),
            peers.make_diffusers_config("magcache", threshold=thresh, max_skip_steps=K, retention_ratio=retention,
                                        num_inference_steps=10, mag_ratios=curve),  # fmt: skip
        )
        calls = _run_steps(model, 10, ("cond", "uncond"))
        for branch in ("cond", "uncond"):  # the hook keys its state by cache_context: same plan per branch
            computed = [s for s in range(10) if calls[(branch, s)] > 0]
            assert computed == peers.diffusers_magcache_plan(curve, 10, thresh, K, retention)
            assert all(calls[(branch, s)] in (0, 2) for s in range(10))


def test_diffusers_taylorseer_hooks_whole_blocks(make_tiny_wan):
    model = make_tiny_wan()
    assert peers.hooked_block_names(model, peers.TAYLORSEER_BLOCK_IDENTIFIERS) == ["blocks.0", "blocks.1"]
    hooked = peers.hooked_copy(model, peers.make_diffusers_config("taylorseer", cache_interval=3, max_order=1))
    calls = _run_steps(hooked, 10)
    computed = [s for s in range(10) if calls[("cond", s)] > 0]
    # diffusers' schedule: steps < 3, then (step - 3 - 1) % 3 == 0; predicted steps run no block at all
    assert computed == [0, 1, 2, 4, 7]
    assert all(calls[("cond", s)] in (0, 2) for s in range(10))


def test_block_counter_sees_first_block_cache_cost(make_tiny_wan):
    """FirstBlockCache always runs block 0: the counter must see one block call on a cached step."""
    hooked = peers.hooked_copy(make_tiny_wan(), peers.make_diffusers_config("fbc", threshold=10.0))
    calls = _run_steps(hooked, 4)
    assert calls[("cond", 0)] == 2 and all(calls[("cond", s)] == 1 for s in range(1, 4))


def test_pareto_front_and_matching():
    assert quality.pareto_front([(1, 10), (2, 9), (2, 5), (3, 9.5), (1.5, 8)]) == [(1, 10), (3, 9.5)]
    rows = [
        {"model": "m", "method": "ditcache-ada_taylor-o1", "psnr": 40.0, "ideal_speedup": 2.0, "speedup": 1.9},
        {"model": "m", "method": "ditcache-ada_taylor-o1", "psnr": 30.0, "ideal_speedup": 3.1, "speedup": 2.9},
        {"model": "m", "method": "diffusers-fbc", "psnr": 33.0, "ideal_speedup": 1.95, "speedup": 1.5},
        {"model": "m", "method": "diffusers-fbc", "psnr": 45.0, "ideal_speedup": 1.5, "speedup": 1.4},
    ]
    table = quality.matched_table(rows)
    assert table["m"]["2x"]["margin_db_o1_vs_best_peer"] == pytest.approx(7.0)
    assert table["m"]["2x"]["winner"] == "ditcache-ada_taylor-o1"
    assert table["m"]["3x"]["best"]["diffusers-fbc"] is None
    by_wall = quality.matched_table(rows, "speedup")
    assert by_wall["m"]["2x"]["best"]["diffusers-fbc"] is None
