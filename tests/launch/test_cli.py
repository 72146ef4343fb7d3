"""The `ditcache` console script: list and plan, through a real subprocess."""

import json
import subprocess
import sys

import pytest


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ditcache.cli", *args], capture_output=True, text=True, timeout=60)


def test_list_shows_the_shipped_models():
    out = run_cli("list", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["model_type"]: r for r in json.loads(out.stdout)}
    assert rows["Wan2.1-T2V-1.3B"]["K"] == 4 and rows["HunyuanVideo-I2V"]["proxy"] is True


def test_plan_prints_steps_speedup_and_provenance():
    out = run_cli("plan", "--model", "Wan2.1-T2V-1.3B", "--steps", "50")
    assert out.returncode == 0, out.stderr
    assert "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 30, 35, 39, 42, 44, 46, 48, 49]" in out.stdout
    assert "ideal speedup 2.27x" in out.stdout
    assert "Tele-AI/TeleFuser" in out.stdout
    js = json.loads(run_cli("plan", "--model", "Qwen-Image-Edit-Plus", "--json").stdout)
    assert js["num_inference_steps"] == 40 and js["provenance"]["proxy"] is True
    assert js["block_passes"]["uncached"] == 80


@pytest.mark.parametrize(
    "args,match",
    [(("plan", "--model", "Nope"), "unknown model_type 'Nope'"), (("plan", "--model", "Qwen-Image", "--steps", "0"), "num_inference_steps")],
)
def test_plan_errors_are_one_clear_line(args, match):
    out = run_cli(*args)
    assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr
