"""AdaTaylorCache: Taylor exactness on polynomial residuals, fallback, branch isolation, reset, errors."""

import dataclasses
import math

import pytest
import torch

from ditcache.cache import AdaTaylorCache, NoCache, create_feature_cache
from ditcache.errors import CacheConfigError, CacheStateError, UnknownModelError


def explicit_cache(n_steps=12, K=3, thresh=10.0, retention=0.0, **kw):
    """A cache whose schedule is fully controlled: flat curves and a huge thresh skip up to K in a row."""
    flat = [1.0] * n_steps
    return AdaTaylorCache(
        cond_mag_ratios=flat, uncond_mag_ratios=flat, K=K, thresh=thresh, retention_ratio=retention,
        num_inference_steps=n_steps, **kw,
    )


def poly_residual(step: float, degree: int, base: torch.Tensor) -> torch.Tensor:
    coeffs = [0.7, -0.3, 0.05][: degree + 1]
    return base * sum(c * step**i for i, c in enumerate(coeffs))


def run_branch(cache, residual_fn, x_fn, is_cond=True, n_steps=12):
    """Drive one branch through a whole run; returns {step: (output, exact)} for skipped steps."""
    skipped = {}
    for step in range(n_steps):
        x = x_fn(step)
        exact = x + residual_fn(step)
        if cache.should_compute(is_cond):
            cache.update(exact, x, is_cond)
        else:
            skipped[step] = (cache.approximate(x, is_cond), exact)
    return skipped


@pytest.mark.parametrize("order", [0, 1, 2])
def test_newton_form_is_exact_on_polynomials_of_its_order(order):
    torch.manual_seed(0)
    base = torch.randn(2, 16, 8)
    cache = explicit_cache(K=2, n_derivatives=order, taylor_threshold=2, taylor_form="newton")
    skipped = run_branch(cache, lambda s: poly_residual(s, order, base), lambda s: torch.randn(2, 16, 8))
    # with K=2 and a flat curve: compute 0, skip 1, 2, compute 3, ...; the first skips come before
    # enough computed steps exist for the top derivative, so judge the skips after two computes
    judged = [s for s in skipped if s > 3 * order]
    assert judged, "the schedule must skip something after the warm-up"
    for s in judged:
        out, exact = skipped[s]
        torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)


def test_order1_is_not_exact_on_a_quadratic_but_newton_order2_is():
    base = torch.ones(1, 4, 4)
    errs = {}
    for order in (1, 2):
        cache = explicit_cache(K=2, n_derivatives=order, taylor_threshold=2, taylor_form="newton")
        skipped = run_branch(cache, lambda s: poly_residual(s, 2, base), lambda s: torch.zeros(1, 4, 4))
        errs[order] = max((o - e).abs().max().item() for s, (o, e) in skipped.items() if s > 6)
    assert errs[2] < 1e-4 < errs[1]


def test_beyond_taylor_threshold_reuses_the_last_residual():
    base = torch.randn(1, 8, 4)
    cache = explicit_cache(K=4, n_derivatives=2, taylor_threshold=1)
    last_residual = {}

    def residual(s):
        r = poly_residual(s, 2, base)
        return r

    for step in range(12):
        x = torch.randn(1, 8, 4)
        if cache.should_compute(True):
            cache.update(x + residual(step), x, True)
            last_residual["r"], last_residual["step"] = residual(step), step
        else:
            out = cache.approximate(x, True)
            if step - last_residual["step"] > 1:
                torch.testing.assert_close(out, x + last_residual["r"])
    assert cache.stats()["cond"]["reuse_approximations"] > 0
    assert cache.stats()["cond"]["taylor_approximations"] > 0


def test_order0_is_exactly_residual_reuse():
    cache = explicit_cache(K=3, n_derivatives=0, taylor_threshold=3)
    prev = None
    for step in range(12):
        x = torch.randn(3, 5)
        r = torch.randn(3, 5)
        if cache.should_compute(True):
            cache.update(x + r, x, True)
            prev = (x + r) - x  # the residual as the cache sees it
        else:
            assert torch.equal(cache.approximate(x, True), x + prev)
    assert cache.stats()["cond"]["taylor_approximations"] == 0


def test_branch_states_do_not_leak():
    torch.manual_seed(1)
    base_c, base_u = torch.randn(1, 4, 4), torch.randn(1, 4, 4)
    joint = explicit_cache(K=2, n_derivatives=1)
    alone = explicit_cache(K=2, n_derivatives=1)
    for step in range(12):
        x = torch.randn(1, 4, 4)
        outs = {}
        for is_cond, base in ((True, base_c), (False, base_u)):
            exact = x + poly_residual(step, 1, base)
            if joint.should_compute(is_cond):
                joint.update(exact, x, is_cond)
            else:
                outs[is_cond] = joint.approximate(x, is_cond)
        exact_c = x + poly_residual(step, 1, base_c)
        if alone.should_compute(True):
            alone.update(exact_c, x, True)
        elif True in outs:
            assert torch.equal(outs[True], alone.approximate(x, True))


def test_reset_is_indistinguishable_from_new():
    def trace(cache):
        torch.manual_seed(3)
        out = []
        for step in range(12):
            for is_cond in (True, False):
                x = torch.randn(2, 3)
                if cache.should_compute(is_cond):
                    cache.update(x * 1.5, x, is_cond)
                    out.append(("c", step))
                else:
                    out.append(("s", step, cache.approximate(x, is_cond)))
        return out

    used = explicit_cache(K=2)
    trace(used)
    used.reset()
    a, b = trace(used), trace(explicit_cache(K=2))
    assert len(a) == len(b)
    for ea, eb in zip(a, b):
        assert ea[:2] == eb[:2]
        if ea[0] == "s":
            assert torch.equal(ea[2], eb[2])


def test_fp32_state_and_input_dtype_output():
    cache = explicit_cache(K=2, n_derivatives=1)
    for step in range(4):
        x = torch.randn(2, 8).to(torch.bfloat16)
        if cache.should_compute(True):
            cache.update(x + 0.001 * step, x, True)
        else:
            out = cache.approximate(x, True)
            assert out.dtype == torch.bfloat16
    assert all(d.dtype == torch.float32 for d in cache._branches[True].differences)
    assert cache.memory_bytes() == 2 * 2 * 8 * 4  # D0 and D1, fp32


def test_planned_steps_equal_decisions_and_init_step_counter():
    cache = AdaTaylorCache(model_type="Wan2.1-T2V-1.3B", num_inference_steps=50, init_step=30)
    plan = cache.planned_compute_steps(True)
    assert plan[0] == 30 and plan[-1] == 49
    decided = []
    for _ in range(30, 50):
        if cache.should_compute(True):
            decided.append(cache.current_step(True))
            cache.update(torch.ones(1), torch.zeros(1), True)
        else:
            cache.approximate(torch.zeros(1), True)
    assert decided == plan


def test_more_calls_than_steps_is_an_error():
    cache = explicit_cache(n_steps=3)
    for _ in range(3):
        if cache.should_compute(True):
            cache.update(torch.ones(1), torch.zeros(1), True)
        else:
            cache.approximate(torch.zeros(1), True)
    with pytest.raises(CacheStateError, match="3 steps"):
        cache.should_compute(True)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(n_derivatives=-1), CacheConfigError, "n_derivatives"),
        (dict(taylor_threshold=0), CacheConfigError, "taylor_threshold"),
        (dict(num_inference_steps=0), CacheConfigError, "num_inference_steps"),
        (dict(model_type="Wan9-Nope"), UnknownModelError, "Wan2.1-T2V-1.3B"),
    ],
)
def test_bad_arguments(kw, exc, match):
    args = dict(model_type="Wan2.1-T2V-1.3B", num_inference_steps=50)
    args.update(kw)
    with pytest.raises(exc, match=match):
        AdaTaylorCache(**args)


def test_forecast_is_as_given_else_as_the_params_record_it_else_the_default():
    from ditcache.cache import AdaTaylorConfig
    from ditcache.params import load_params

    shipped = load_params("Wan2.1-T2V-1.3B")
    assert shipped.forecast is None
    tuned = dataclasses.replace(shipped, forecast={"n_derivatives": 2, "taylor_threshold": 6})

    def forecast(**kw):
        cache = AdaTaylorCache(num_inference_steps=50, **kw)
        return cache.n_derivatives, cache.taylor_threshold

    assert forecast(params=shipped) == (1, 2)  # the seed's defaults
    assert forecast(params=tuned) == (2, 6)  # the tuner's choice travels with its plan
    assert forecast(params=tuned, n_derivatives=0) == (0, 6)  # each half as given wins
    assert forecast(params=tuned, taylor_threshold=3) == (2, 3)
    built = AdaTaylorConfig(params=tuned).build(50)
    assert (built.n_derivatives, built.taylor_threshold) == (2, 6)
    with pytest.raises(CacheConfigError, match="taylor_threshold"):
        AdaTaylorConfig(params=tuned, taylor_threshold=0)


def test_explicit_params_errors():
    with pytest.raises(CacheConfigError, match="exactly one source"):
        AdaTaylorCache(model_type="Wan2.1-T2V-1.3B", K=2)
    with pytest.raises(CacheConfigError, match="missing"):
        AdaTaylorCache(cond_mag_ratios=[1.0], uncond_mag_ratios=[1.0], K=1, thresh=0.1)


def test_factory():
    assert isinstance(create_feature_cache("none"), NoCache)
    c = create_feature_cache("ada_taylor", model_type="Wan2.1-T2V-1.3B", num_inference_steps=50)
    assert c.n_derivatives == 1 and c.taylor_threshold == 2
    with pytest.raises(CacheConfigError, match="unknown cache 'nope'; known caches: .*ada_taylor.*calibrator.*none"):
        create_feature_cache("nope")
    with pytest.raises(CacheConfigError, match="'teacache' needs num_inference_steps"):
        create_feature_cache("teacache")
    with pytest.raises(CacheConfigError, match="accepts"):
        create_feature_cache("ada_taylor", model_type="Wan2.1-T2V-1.3B", order=1)
    cal = create_feature_cache("calibrator", num_inference_steps=10, sigma_shift=8.0, model_name="M")
    assert cal.K == 1 and math.isclose(cal.thresh, 0.12)


def test_stats_report_plan_next_to_decisions():
    cache = AdaTaylorCache(model_type="Wan2.1-T2V-1.3B", num_inference_steps=50)
    for _ in range(50):
        if cache.should_compute(True):
            cache.update(torch.ones(1), torch.zeros(1), True)
        else:
            cache.approximate(torch.zeros(1), True)
    st = cache.stats()
    assert list(st) == ["cond"], "a branch that never ran reports nothing"
    assert st["cond"]["computed_steps"] == st["cond"]["planned_compute_steps"]
    assert st["cond"]["num_computed"] + st["cond"]["num_skipped"] == 50
    assert st["cond"]["taylor_approximations"] + st["cond"]["reuse_approximations"] == st["cond"]["num_skipped"]
    assert st["cond"]["plan_source"] == "rule" and st["cond"]["resample_rule"] == "index"


def test_taylor_form_is_taylorseers_forecast_and_newton_is_exact_on_quadratics():
    """Order 2 on computed steps 0, 2, 4 (window 2), forecast at 5: the "taylor" form is
    sum D_i e^i / i! with D_{i+1} = (D_i - D_i') / window; "newton" reproduces a quadratic exactly."""
    def residual(t: float) -> torch.Tensor:
        return torch.full((1, 2, 3), 1.0 + 0.5 * t + 0.25 * t * t)

    steps = 7  # K=1 and thresh 1 compute 0, 2, 4, 6 (the last step always computes)
    plan = dict(cond_mag_ratios=[1.0] * steps, uncond_mag_ratios=[1.0] * steps, K=1, thresh=1.0,
                retention_ratio=0.0, num_inference_steps=steps, n_derivatives=2, taylor_threshold=5)
    forecasts = {}
    for form in ("newton", "taylor"):
        cache = AdaTaylorCache(**plan, taylor_form=form)
        zero = torch.zeros(1, 2, 3)
        for step in range(steps):
            if cache.should_compute(True):
                cache.update(residual(step), zero, True)
            else:
                forecasts.setdefault(form, {})[step] = cache.approximate(zero, True)
    assert set(forecasts["newton"]) == {1, 3, 5}
    assert torch.allclose(forecasts["newton"][5], residual(5))
    r0, r2, r4 = (float(residual(t)[0, 0, 0]) for t in (0, 2, 4))
    d1_old, d1 = (r2 - r0) / 2, (r4 - r2) / 2
    d2 = (d1 - d1_old) / 2
    assert torch.allclose(forecasts["taylor"][5], torch.full((1, 2, 3), r4 + d1 * 1 + d2 * 1 / 2))
    with pytest.raises(CacheConfigError, match="taylor_form must be one of"):
        AdaTaylorCache(**plan, taylor_form="euler")
