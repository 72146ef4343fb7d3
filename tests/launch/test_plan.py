"""`ditcache plan` prints the plan the run executes, two-expert models included."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ditcache import AdaTaylorConfig, load_pipeline
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.params import SHIPPED_PARAMS_DIR


def plan(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "ditcache.cli", "plan", *args, "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_wan22_plans_per_expert_and_computes_the_switch_step():
    result = plan("--model", "Wan2.2-T2V-A14B", "--steps", "20")
    assert result["boundary_ratio"] == 0.875 and result["sigma_shift"] == 12.0
    assert result["compute_steps"]["cond"] == [0, 1, 2, 3, 4, 11, 13, 18, 19]  # 13: the low-noise expert's first
    assert result["block_passes"] == {"uncached": 40, "cached": 18}
    assert result["experts"]["transformer_2"]["steps"][0] == 13


@pytest.mark.parametrize(
    "model_dir, params, boundary", [(REFERENCE_DIGITS, "Reference-Digits", None), (REFERENCE_DIGITS_MOE, "Reference-Digits-MoE", "0.875")]
)
def test_the_printed_plan_is_what_the_pipeline_runs(model_dir, params, boundary):
    extra = [] if boundary is None else ["--boundary-ratio", boundary]
    result = plan("--params-file", str(SHIPPED_PARAMS_DIR / f"{params}.json"), "--steps", "20", "--shift", "5", *extra)
    run = load_pipeline(model_dir)(
        ["a handwritten 2"], num_inference_steps=20, sigma_shift=5.0, seed=0, cache=AdaTaylorConfig(), progress=False
    )
    ran = {name: branch["computed_steps"] for name, branch in run.telemetry()["branches"].items()}
    assert ran == result["compute_steps"]
    passes = sum(run.total_stack_passes().values())
    assert passes == result["block_passes"]["cached"]


def test_the_printed_forecast_is_the_params_tuned_one_unless_given(tmp_path):
    shipped = SHIPPED_PARAMS_DIR / "Reference-Digits.json"
    assert plan("--params-file", str(shipped))["forecast"] == {"n_derivatives": 1, "taylor_threshold": 2}
    tuned = tmp_path / "tuned.json"
    tuned.write_text(json.dumps({**json.loads(shipped.read_text()), "forecast": {"n_derivatives": 2, "taylor_threshold": 6}}))
    assert plan("--params-file", str(tuned))["forecast"] == {"n_derivatives": 2, "taylor_threshold": 6}
    given = plan("--params-file", str(tuned), "--n-derivatives", "1")
    assert given["forecast"] == {"n_derivatives": 1, "taylor_threshold": 6}
