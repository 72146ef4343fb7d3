"""Params files: the shipped set, the user directory, validation errors and resampling."""

import json
import math

import pytest

from ditcache.cache import AdaTaylorCache
from ditcache.errors import ParamsError, UnknownModelError
from ditcache.params import PARAMS_DIR_ENV, list_models, load_params, sanitize_model_name

TWELVE = {
    "Wan2.1-T2V-1.3B": 50, "Wan2.1-T2V-14B": 50, "Wan2.1-I2V-14B-480P": 50, "Wan2.1-I2V-14B-720P": 50,
    "Wan2.1-FL2V-14B-720P": 50, "Wan2.2-T2V-A14B": 50, "Wan2.2-I2V-A14B": 40, "Wan2.2-FL2V-A14B": 40,
    "HunyuanVideo-T2V": 50, "HunyuanVideo-I2V": 50, "Qwen-Image": 50, "Qwen-Image-Edit-Plus": 40,
}


def test_twelve_models_are_shipped_with_provenance():
    assert set(TWELVE) <= set(list_models())
    for model, steps in TWELVE.items():
        p = load_params(model)
        assert p.default_steps == steps
        assert p.provenance["source_repo"] and p.provenance["source_commit"]
        assert "proxy" in p.provenance
    assert load_params("HunyuanVideo-I2V").provenance["proxy"] is True
    assert load_params("Qwen-Image-Edit-Plus").provenance["proxy"] is True
    assert load_params("Wan2.1-T2V-1.3B").provenance["proxy"] is False


def test_sanitised_names():
    assert sanitize_model_name("Wan2.1-T2V-1.3B") == "Wan2_1-T2V-1_3B"
    assert sanitize_model_name("org/model.v2") == "org_model_v2"
    assert "/" not in sanitize_model_name("../../etc/passwd")
    with pytest.raises(ParamsError):
        sanitize_model_name("")


def _write(tmp_path, name, **overrides):
    data = json.loads(json.dumps({
        "K": 2, "retention_ratio": 0.2, "thresh": 0.1,
        "cond_mag_ratios": [1.0, 0.99, 0.98, 0.9], "uncond_mag_ratios": [1.0, 0.99, 0.98, 0.9],
    }))
    for k, v in overrides.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))  # NaN/inf are written as JSON extensions, as numpy users do
    return path


def test_user_dir_overrides_and_extends(tmp_path, monkeypatch):
    _write(tmp_path, "Wan2_1-T2V-1_3B", K=7, model_type="Wan2.1-T2V-1.3B")
    _write(tmp_path, "MyModel")
    assert load_params("Wan2.1-T2V-1.3B", params_dir=tmp_path).K == 7
    assert "MyModel" in list_models(tmp_path)
    monkeypatch.setenv(PARAMS_DIR_ENV, str(tmp_path))
    assert load_params("Wan2.1-T2V-1.3B").K == 7
    assert load_params("MyModel").num_inference_steps == 4


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(K=None), "missing required key.*'K'"),
        (dict(cond_mag_ratios=[1.0, 0.9]), "cond_mag_ratios.*2 entries.*uncond_mag_ratios.*4"),
        (dict(cond_mag_ratios=[1.0, float("nan"), 1.0, 1.0]), r"'cond_mag_ratios'\[1\]"),
        (dict(uncond_mag_ratios=[1.0, float("inf"), 1.0, 1.0]), r"'uncond_mag_ratios'\[1\]"),
        (dict(cond_mag_ratios=[1.0, -0.5, 1.0, 1.0]), r"'cond_mag_ratios'\[1\]"),
        (dict(K=-1), "'K'"),
        (dict(retention_ratio=1.0), "'retention_ratio'"),
        (dict(thresh=-0.1), "'thresh'"),
        (dict(num_inference_steps=50), "'num_inference_steps' is 50"),
        (dict(forecast={"n_derivatives": 1}), "'forecast'"),
        (dict(forecast={"n_derivatives": 1, "taylor_threshold": 0}), "'forecast'"),
        (dict(forecast={"n_derivatives": -1, "taylor_threshold": 2}), "'forecast'"),
        (dict(forecast=[1, 2]), "'forecast'"),
        (dict(compute_steps={"num_inference_steps": 4, "cond": [0, 2, 4], "uncond": [0, 3]}), "'cond'.*from 0 to 3"),
        (dict(compute_steps={"num_inference_steps": 4, "cond": [0, 2], "uncond": [1, 3]}), "'uncond'.*starts with 0"),
        (dict(compute_steps={"num_inference_steps": 4, "cond": [0, 2, 2], "uncond": [0]}), "'cond'.*distinct"),
    ],
)
def test_validation_names_file_and_key(tmp_path, overrides, match):
    path = _write(tmp_path, "bad", **overrides)
    with pytest.raises(ParamsError, match=match) as info:
        load_params(path)
    assert "bad.json" in str(info.value)


def test_unknown_model_lists_known_ones():
    with pytest.raises(UnknownModelError) as info:
        load_params("Wan3.0-T2V")
    msg = str(info.value)
    assert "Wan3.0-T2V" in msg and "Wan2.1-T2V-1.3B" in msg and "Qwen-Image" in msg


def test_invalid_json_is_a_params_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ParamsError, match="broken.json"):
        load_params(path)


@pytest.mark.parametrize("steps", [1, 2, 7, 20, 40, 50, 100])
def test_shipped_curves_resample_to_any_step_count(steps):
    for model in TWELVE:
        cache = AdaTaylorCache(model_type=model, num_inference_steps=steps)
        plan = cache.planned_compute_steps(True)
        assert plan[0] == 0 and plan[-1] == steps - 1
        assert all(math.isfinite(r) for r in cache._ratios[True])


def test_a_tuned_plan_may_leave_the_last_step_to_the_forecast(tmp_path):
    """A placement need not compute the last step (its error is scaled by the smallest sigma interval)."""
    path = _write(tmp_path, "tuned", compute_steps={"num_inference_steps": 4, "cond": [0, 2], "uncond": [0, 1, 2]})
    cache = AdaTaylorCache(params=load_params(path), num_inference_steps=4)
    assert cache.planned_compute_steps(True) == [0, 2] and cache.planned_compute_steps(False) == [0, 1, 2]
    assert cache.planned_skip_steps(True) == [1, 3]
