"""The re-implemented peer rules as registered caches: TeaCache, FirstBlockCache, TaylorSeer's interval."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyPromptEncoder, tiny_wan

from ditcache.cache import (
    FirstBlockCache,
    FixedIntervalTaylorCache,
    StepContext,
    TeaCacheRule,
    available_caches,
    cache_config,
    fit_teacache_polynomial,
)
from ditcache.cache.fixed_interval import fixed_interval_plan
from ditcache.cache.teacache import relative_l1
from ditcache.errors import CacheConfigError, CacheStateError
from ditcache.runtime.loading import ModelSettings
from ditcache.families.wan.pipeline import WanPipeline

STEPS = 6
SETTINGS = ModelSettings(
    latent_space="pixel", height=6, width=10, num_frames=1, default_steps=STEPS, default_shift=3.0,
    default_guidance_scale=4.0, model_type=None, boundary_ratio=None,
)  # fmt: skip


def ctx(step: int, *, modulation=None, hidden_states=None, first_block=None, group_sum=None, is_cond=True):
    extra = {} if group_sum is None else {"group_sum": group_sum}
    return StepContext(step=step, is_cond=is_cond, modulation=modulation, hidden_states=hidden_states,
                       first_block=first_block, **extra)  # fmt: skip


# -- registry ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, cls",
    [
        ("teacache", {"thresh": 0.2, "coefficients": [2.0, 0.0]}, TeaCacheRule),
        ("first_block", {"threshold": 0.1}, FirstBlockCache),
        ("taylorseer_interval", {"interval": 2, "order": 2}, FixedIntervalTaylorCache),
    ],
)
def test_registered_by_name_and_built_per_expert(name, options, cls):
    assert name in available_caches()
    config = cache_config(name, **options)
    cache = config.build(10, None, 4)
    assert isinstance(cache, cls) and cache.uses_step_context and not config.spans_experts
    assert cache.init_step == 4 and cache.current_step(True) == 3
    assert config.describe().startswith(name + "(")


def test_configs_reject_bad_settings():
    for name, options in [("teacache", {"thresh": 0.0}), ("teacache", {"warmup": 0}),
                          ("first_block", {"threshold": -1.0}), ("taylorseer_interval", {"interval": 0}),
                          ("taylorseer_interval", {"order": -1})]:  # fmt: skip
        with pytest.raises(CacheConfigError):
            cache_config(name, **options)


# -- TaylorSeer's fixed interval ---------------------------------------------------------------------


def test_fixed_interval_plan():
    assert fixed_interval_plan(12, 3, 3) == [0, 1, 2, 5, 8, 11]
    assert fixed_interval_plan(12, 2, 2, init_step=5) == [5, 6, 8, 10]


def test_fixed_interval_order1_forecast_is_exact_on_a_linear_residual():
    cache = FixedIntervalTaylorCache(10, interval=3, order=1, warmup=2)
    x = torch.zeros(1, 4, 2)
    for step in range(10):
        residual = torch.full_like(x, 2.0 * step + 1.0)
        if cache.should_compute(ctx(step)):
            cache.update(x + residual, x, ctx(step))
        else:
            torch.testing.assert_close(cache.approximate(x, ctx(step)), x + residual)
    stats = cache.stats()["cond"]
    assert stats["computed_steps"] == [0, 1, 4, 7] and stats["taylor_approximations"] == 6


def test_fixed_interval_order2_uses_taylorseers_factorial_form():
    """TaylorSeer: D_2 = (D_1 - D_1') / window and the term D_2 e^2 / 2 (not the Newton form)."""
    cache = FixedIntervalTaylorCache(10, interval=2, order=2, warmup=1)
    x = torch.zeros(1, 1, 1)
    values = {0: 0.0, 2: 4.0, 4: 16.0}  # r(t) = t^2 at the computed steps 0, 2, 4
    for step in range(6):
        if cache.should_compute(ctx(step)):
            cache.update(x + values[step], x, ctx(step))
        elif step == 5:
            # D0 = 16, D1 = (16 - 4) / 2 = 6, D1' = (4 - 0) / 2 = 2, D2 = (6 - 2) / 2 = 2
            assert cache.approximate(x, ctx(step)).item() == pytest.approx(16 + 6 * 1 + 2 * 1 / 2)
        else:
            cache.approximate(x, ctx(step))


# -- TeaCache ----------------------------------------------------------------------------------------


def test_teacache_accumulates_the_rescaled_change_and_reuses_the_residual():
    cache = TeaCacheRule(6, coefficients=[1.0, 0.0], thresh=0.25, warmup=1)  # rescale(d) = d
    x = torch.zeros(1, 2, 2)
    decisions = []
    for step, level in enumerate([1.0, 1.1, 1.2, 1.3, 1.4, 1.5]):
        c = ctx(step, modulation=torch.full((1, 3), level), hidden_states=x)
        compute = cache.should_compute(c)
        decisions.append(compute)
        if compute:
            cache.update(x + step, x, c)
        else:
            assert torch.all(cache.approximate(x, c) == x + max(s for s, d in enumerate(decisions) if d))
    # relative changes ~0.1, 0.09, 0.083, 0.077, 0.071: skip while the sum stays under 0.25
    assert decisions == [True, False, False, True, False, False]
    assert cache.stats()["cond"]["reuse_approximations"] == 4


def test_teacache_rescales_with_the_polynomial_and_honours_warmup_and_compute_last():
    x = torch.zeros(1, 2, 2)
    # rescale(d) = 10 d: every relative change of ~0.1 reaches thresh 0.5 within one step
    scaled = TeaCacheRule(6, coefficients=[10.0, 0.0], thresh=0.5, warmup=3, compute_last=True)
    decisions = []
    for step, level in enumerate([1.0, 1.01, 1.02, 1.03, 1.04, 1.05]):
        c = ctx(step, modulation=torch.full((1, 3), level))
        decisions.append(scaled.should_compute(c))
        if decisions[-1]:
            scaled.update(x, x, c)
    assert decisions == [True, True, True, False, False, True]  # 0.1 + 0.1 < 0.5; last step forced


def test_teacache_falls_back_to_the_stack_input_without_a_modulation():
    cache = TeaCacheRule(3, thresh=0.05, warmup=1)
    same, moved = torch.ones(1, 4, 2), torch.full((1, 4, 2), 2.0)
    assert cache.should_compute(ctx(0, hidden_states=same))
    cache.update(same, same, ctx(0))
    assert not cache.should_compute(ctx(1, hidden_states=same))
    assert cache.should_compute(ctx(2, hidden_states=moved))


def test_teacache_decides_on_the_group_reduced_statistic():
    """``group_sum`` stands for the other ranks: their shards barely changed, so the group skips."""
    def other_ranks(sums):  # adds 0 change and 99 units of magnitude from the rest of the group
        return sums + torch.tensor([0.0, 99.0], dtype=sums.dtype)

    local = TeaCacheRule(2, thresh=0.05, warmup=1)
    grouped = TeaCacheRule(2, thresh=0.05, warmup=1)
    a, b = torch.ones(1, 1, 1), torch.full((1, 1, 1), 2.0)
    for cache, reduce in ((local, None), (grouped, other_ranks)):
        cache.should_compute(ctx(0, hidden_states=a, group_sum=reduce))
        cache.update(a, a, ctx(0))
    assert local.should_compute(ctx(1, hidden_states=b))  # change 1 / 1 locally
    assert not grouped.should_compute(ctx(1, hidden_states=b, group_sum=other_ranks))  # 1 / 100 over the group
    assert relative_l1(b, a) == pytest.approx(1.0)


def test_teacache_needs_the_step_context():
    with pytest.raises(CacheStateError, match="StepContext"):
        TeaCacheRule(3).should_compute(True)


def test_fit_teacache_polynomial_recovers_a_polynomial():
    xs = [0.01 * i for i in range(1, 30)]
    ys = [3 * x**2 + 0.5 * x + 0.01 for x in xs]
    assert fit_teacache_polynomial(xs, ys)[-3:] == pytest.approx([3.0, 0.5, 0.01], abs=1e-6)
    with pytest.raises(CacheConfigError):
        fit_teacache_polynomial([0.1, 0.2], [0.1, 0.2])


# -- FirstBlockCache ---------------------------------------------------------------------------------


class Probe:
    """A first block: x + shift; counts how often the cache asks for it."""

    def __init__(self, x: torch.Tensor, shift: float) -> None:
        self.x, self.shift, self.calls = x, shift, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.x + self.shift


def test_first_block_cache_compares_with_the_last_computed_steps_first_block_residual():
    cache = FirstBlockCache(6, threshold=0.15)
    x = torch.zeros(1, 3, 2)
    shifts = [1.0, 1.1, 1.2, 1.05, 0.8, 0.85]  # first-block residuals
    decisions = []
    for step, shift in enumerate(shifts):
        probe = Probe(x, shift)
        c = ctx(step, hidden_states=x, first_block=probe)
        compute = cache.should_compute(c)
        decisions.append(compute)
        if compute:
            cache.update(x + 10.0 * shift, x, c)  # the stack's output
        else:
            # the current first-block output plus the last computed step's tail residual (10s - s)
            last = shifts[max(s for s, d in enumerate(decisions) if d)]
            torch.testing.assert_close(cache.approximate(x, c), x + shift + 9.0 * last)
    # vs r_prev of the last computed step: 0.1, 0.2 (compute), 0.125, 0.333 (compute), 0.0625
    assert decisions == [True, False, True, False, True, False]


def test_first_block_cache_runs_end_to_end_and_matches_uncached_at_threshold_zero():
    """Through the pipeline: threshold 0 computes every step (same frames as uncached, first block
    once per step); a huge threshold skips every step after the first, and the first block still runs."""
    torch.manual_seed(0)
    pipe = WanPipeline({"transformer": tiny_wan(0, in_channels=4, out_channels=4)}, TinyPromptEncoder(), SETTINGS)
    counts: list[int] = []
    pipe.adapters["transformer"].transformer.blocks[0].register_forward_hook(lambda *a: counts.append(1))
    call = dict(prompt="a seven", negative_prompt="blurry", seed=3, progress=False)
    reference = pipe(**call).frames
    counts.clear()
    exact = pipe(**call, cache=cache_config("first_block", threshold=0.0))
    assert len(counts) == 2 * STEPS and exact.total_stack_passes() == {"cond": STEPS, "uncond": STEPS}
    torch.testing.assert_close(exact.frames, reference, atol=1e-6, rtol=0)
    counts.clear()
    skipping = pipe(**call, cache=cache_config("first_block", threshold=1e9))
    assert len(counts) == 2 * STEPS and skipping.total_stack_passes() == {"cond": 1, "uncond": 1}
    assert skipping.cache_stats["transformer"]["cond"]["skipped_steps"] == list(range(1, STEPS))


@pytest.mark.parametrize(
    "name, options",
    [("teacache", {"thresh": 0.3, "warmup": 2}), ("taylorseer_interval", {"interval": 2, "warmup": 2})],
)
def test_peer_caches_skip_through_the_pipeline(name, options):
    torch.manual_seed(0)
    pipe = WanPipeline({"transformer": tiny_wan(0, in_channels=4, out_channels=4)}, TinyPromptEncoder(), SETTINGS)
    out = pipe("a seven", seed=3, progress=False, cache=cache_config(name, **options))
    passes = out.total_stack_passes()
    assert all(2 <= n < STEPS for n in passes.values()), passes
    assert out.frames.isfinite().all()
