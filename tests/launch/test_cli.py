"""The `ditcache` console script: its subcommands, list and plan through a real subprocess, and the
launchers' cache options (any registered cache, a user's too, with its options)."""

import json
import os
import subprocess
import sys

import pytest
from user_cache_module import SOURCE

from ditcache.launch import generate

STEPS = ["--steps", "6", "--no-progress", "--prompt", "a handwritten 3"]


def run_cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "ditcache.cli", *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


def test_help_lists_every_subcommand_and_ditcache_import_loads_no_launcher():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for command in ("generate", "calibrate", "ray-generate", "list", "plan"):
        assert command in out.stdout
    sub = run_cli("ray-generate", "--help")
    assert sub.returncode == 0 and "--ranks" in sub.stdout and "usage: ditcache ray-generate" in sub.stdout
    probe = "import sys, ditcache, ditcache.cli, ditcache.launch; print(sorted(m for m in ('ray', 'ditcache.launch.generate') if m in sys.modules))"
    imported = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert imported.stdout.strip() == "[]", imported.stderr


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
    [
        (("plan", "--model", "Nope"), "unknown model_type 'Nope'"),
        (("plan", "--model", "Qwen-Image", "--steps", "0"), "num_inference_steps"),
        (("generate", "--cache", "nope", "--prompt", "x"), "unknown --cache 'nope'; known caches: "),
        (("generate", "--cache", "none", "--order", "2", "--prompt", "x"), "for --cache none use --cache-option"),
        (("generate", "--cache-option", "thresh", "--prompt", "x"), "must be KEY=VALUE"),
        (("generate", "--cache-option", "every=2", "--prompt", "x"), "does not take ['every']"),
        (("generate", "--import", "no_such_module_xyz", "--prompt", "x"), "no module named 'no_such_module_xyz'"),
    ],
)
def test_errors_are_one_clear_line(args, match):
    out = run_cli(*args)
    assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_generate_subcommand_takes_any_registered_cache_with_options(tmp_path):
    out = run_cli("generate", *STEPS, "--cache", "ada_taylor", "--order", "2", "--cache-option", "taylor_form=taylor",
                  "--model-type", "Wan2.1-T2V-1.3B", "--output", str(tmp_path / "x.png"))
    assert out.returncode == 0, out.stderr
    assert "cond: 3 computed / 3 skipped" in out.stdout and (tmp_path / "x.png").stat().st_size > 0


def test_a_user_registered_cache_is_usable_by_name(tmp_path, capsys):
    module = tmp_path / "my_caches.py"
    module.write_text(SOURCE)
    common = [*STEPS, "--cache", "every_nth", "--output", str(tmp_path / "a.png"), "--overwrite"]
    # a file path, in this process
    assert generate.main([*common, "--import", str(module), "--cache-option", "every=3"]) == 0
    assert "cond: 2 computed / 4 skipped" in capsys.readouterr().out
    # a module name from PYTHONPATH, through the console script's module; the default option
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    out = run_cli("generate", *common, "--import", "my_caches", env=env)
    assert out.returncode == 0, out.stderr
    assert "cond: 3 computed / 3 skipped" in out.stdout
    # without --import the name is unknown, and the error says how to make it known
    missing = run_cli("generate", *common)
    assert missing.returncode == 2 and "--import the module that registers it" in missing.stderr


def test_bad_user_params_files_are_skipped_by_list(tmp_path):
    (tmp_path / "Broken.json").write_text("{not json")
    out = run_cli("--params-dir", str(tmp_path), "list", "--json")
    assert out.returncode == 0, out.stderr
    assert "Wan2.1-T2V-1.3B" in {r["model_type"] for r in json.loads(out.stdout)}
    assert run_cli("--params-dir", str(tmp_path), "generate", "--help").returncode == 2
