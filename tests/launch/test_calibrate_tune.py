"""``ditcache calibrate --target-speedup`` on the bundled reference model: the tuner tunes a plan per
forecast, checks the finalists by running them, and the params file carries the chosen forecast, so
a pipeline given only the file runs what was checked."""

from __future__ import annotations

import json

import pytest
import torch

from ditcache import AdaTaylorConfig
from ditcache.cache.tune import FORECAST_GRID
from ditcache.families import load_pipeline
from ditcache.launch import calibrate
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.params import load_params

PROMPTS = ["a handwritten 3", "a handwritten 7"]
REQUEST = {"num_inference_steps": 20, "sigma_shift": 5.0}


def _calibrate(tmp_path, *extra: str, model: str = "reference") -> dict:
    out = tmp_path / "tuned.json"
    argv = ["--model", model, "--steps", "20", "--shift", "5", "--no-progress", "--output", str(out),
            *(a for p in PROMPTS for a in ("--prompt", p)), *extra]  # fmt: skip
    assert calibrate.main(argv) == 0
    return json.loads(out.read_text())


def test_the_checked_forecast_is_written_and_is_what_a_pipeline_runs(tmp_path):
    torch.set_num_threads(1)
    data = _calibrate(tmp_path, "--target-speedup", "5")
    checked = data["provenance"]["tuned"]["forecasts_checked"]
    assert [(c["n_derivatives"], c["taylor_threshold"]) for c in checked] == list(FORECAST_GRID)
    best = min(checked, key=lambda c: c["check_mse"])
    assert data["forecast"] == {"n_derivatives": best["n_derivatives"], "taylor_threshold": best["taylor_threshold"]}
    assert len({c["check_mse"] for c in checked}) > 1, "the forecasts must differ for the check to choose"

    # A user's run of the file alone (same prompts and seed as the check) lands where the check measured.
    pipe = load_pipeline(REFERENCE_DIGITS)
    common = {**REQUEST, "seed": 1000, "output_type": "latent", "progress": False}
    reference = pipe(prompt=PROMPTS, cache=None, **common).frames
    out = pipe(prompt=PROMPTS, cache=AdaTaylorConfig(params=load_params(tmp_path / "tuned.json")), **common)
    assert sum(out.total_stack_passes().values()) == 2 * 4  # 5x fewer block passes: 4 of 20 per branch
    mse = float((out.frames.double() - reference.double()).pow(2).mean())
    assert mse == pytest.approx(best["check_mse"], rel=1e-6)


def test_a_given_forecast_is_tuned_for_alone_and_not_checked(tmp_path):
    torch.set_num_threads(1)
    data = _calibrate(tmp_path, "--target-speedup", "2", "--order", "1", "--taylor-threshold", "2")
    assert data["forecast"] == {"n_derivatives": 1, "taylor_threshold": 2}
    assert data["provenance"]["tuned"]["forecasts_checked"] == []


def test_finalists_are_every_forecast_for_a_target_and_the_fastest_for_an_error_budget():
    from ditcache.cache.tune import Candidate, TuneResult

    def result(speedup: float, n: int, t: int) -> TuneResult:
        plan = Candidate("placement", {True: [0, 9], False: [0, 9]}, 1.0)
        return TuneResult(plan, speedup, 1.0, 1, {"n_derivatives": n, "taylor_threshold": t})

    results = [result(2.0, 1, 2), result(2.2, 1, 3), result(2.2, 2, 6)]
    error = {(1, 2): 0.1, (1, 3): 0.3, (2, 6): 0.2}
    checked_order = []

    def check(r: TuneResult) -> float:
        checked_order.append((r.forecast["n_derivatives"], r.forecast["taylor_threshold"]))
        return error[checked_order[-1]]

    chosen, checked = calibrate.choose_forecast(results, check, by_speed=False, show=False)
    assert chosen is results[0] and len(checked) == 3 and checked_order == [(1, 2), (1, 3), (2, 6)]
    checked_order.clear()
    chosen, checked = calibrate.choose_forecast(results, check, by_speed=True, show=False)
    assert chosen is results[2] and checked_order == [(1, 3), (2, 6)]
    chosen, checked = calibrate.choose_forecast(results[:1], check, by_speed=False, show=False)
    assert chosen is results[0] and checked == []


def test_a_bad_forecast_is_one_line_before_anything_loads(tmp_path, capsys):
    argv = ["--model", "reference", "--target-speedup", "2", "--taylor-threshold", "0", "--output", str(tmp_path / "x.json")]
    assert calibrate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "taylor_threshold must be an integer >= 1" in err
    assert not (tmp_path / "x.json").exists()


def test_a_two_expert_plan_computes_the_switch_and_runs_at_the_target(tmp_path):
    """The low-noise expert starts a fresh cache, which computes its first step: the tuner places the
    budget around that step, so the run makes exactly the passes the target asks for."""
    torch.set_num_threads(1)
    data = _calibrate(tmp_path, "--target-speedup", "5", "--order", "1", "--taylor-threshold", "2", model="reference-moe")
    pipe = load_pipeline(REFERENCE_DIGITS_MOE)
    out = pipe(prompt=PROMPTS, seed=1000, output_type="latent", progress=False,
               cache=AdaTaylorConfig(params=load_params(tmp_path / "tuned.json")), **REQUEST)  # fmt: skip
    switch = out.expert_steps["transformer_2"][0]
    ran = {name: branch["computed_steps"] for name, branch in out.telemetry()["branches"].items()}
    assert 0 < switch < 19 and all(switch in steps for steps in ran.values())
    assert out.total_stack_passes() == {"cond": 4, "uncond": 4}
