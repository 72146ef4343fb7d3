"""bench.forecast_check end to end on a small cell: both params files come from the real command and
the written forecast is the checked candidate closest to the uncached latents."""

from __future__ import annotations

import json

from ditcache.cache.tune import FORECAST_GRID

from bench import forecast_check


def test_small_cells_compare_the_checked_forecast_with_the_fixed_one(tmp_path):
    out = tmp_path / "check.json"
    forecast_check.main(["--models", "reference", "--steps", "10", "--targets", "2.5", "2", "--samples", "2",
                         "--out", str(out)])  # fmt: skip
    row, other = json.loads(out.read_text())["results"]
    assert other["fixed_compute_fraction"] == other["checked_compute_fraction"] == 0.5
    assert row["fixed_forecast"] == {"n_derivatives": 1, "taylor_threshold": 2}
    checked = row["checked_candidates"]
    assert [(c["n_derivatives"], c["taylor_threshold"]) for c in checked] == list(FORECAST_GRID)
    best = min(checked, key=lambda c: c["check_mse"])
    assert row["checked_forecast"] == {"n_derivatives": best["n_derivatives"], "taylor_threshold": best["taylor_threshold"]}
    assert row["fixed_compute_fraction"] == row["checked_compute_fraction"] == 0.4  # 4 of 10 steps per branch
    low, high = row["checked_minus_fixed"]["ci95"]
    assert low <= row["checked_minus_fixed"]["margin_db"] <= high
