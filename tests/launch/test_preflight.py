"""Bad outputs and bad inputs are refused before the model loads, with one line naming the fix;
frames are written atomically."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from ditcache.launch import calibrate, generate
from ditcache.params import SHIPPED_PARAMS_DIR
from ditcache.runtime.io import save_frames

STEPS = ["--steps", "4", "--no-progress", "--prompt", "a handwritten 3"]


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a launcher gets as far as loading the model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(generate, "load_pipeline", refuse)
    monkeypatch.setattr(calibrate, "load_pipeline", refuse)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "name, expected",
    [
        ("under_file/x.png", "under_file is a file, not a directory"),
        ("x.gif", "must end in .png or .mp4"),
        ("a_dir.png", "is a directory"),
        ("exists.png", "already exists; pass --overwrite"),
    ],
)
def test_generate_refuses_a_bad_output_before_loading(tmp_path, capsys, no_load, name, expected):
    (tmp_path / "under_file").write_text("a file")
    (tmp_path / "a_dir.png").mkdir()
    (tmp_path / "exists.png").write_bytes(b"keep me")
    assert generate.main([*STEPS, "--output", str(tmp_path / name)]) == 2
    assert expected in error_line(capsys)
    assert (tmp_path / "exists.png").read_bytes() == b"keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_generate_refuses_an_unwritable_directory(tmp_path, capsys, no_load):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert generate.main([*STEPS, "--output", str(locked / "x.png")]) == 2
    assert "permission denied" in error_line(capsys)


def test_overwrite_replaces_an_existing_output(tmp_path, capsys):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")
    assert generate.main([*STEPS, "--cache", "none", "--output", str(target), "--overwrite"]) == 0
    with Image.open(target) as image:
        assert image.size[0] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"], "no temp file is left behind"


@pytest.mark.parametrize("value", ["inf", "nan", "-5", "0.5"])
def test_guidance_must_be_finite_and_at_least_one(capsys, no_load, value):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*STEPS, f"--guidance-scale={value}"])
    assert exit_info.value.code == 2
    assert "--guidance-scale" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5", "inf", "soon"])
def test_timeout_must_be_positive(capsys, no_load, value):
    with pytest.raises(SystemExit) as exit_info:
        generate.main([*STEPS, f"--timeout={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("ditcache generate: error: argument --timeout: ")
    assert "Traceback" not in err


def test_a_prompts_file_of_blank_lines_is_an_error(tmp_path, capsys, no_load):
    blank = tmp_path / "prompts.txt"
    blank.write_text("\n   \n\n")
    assert generate.main(["--steps", "4", "--prompts-file", str(blank)]) == 2
    assert "has no prompts (every line is blank)" in error_line(capsys)


@pytest.mark.parametrize(
    "output, expected",
    [
        ("a_dir.json", "is a directory"),
        ("under_file/x.json", "under_file is a file, not a directory"),
        ("exists.json", "already exists; pass --overwrite"),
        ("x.txt", "must end in .json"),
        (str(SHIPPED_PARAMS_DIR / "Reference-Digits.json"), "shipped params"),
    ],
)
def test_calibrate_refuses_a_bad_output_before_loading(tmp_path, capsys, no_load, output, expected):
    (tmp_path / "a_dir.json").mkdir()
    (tmp_path / "under_file").write_text("a file")
    (tmp_path / "exists.json").write_text("{}")
    assert calibrate.main(["--steps", "4", "--output", str(tmp_path / output)]) == 2
    assert expected in error_line(capsys)


def test_calibrate_refuses_an_existing_user_file_by_model_name_before_loading(tmp_path, capsys, no_load, monkeypatch):
    monkeypatch.setenv("DITCACHE_PARAMS_DIR", str(tmp_path))
    (tmp_path / "My-Ref.json").write_text("{}")
    assert calibrate.main(["--steps", "4", "--model-name", "My-Ref"]) == 2
    assert f"{tmp_path / 'My-Ref.json'} already exists" in error_line(capsys)


def test_calibrate_writes_a_new_model_to_the_user_params_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DITCACHE_PARAMS_DIR", str(tmp_path))
    argv = ["--steps", "4", "--prompt", "a handwritten 3", "--model-name", "My-Ref", "--no-progress"]
    assert calibrate.main(argv) == 0
    assert f"wrote {tmp_path / 'My-Ref.json'}" in capsys.readouterr().out
    assert not (SHIPPED_PARAMS_DIR / "My-Ref.json").exists()


def test_a_failed_frame_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"old")

    def broken_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as handle:
            handle.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_frames(torch.zeros(1, 3, 1, 8, 8), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
