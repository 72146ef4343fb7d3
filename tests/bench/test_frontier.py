"""Fair matching on synthetic data: front, interpolation at a band, paired-bootstrap margins."""

from __future__ import annotations

import numpy as np
import pytest

from bench.quality.frontier import frontier_table, front, interpolation, paired_margin, pooled_psnr, value


def run(fraction: float, mse: list[float], method: str = "m", model: str = "x", steps: int = 20) -> dict:
    return {"model": model, "steps": steps, "method": method, "setting": {"f": fraction},
            "compute_fraction": fraction, "psnr": float(pooled_psnr(np.array(mse))), "per_image_mse": mse}  # fmt: skip


def test_front_drops_dominated_points():
    pts = [run(0.5, [1e-4]), run(0.4, [1e-3]), run(0.6, [2e-4]), run(0.3, [1e-2])]
    assert [p["compute_fraction"] for p in front(pts)] == [0.3, 0.4, 0.5]


def test_interpolation_is_linear_in_compute_fraction():
    a, b = run(0.25, [1e-3]), run(0.75, [1e-5])  # 30 dB at 4x, 50 dB at 1.33x
    how = interpolation([a, b], 2.0)  # fraction 0.5: half way
    assert how["kind"] == "interpolated"
    assert value([a, b], how) == pytest.approx(40.0)
    exact = interpolation([a, b], 4.0)
    assert exact["kind"] == "exact" and value([a, b], exact) == pytest.approx(30.0)


def test_interpolation_never_extrapolates():
    a, b = run(0.3, [1e-3]), run(0.6, [1e-5])
    assert interpolation([a, b], 5.0) is None  # nothing at least 5x fast
    stair = interpolation([a, b], 1.5)  # fraction 0.667: only faster points; the best of them
    assert stair["kind"] == "staircase" and value([a, b], stair) == pytest.approx(50.0)


def test_paired_margin_known_answer():
    rng = np.random.default_rng(1)
    peer_mse = list(rng.uniform(1e-4, 1e-3, size=30))
    ours_mse = [m * 10 ** -0.5 for m in peer_mse]  # exactly 5 dB better on every resample
    ours, peer = [run(0.5, ours_mse)], [run(0.5, peer_mse)]
    m = paired_margin(ours, interpolation(ours, 2.0), peer, interpolation(peer, 2.0))
    assert m["margin_db"] == pytest.approx(5.0, abs=1e-3)
    assert m["ci95"][0] == pytest.approx(5.0, abs=1e-3) and m["ci95"][1] == pytest.approx(5.0, abs=1e-3)
    assert m["p_ours_not_better"] == 0.0


def test_paired_margin_interval_covers_the_truth_and_pairing_narrows_it():
    """Samples differ a lot in difficulty, methods little: pairing removes the sample spread."""
    rng = np.random.default_rng(2)
    difficulty = rng.lognormal(0, 1.0, size=40) * 1e-4
    ours_mse = list(difficulty * np.exp(rng.normal(0, 0.05, 40)))
    peer_mse = list(difficulty * 1.26 * np.exp(rng.normal(0, 0.05, 40)))  # ~1 dB worse
    ours, peer = [run(0.4, ours_mse)], [run(0.4, peer_mse)]
    m = paired_margin(ours, interpolation(ours, 2.5), peer, interpolation(peer, 2.5))
    low, high = m["ci95"]
    assert low < m["margin_db"] < high
    assert 0.5 < low and high < 1.5  # an unpaired interval over this spread would be several dB wide


def test_frontier_table_picks_the_best_peer_and_reports_unreached_bands():
    mse = [1e-4] * 5
    rows = [run(1.0, [0.0] * 5, "uncached")]
    rows += [run(f, [m / f for m in mse], "ours") for f in (0.2, 0.3, 0.5, 0.7)]
    rows += [run(f, [m * 3 / f for m in mse], "good-peer") for f in (0.3, 0.5, 0.7)]
    rows += [run(f, [m * 10 / f for m in mse], "bad-peer") for f in (0.45, 0.7)]
    table = frontier_table(rows, "ours", ["good-peer", "bad-peer"])["x"]["20"]
    two = table["2x"]
    assert two["best_peer"] == "good-peer"
    assert two["margin_vs_best_peer"]["margin_db"] == pytest.approx(10 * np.log10(3), abs=1e-3)
    assert table["4x"]["methods"]["good-peer"] is None and table["4x"]["methods"]["bad-peer"] is None
    assert table["4x"]["best_peer"] is None and table["4x"]["methods"]["ours"]["kind"] == "interpolated"
