"""bench.plan_ceiling: the plans it enumerates, its summary, and one small end-to-end run."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from ditcache.models import REFERENCE_DIGITS

from bench import plan_ceiling
from bench.quality.workload import Workload


def _work(steps: int, expert_steps: dict[str, list[int]]) -> Workload:
    return Workload("w", "w", None, steps, 5.0, 4.0, expert_steps, 2)


def test_every_plan_computes_the_first_step_and_each_expert_start():
    one = plan_ceiling.all_plans(_work(8, {"transformer": list(range(8))}), 3, last_step=False)
    assert len(one) == math.comb(7, 2) and all(p[0] == 0 and len(p) == 3 for p in one)
    assert [0, 1, 2] in one  # the last step is left to the forecast in some plans
    ends = plan_ceiling.all_plans(_work(8, {"transformer": list(range(8))}), 3, last_step=True)
    assert len(ends) == math.comb(6, 1) and all(p[0] == 0 and p[-1] == 7 and len(p) == 3 for p in ends)
    moe = _work(8, {"transformer": [0, 1, 2, 3], "transformer_2": [4, 5, 6, 7]})
    two = plan_ceiling.all_plans(moe, 4, last_step=False)
    assert len(two) == math.comb(6, 2) and all({0, 4} <= set(p) and len(p) == 4 for p in two)
    assert len(plan_ceiling.all_plans(moe, 4, last_step=True)) == math.comb(5, 1)
    with pytest.raises(SystemExit, match="below the 3 steps every plan computes"):
        plan_ceiling.all_plans(moe, 2, last_step=True)


def _row(psnr: float, fraction: float, mse: list[float], **fields) -> dict:
    return {"psnr": psnr, "compute_fraction": fraction, "per_image_mse": mse, "computed_steps": [], **fields}


def test_summary_ranks_the_tuner_and_interpolates_teacache():
    args = argparse.Namespace(steps=8, budget=2, last_step=False)
    rows = [_row(p, 0.25, [10 ** (-p / 10)] * 3, plan=[0, s, 7], n_derivatives=1, taylor_threshold=2)
            for p, s in ((20.0, 2), (26.0, 3), (23.0, 4))]  # fmt: skip
    tuner = [dict(rows[2])]
    tea = [_row(22.0, 0.2, [10**-2.2] * 3, thresh=0.5, warmup=1), _row(28.0, 0.3, [10**-2.8] * 3, thresh=0.2, warmup=1)]
    out = plan_ceiling.summarize("m", args, rows, tuner, tea)
    assert out["best_plan"]["plan"] == [0, 3, 7] and out["best_plan"]["rank"] == 1
    assert out["tuner"][0]["rank"] == 2
    assert out["teacache"]["interpolation"] == "interpolated" and out["teacache"]["psnr"] == pytest.approx(25.0)
    assert out["best_plan"]["vs_teacache"]["margin_db"] == pytest.approx(1.0, abs=1e-3)
    assert out["tuner"][0]["vs_teacache"]["margin_db"] == pytest.approx(-2.0, abs=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE_DIGITS / "model_index.json").is_file(), reason="the bundled reference model is not present")
def test_small_run_writes_every_plan_and_the_tuner_is_among_them(tmp_path, capsys):
    out = tmp_path / "ceiling.json"
    plan_ceiling.main(["--models", "reference-digits", "--steps", "6", "--budget", "3", "--samples", "2", "--out", str(out)])
    result = json.loads(out.read_text())["results"][0]
    assert result["plans"] == math.comb(5, 2) and result["runs"] == 10 * len(plan_ceiling.FORECASTS)
    best = max(p["psnr"] for p in result["all_plans"])
    assert result["best_plan"]["psnr"] == best
    plans = {tuple(p["plan"]) for p in result["all_plans"]}
    assert result["tuner"] and all(tuple(t["plan"]) in plans and t["psnr"] <= best for t in result["tuner"])
    assert "best - TeaCache" in capsys.readouterr().out
