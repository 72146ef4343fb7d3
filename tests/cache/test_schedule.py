"""The skip schedule: invariants over random curves, and hand-derived plans of shipped files."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ditcache.cache.schedule import compute_skip_schedule, resample_nearest
from ditcache.errors import CacheConfigError
from ditcache.params import SHIPPED_PARAMS_DIR, load_params


@st.composite
def schedule_inputs(draw):
    n = draw(st.integers(1, 60))
    ratios = draw(st.lists(st.floats(0.5, 1.5), min_size=n, max_size=n))
    K = draw(st.integers(0, 8))
    thresh = draw(st.floats(0.0, 1.0))
    retention = draw(st.floats(0.0, 0.99))
    init_step = draw(st.integers(0, n - 1))
    return ratios, n, K, thresh, retention, init_step


def _max_run_of_skips(compute: list[int], n: int) -> int:
    longest, run = 0, 0
    computed = set(compute)
    for s in range(n):
        run = 0 if s in computed else run + 1
        longest = max(longest, run)
    return longest


@settings(max_examples=300, deadline=None)
@given(schedule_inputs())
def test_schedule_invariants(args):
    ratios, n, K, thresh, retention, init_step = args
    compute = compute_skip_schedule(ratios, n, K, thresh, retention, init_step)
    assert compute == sorted(set(compute))
    assert all(0 <= s < n for s in compute)
    for s in range(int(n * retention) + 1):
        assert s in compute, "warm-up steps must be computed"
    assert n - 1 in compute and init_step in compute
    assert _max_run_of_skips(compute, n) <= K


@settings(max_examples=200, deadline=None)
@given(schedule_inputs(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_compute_count_falls_as_thresh_rises(args, t1, t2):
    ratios, n, K, _, retention, init_step = args
    lo, hi = sorted((t1, t2))
    n_lo = len(compute_skip_schedule(ratios, n, K, lo, retention, init_step))
    n_hi = len(compute_skip_schedule(ratios, n, K, hi, retention, init_step))
    assert n_hi <= n_lo


@settings(max_examples=100, deadline=None)
@given(schedule_inputs(), st.lists(st.floats(0.5, 1.5), min_size=60, max_size=60))
def test_cond_and_uncond_schedules_are_independent(args, other):
    """The cond plan depends only on the cond curve: changing the uncond curve never moves it."""
    from ditcache.cache.ada_taylor import AdaTaylorCache

    ratios, n, K, thresh, retention, init_step = args
    kw = dict(K=K, thresh=thresh, retention_ratio=retention, num_inference_steps=n, init_step=init_step)
    a = AdaTaylorCache(cond_mag_ratios=ratios, uncond_mag_ratios=ratios, **kw)
    b = AdaTaylorCache(cond_mag_ratios=ratios, uncond_mag_ratios=other[:n], **kw)
    assert a.planned_compute_steps(True) == b.planned_compute_steps(True)
    expected = compute_skip_schedule(other[:n], n, K, thresh, retention, init_step)
    assert b.planned_compute_steps(False) == [s for s in expected if s >= init_step]


# Derived by hand from the skip rule (start = int(50 * 0.2) = 10). Wan2.1-T2V-1.3B, K=4,
# thresh=0.12: after step 10, the cond ratios 0.99511, 0.99535, 0.99552, 0.99541 give an accumulated
# error 0.0049 + 0.0095 + 0.0139 + 0.0185 = 0.047 < 0.12 over 4 skips, so step 15 computes because
# the fifth skip would exceed K; the same K-bound holds until the ratios fall late in the run, where
# the error bound takes over (39, 42, 44, 46, 48) and 49 is the forced last step.
WAN21_13B_COMPUTE = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 35, 39, 42, 44, 46, 48, 49]
# Wan2.1-T2V-14B, K=6, thresh=0.24: runs of six skips (11-16, 18-23, 25-30), then the error bound.
WAN21_14B_COMPUTE = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 24, 31, 37, 41, 44, 47, 49]


@pytest.mark.parametrize(
    "model,expected",
    [("Wan2.1-T2V-1.3B", WAN21_13B_COMPUTE), ("Wan2.1-T2V-14B", WAN21_14B_COMPUTE)],
)
def test_shipped_wan21_plans_match_hand_derivation(model, expected):
    p = load_params(model)
    assert p.num_inference_steps == 50
    for curve in (p.cond_mag_ratios, p.uncond_mag_ratios):
        assert compute_skip_schedule(curve, 50, p.K, p.thresh, p.retention_ratio) == expected


def test_hand_derivation_of_first_skip_run():
    """Recompute the first decision window of the 1.3B file explicitly, independent of the loop."""
    data = json.loads((SHIPPED_PARAMS_DIR / "Wan2_1-T2V-1_3B.json").read_text())
    r = data["cond_mag_ratios"]
    acc, err = 1.0, 0.0
    for step in range(11, 16):
        acc *= r[step]
        err += abs(1 - acc)
    assert err < 0.12  # so step 15 is computed only because of K = 4
    assert 15 in WAN21_13B_COMPUTE and not set(range(11, 15)) & set(WAN21_13B_COMPUTE)


def test_resample_nearest_rule():
    curve = [float(i) for i in range(50)]
    assert resample_nearest(curve, 50) == curve
    assert resample_nearest(curve, 1) == [0.0]
    out = resample_nearest(curve, 25)
    assert out[0] == 0.0 and out[-1] == 49.0 and len(out) == 25
    # idx = round([0, .25, .5, .75, 1]) with numpy's round-half-to-even, as the original product does
    assert resample_nearest([1.0, 2.0], 5) == [1.0, 1.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(K=-1), "K"),
        (dict(retention_ratio=1.0), "retention_ratio"),
        (dict(retention_ratio=-0.1), "retention_ratio"),
        (dict(thresh=float("nan")), "thresh"),
        (dict(num_steps=0), "num_inference_steps"),
        (dict(init_step=10), "init_step"),
    ],
)
def test_schedule_rejects_bad_settings(kw, match):
    args = dict(ratios=[1.0] * 10, num_steps=10, K=2, thresh=0.1, retention_ratio=0.2, init_step=0)
    args.update(kw)
    if args["num_steps"] == 0:
        args["ratios"] = []
    with pytest.raises(CacheConfigError, match=match):
        compute_skip_schedule(**args)


def test_schedule_rejects_curve_of_wrong_length():
    with pytest.raises(CacheConfigError, match="resample"):
        compute_skip_schedule([1.0] * 9, 10, 2, 0.1, 0.2)


def _shifted_sigmas(n, shift):
    s = [1 - i / n for i in range(n)]
    return [shift * x / (1 + (shift - 1) * x) for x in s]


def test_sigma_rule_is_identity_on_the_calibration_sigmas():
    from ditcache.cache.schedule import resample_by_sigma

    curve = load_params("Wan2.1-T2V-1.3B").cond_mag_ratios
    sig = _shifted_sigmas(50, 5.0)
    assert resample_by_sigma(curve, sig, sig) == pytest.approx(list(curve), abs=1e-12)


def test_sigma_rule_multiplies_ratios_over_the_covered_interval():
    from ditcache.cache.schedule import resample_by_sigma

    curve = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    sig = [1.0, 0.8, 0.6, 0.4, 0.2, 0.1]
    out = resample_by_sigma(curve, sig, [1.0, 0.6, 0.2])  # each run step spans two calibration steps
    assert out == pytest.approx([1.0, 0.9 * 0.8, 0.7 * 0.6])


def test_ada_taylor_resample_option():
    from ditcache.cache import AdaTaylorCache

    curve = [1.0] + [0.99 - 0.004 * i for i in range(49)]
    sig = _shifted_sigmas(50, 3.0)
    base = dict(K=4, thresh=0.12, retention_ratio=0.2)
    params = dict(cond_mag_ratios=curve, uncond_mag_ratios=curve, **base)
    plain = AdaTaylorCache(**params, num_inference_steps=20, sigmas=_shifted_sigmas(20, 5.0))
    assert plain.resample_rule == "index"  # explicit params carry no calibration sigmas
    from ditcache.params import params_from_dict

    with_sigmas = params_from_dict({**params, "sigmas": sig})
    by_sigma = AdaTaylorCache(params=with_sigmas, num_inference_steps=20, sigmas=_shifted_sigmas(20, 5.0))
    by_index = AdaTaylorCache(params=with_sigmas, num_inference_steps=20, sigmas=_shifted_sigmas(20, 5.0), resample="index")
    assert by_sigma.resample_rule == "sigma" and by_index.resample_rule == "index"
    # bigger steps drift further per step: the sigma rule never plans fewer computes here
    assert len(by_sigma.planned_compute_steps(True)) >= len(by_index.planned_compute_steps(True))
    with pytest.raises(CacheConfigError, match="sigma"):
        AdaTaylorCache(**params, num_inference_steps=20, resample="sigma")
    with pytest.raises(CacheConfigError, match="20"):
        AdaTaylorCache(params=with_sigmas, num_inference_steps=20, sigmas=sig)
