"""Per-request telemetry equals what a forward hook counts, and an enabled cache that skips nothing warns."""

import json

import pytest
import torch

from ditcache.cache import compute_skip_schedule
from ditcache.cache.schedule import resample_by_sigma
from ditcache.models import REFERENCE_DIGITS
from ditcache.params import load_params
from ditcache.families import load_pipeline
from ditcache.runtime.scheduler import wan_schedule

STEPS, SHIFT = 20, 5.0


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return load_pipeline(REFERENCE_DIGITS)


def count_block_calls(pipe):
    """Count real block-stack runs with a hook on the first block (independent of cache and adapter)."""
    calls = []
    handle = pipe.adapters["transformer"].transformer.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_telemetry_matches_hook_counts_and_the_plan(pipe):
    calls, handle = count_block_calls(pipe)
    try:
        out = pipe(prompt=["a handwritten 3", "a handwritten 8"], num_inference_steps=STEPS, sigma_shift=SHIFT,
                   guidance_scale=4.0, seed=5, cache="ada_taylor", progress=False)  # fmt: skip
    finally:
        handle.remove()
    tel = out.telemetry()
    # the plan, derived here from the params file and the run's sigmas, without the cache
    params = load_params("Reference-Digits")
    sigmas = wan_schedule(STEPS, SHIFT).sigmas[:-1].tolist()
    expected = {
        name: compute_skip_schedule(resample_by_sigma(params.curve(c), params.sigmas, sigmas), STEPS,
                                    params.K, params.thresh, params.retention_ratio)  # fmt: skip
        for name, c in (("cond", True), ("uncond", False))
    }
    assert len(calls) == sum(b["block_passes"] for b in tel["branches"].values())
    for name, b in tel["branches"].items():
        assert b["planned_compute_steps"] == b["computed_steps"] == expected[name]
        assert b["block_passes"] == len(expected[name])
        assert b["block_passes_saved"] == STEPS - len(expected[name]) == len(b["skipped_steps"]) > 0
        assert b["taylor_approximations"] + b["reuse_approximations"] == len(b["skipped_steps"])
    total = sum(len(v) for v in expected.values())
    assert tel["predicted_speedup"] == pytest.approx(2 * STEPS / total)
    assert tel["block_pass_speedup"] == pytest.approx(2 * STEPS / len(calls))
    assert tel["estimated_wall_speedup"] > 1.0
    # order 1 keeps D0 and D1 in fp32 for both branches: 2 samples x 64 tokens x 96 channels each
    assert tel["cache_memory_bytes"] == 2 * 2 * (2 * 64 * 96 * 4)
    json.dumps(tel)  # the CLI prints it and Ray ships it: plain JSON types only


def test_guidance_off_reports_one_branch(pipe):
    calls, handle = count_block_calls(pipe)
    try:
        out = pipe(prompt="a handwritten 1", num_inference_steps=STEPS, guidance_scale=1.0, progress=False)
    finally:
        handle.remove()
    tel = out.telemetry()
    assert list(tel["branches"]) == ["cond"]
    assert tel["branches"]["cond"]["block_passes"] == len(calls)


def test_enabled_cache_that_skips_nothing_warns(pipe, tmp_path, monkeypatch):
    data = json.loads(open(load_params("Reference-Digits").path).read())
    (tmp_path / "Never-Skips.json").write_text(json.dumps({**data, "thresh": 0.0, "model_type": "Never-Skips"}))
    monkeypatch.setenv("DITCACHE_PARAMS_DIR", str(tmp_path))
    with pytest.warns(UserWarning, match="skipped no step"):
        out = pipe(prompt="a handwritten 2", num_inference_steps=10, model_type="Never-Skips", cache="ada_taylor",
                   progress=False)
    assert out.telemetry()["branches"]["cond"]["block_passes_saved"] == 0


def test_a_calibrator_passed_to_the_pipeline_records_the_run_sigmas(pipe):
    from ditcache.cache import create_feature_cache
    from ditcache.errors import CacheConfigError
    from ditcache.params import params_from_dict

    cal = create_feature_cache("calibrator", num_inference_steps=10, sigma_shift=SHIFT, model_name="m")
    pipe(prompt="a handwritten 4", num_inference_steps=10, sigma_shift=SHIFT, cache=cal, progress=False)
    assert cal.sigmas == pytest.approx(wan_schedule(10, SHIFT).sigmas[:-1].tolist())
    assert params_from_dict(cal.result()).sigmas is not None
    with pytest.raises(CacheConfigError, match="different sigma"):
        pipe(prompt="a handwritten 4", num_inference_steps=10, sigma_shift=3.0, cache=cal, progress=False)


def _output(cfg_parallel: bool):
    from ditcache.runtime.denoise import GenerationOutput

    # cond ran 10 of 40 passes in 1 s, uncond 20 of 40 in 4 s; the request took 6 s
    return GenerationOutput(
        frames=torch.zeros(1, 1, 1, 1, 1),
        cache_stats={},
        stack_passes={"transformer": {"cond": 10, "uncond": 20}},
        branch_steps={"cond": 40, "uncond": 40},
        expert_steps={"transformer": list(range(40))},
        cache_memory_bytes={},
        sigmas=[],
        timesteps=[0.0] * 40,
        wall_time_s=6.0,
        stack_seconds={"transformer": {"cond": 1.0, "uncond": 4.0}},
        cfg_parallel=cfg_parallel,
    )


def test_wall_estimate_counts_one_rank_s_skipped_passes_under_cfg_parallel():
    # one rank: both branches' skipped passes (30 x 0.1 s + 20 x 0.2 s) would have run in turn
    assert _output(False).telemetry()["estimated_wall_speedup"] == pytest.approx((6 + 3 + 4) / 6)
    # CFG-parallel: the branches run side by side; the slower lane (uncond: 20 x 0.2 s) bounds the run
    assert _output(True).telemetry()["estimated_wall_speedup"] == pytest.approx((6 + 4) / 6)
