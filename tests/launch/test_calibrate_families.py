"""``ditcache calibrate`` works for every family: the pipeline's ``settings`` name the model and its
default guidance, and the request runs at a tiny size (latents only: nothing is decoded)."""

from __future__ import annotations

import json

import pytest
from conftest import write_tiny_digit_model, write_tiny_hunyuan_dir, write_tiny_qwen_dir

from ditcache.launch import calibrate

STEPS = 4
TINY = ["--height", "32", "--width", "48"]  # divisible by the VAE scale (8) x patch size (2)


@pytest.mark.parametrize(
    "family, write, options, model_type, branches",
    [
        ("wan", write_tiny_digit_model, ["--prompt", "a handwritten 3"], "custom", {"cond", "uncond"}),
        # guidance distilled: the default guidance 1 runs the conditional branch only
        ("hunyuan_video", write_tiny_hunyuan_dir, ["--prompt", "a red cat", *TINY, "--num-frames", "5"],
         "HunyuanVideo-T2V", {"cond"}),
        ("qwen_image", write_tiny_qwen_dir, ["--prompt", "a red cat", *TINY], "Qwen-Image", {"cond", "uncond"}),
    ],
    ids=["wan", "hunyuan_video", "qwen_image"],
)
def test_calibrate_writes_a_tuned_curve_for_every_family(tmp_path, capsys, family, write, options, model_type, branches):
    model_dir = write(tmp_path / "model")
    output = tmp_path / "curve.json"
    argv = ["--model", family, "--model-dir", str(model_dir), "--steps", str(STEPS), "--no-progress",
            "--output", str(output), "--max-error", "1e9", *options]
    assert calibrate.main(argv) == 0, capsys.readouterr().err
    data = json.loads(output.read_text())
    assert data["model_type"] == model_type and data["num_inference_steps"] == STEPS
    assert {branch for branch, count in data["provenance"]["requests"].items() if count} == branches
    assert data["provenance"]["tuned"]
