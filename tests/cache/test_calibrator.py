"""Calibrator: hand-computed ratios, exact merging of shards, atomic JSON that loads back."""

import json

import numpy as np
import pytest
import torch

from ditcache.cache import AdaTaylorCache, Calibrator
from ditcache.errors import CacheStateError, ParamsError
from ditcache.params import SHIPPED_PARAMS_DIR, load_params


def feed(cal: Calibrator, residuals: list[torch.Tensor], is_cond: bool = True, x=None):
    for r in residuals:
        assert cal.should_compute(is_cond)
        inp = torch.zeros_like(r) if x is None else x
        cal.update(inp + r, inp, is_cond)


def test_ratios_equal_hand_computation():
    r0 = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])  # token norms 5, 1
    r1 = torch.tensor([[[6.0, 8.0], [0.0, 2.0]]])  # token norms 10, 2 -> ratios 2, 2
    r2 = torch.tensor([[[3.0, 4.0], [0.0, 1.0]]])  # token norms 5, 1  -> ratios 0.5, 0.5
    cal = Calibrator(3, sigma_shift=5.0, model_name="hand")
    feed(cal, [r0, r1, r2])
    feed(cal, [r0, r1, r2 * 3], is_cond=False)  # ratios 1.5, 1.5 at step 2
    data = cal.result()
    assert data["cond_mag_ratios"] == pytest.approx([1.0, 2.0, 0.5])
    assert data["uncond_mag_ratios"] == pytest.approx([1.0, 2.0, 1.5])
    assert data["K"] == 1 and data["retention_ratio"] == 0.2 and data["thresh"] == 0.12


def test_mean_is_over_tokens_of_all_requests():
    cal = Calibrator(2)
    feed(cal, [torch.ones(1, 1, 4), 2 * torch.ones(1, 1, 4)])  # ratio 2 on 1 token
    cal.reset()
    feed(cal, [torch.ones(1, 3, 4), 4 * torch.ones(1, 3, 4)])  # ratio 4 on 3 tokens
    assert cal.result()["cond_mag_ratios"][1] == pytest.approx((2 + 3 * 4) / 4)
    assert cal.result()["provenance"]["requests"]["cond"] == 2


def test_merged_halves_equal_the_whole():
    torch.manual_seed(0)
    residuals = [torch.randn(2, 10, 8) for _ in range(6)]
    whole = Calibrator(6)
    feed(whole, residuals)
    feed(whole, [r * 0.9 for r in residuals], is_cond=False)
    halves = [Calibrator(6), Calibrator(6)]
    for i, sl in enumerate((slice(0, 4), slice(4, 10))):  # token shards of unequal size
        feed(halves[i], [r[:, sl] for r in residuals])
        feed(halves[i], [r[:, sl] * 0.9 for r in residuals], is_cond=False)
    halves[0].merge(halves[1])
    np.testing.assert_allclose(halves[0].statistics.sums, whole.statistics.sums, rtol=1e-12)
    np.testing.assert_array_equal(halves[0].statistics.counts, whole.statistics.counts)
    assert halves[0].result()["cond_mag_ratios"] == pytest.approx(whole.result()["cond_mag_ratios"], rel=1e-12)
    # the packed tensor (what ranks all-reduce) round-trips exactly
    packed = halves[0].stats_tensor()
    other = Calibrator(6)
    other.load_stats_tensor(packed)
    np.testing.assert_array_equal(other.statistics.counts, halves[0].statistics.counts)


def test_written_json_loads_back_and_drives_a_cache(tmp_path):
    torch.manual_seed(0)
    cal = Calibrator(10, sigma_shift=3.0, model_name="Tiny/Model-1.0", params_dir=tmp_path)
    for is_cond in (True, False):
        feed(cal, [torch.randn(1, 4, 8) * (1 + 0.1 * t) for t in range(10)], is_cond)
    path = cal.write()
    assert path == tmp_path / "Tiny_Model-1_0.json"
    assert not list(tmp_path.glob("*.tmp")), "the temp file must be renamed away"
    p = load_params("Tiny/Model-1.0", params_dir=tmp_path)
    assert p.num_inference_steps == 10 and p.sigma_shift == 3.0
    assert list(p.cond_mag_ratios) == pytest.approx(json.loads(path.read_text())["cond_mag_ratios"])
    cache = AdaTaylorCache(model_type="Tiny/Model-1.0", params_dir=str(tmp_path), num_inference_steps=10)
    assert cache.planned_compute_steps(True)[-1] == 9


def test_guidance_off_writes_cond_curve_for_both_and_says_so(tmp_path):
    cal = Calibrator(4, model_name="m")
    feed(cal, [torch.ones(1, 2, 2) * (t + 1) for t in range(4)])
    data = json.loads(cal.write(tmp_path / "m.json").read_text())
    assert data["uncond_mag_ratios"] == data["cond_mag_ratios"]
    assert "guidance off" in data["provenance"]["uncond_from"]


def test_never_overwrites_a_shipped_file_unless_asked(tmp_path, monkeypatch):
    cal = Calibrator(4, model_name="Wan2.1-T2V-1.3B")
    feed(cal, [torch.ones(1, 2, 2) * (t + 1) for t in range(4)])
    shipped = SHIPPED_PARAMS_DIR / "Wan2_1-T2V-1_3B.json"
    before = shipped.read_text()
    with pytest.raises(ParamsError, match="shipped"):
        cal.write(shipped)
    assert shipped.read_text() == before


def test_default_output_is_the_user_params_dir_not_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DITCACHE_PARAMS_DIR", str(tmp_path))
    cal = Calibrator(4, model_name="Wan2.1-T2V-1.3B")
    feed(cal, [torch.ones(1, 2, 2) * (t + 1) for t in range(4)])
    assert cal.write() == tmp_path / "Wan2_1-T2V-1_3B.json"
    assert load_params("Wan2.1-T2V-1.3B").path == str(tmp_path / "Wan2_1-T2V-1_3B.json")


def test_incomplete_or_empty_calibration_is_an_error():
    cal = Calibrator(4)
    with pytest.raises(CacheStateError, match="no data"):
        cal.result()
    feed(cal, [torch.ones(1, 2, 2)] * 2)
    with pytest.raises(CacheStateError, match="steps \\[2, 3\\]"):
        cal.result()
    with pytest.raises(CacheStateError):
        cal.approximate(torch.ones(1), True)
    feed(cal, [torch.ones(1, 2, 2)] * 2)
    with pytest.raises(CacheStateError, match="reset"):
        cal.should_compute(True)
