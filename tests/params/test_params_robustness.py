"""Params directories as users leave them: shared file modes, killed writers, bad or odd files, wrong paths."""

import json
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from ditcache.errors import ParamsError, UnknownModelError
from ditcache.params import PARAMS_DIR_ENV, SHIPPED_PARAMS_DIR, list_models, load_params
from ditcache.params.writer import write_params

GOOD = {
    "K": 2,
    "retention_ratio": 0.2,
    "thresh": 0.1,
    "cond_mag_ratios": [1.0, 0.99, 0.98, 0.9],
    "uncond_mag_ratios": [1.0, 0.99, 0.98, 0.9],
}
# one bad file per way a file can be bad: not JSON, not UTF-8, not valid params
BAD = {
    "Broken": b"{not json",
    "Latin": json.dumps({**GOOD, "model_type": "Caf\xe9"}, ensure_ascii=False).encode("latin-1"),
    "Keyless": json.dumps({"K": 2}).encode(),
}


@pytest.fixture(autouse=True)
def no_user_dir(tmp_path, monkeypatch):
    """Keep the caller's own user params folder out of every test."""
    monkeypatch.delenv(PARAMS_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def make_params_dir(tmp_path, **files):
    """A params dir holding ``<name>.json`` for each entry: a dict is written as JSON, bytes as they are."""
    directory = tmp_path / "params"
    directory.mkdir(exist_ok=True)
    for name, content in files.items():
        raw = content if isinstance(content, bytes) else json.dumps(content).encode()
        (directory / f"{name}.json").write_bytes(raw)
    return directory


def run_cli(*args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "ditcache.cli", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def listed(out):
    assert out.returncode == 0, out.stderr
    return {row["model_type"]: row for row in json.loads(out.stdout)}


def mode_of(path):
    return stat.S_IMODE(path.stat().st_mode)


# -- the writer ---------------------------------------------------------------------------------------------


def test_replacing_a_shared_file_keeps_its_mode(tmp_path):
    target = tmp_path / "Shared.json"
    target.write_text(json.dumps(GOOD))
    for mode in (0o644, 0o664):
        target.chmod(mode)
        write_params({**GOOD, "K": mode & 7}, target)
        assert mode_of(target) == mode
        assert load_params(target).K == mode & 7
    assert [p.name for p in tmp_path.iterdir()] == ["Shared.json"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_a_new_file_gets_0666_masked_by_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_params(GOOD, tmp_path / "New.json")
    finally:
        os.umask(old)
    assert mode_of(path) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["New.json"]


def test_a_write_removes_stale_temp_files_of_killed_writers_only(tmp_path):
    stale = [tmp_path / ".Model.json.0badc0de.tmp", tmp_path / ".Other.json.k2_x9qzz.tmp"]
    fresh = tmp_path / ".Model.json.feedbeef.tmp"  # a writer that may still be running
    not_ours = [tmp_path / ".notes.0badc0de.tmp", tmp_path / "Model.json.0badc0de.tmp", tmp_path / ".Model.json.bak"]
    hour_ago = time.time() - 3600
    for path in [*stale, *not_ours, fresh]:
        path.write_text("{")
    for path in [*stale, *not_ours]:
        os.utime(path, (hour_ago, hour_ago))
    write_params(GOOD, tmp_path / "Model.json")
    assert not any(p.exists() for p in stale)
    assert fresh.exists() and all(p.exists() for p in not_ours)
    assert load_params(tmp_path / "Model.json").K == GOOD["K"]


# -- bad files in a user params dir -------------------------------------------------------------------------


def test_listing_skips_each_bad_user_file_with_one_warning(tmp_path):
    directory = make_params_dir(tmp_path, MyModel=GOOD, **BAD)
    with pytest.warns(UserWarning) as record:
        models = list_models(directory)
    assert {"MyModel", "Wan2.1-T2V-1.3B", "Qwen-Image"} <= set(models)
    assert not set(BAD) & set(models)
    messages = [str(w.message) for w in record]
    assert len(messages) == len(BAD)
    for name in BAD:
        assert sum(f"{name}.json" in m for m in messages) == 1
        with pytest.raises(ParamsError, match=re.escape(f"{name}.json")):
            load_params(name, directory)


def test_cli_list_and_plan_survive_bad_user_files(tmp_path):
    directory = make_params_dir(tmp_path, MyModel=GOOD, **BAD)
    out = run_cli("--params-dir", directory, "list", "--json")
    rows = listed(out)
    assert rows["MyModel"]["K"] == 2 and rows["Wan2.1-T2V-1.3B"]["K"] == 4
    assert not set(BAD) & set(rows)
    assert "Traceback" not in out.stderr
    for name in BAD:
        assert out.stderr.count(f"{name}.json") == 1
    assert len(out.stderr.strip().splitlines()) == len(BAD)  # one line per bad file
    assert all(line.startswith("warning: skipped a bad params file") for line in out.stderr.splitlines())
    assert run_cli("--params-dir", directory, "plan", "--model", "Qwen-Image", "--json").returncode == 0
    unknown = run_cli("--params-dir", directory, "plan", "--model", "Nope")
    assert unknown.returncode == 2 and "unknown model_type 'Nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    broken = run_cli("--params-dir", directory, "plan", "--model", "Broken")
    assert broken.returncode == 2 and "Broken.json is not valid JSON" in broken.stderr
    assert len(broken.stderr.strip().splitlines()) == 1


def test_a_bad_user_override_hides_its_model_instead_of_listing_the_shipped_one(tmp_path):
    directory = make_params_dir(tmp_path, **{"Wan2_1-T2V-1_3B": b"{not json"})
    with pytest.warns(UserWarning, match=r"Wan2_1-T2V-1_3B\.json is not valid JSON"):
        models = list_models(directory)
    assert "Wan2.1-T2V-1.3B" not in models and "Qwen-Image" in models
    with pytest.raises(ParamsError, match=re.escape(str(directory / "Wan2_1-T2V-1_3B.json"))):
        load_params("Wan2.1-T2V-1.3B", directory)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_an_unreadable_user_file_is_skipped_and_loading_it_names_it(tmp_path):
    directory = make_params_dir(tmp_path, MyModel=GOOD, Locked=GOOD)
    (directory / "Locked.json").chmod(0)
    with pytest.warns(UserWarning, match=r"Locked\.json cannot be read"):
        assert "Locked" not in list_models(directory)
    with pytest.raises(ParamsError, match=r"Locked\.json cannot be read"):
        load_params("Locked", directory)


def test_a_non_utf8_file_is_a_params_error_naming_it(tmp_path):
    directory = make_params_dir(tmp_path, Latin=BAD["Latin"])
    with pytest.raises(ParamsError, match=r"Latin\.json is not UTF-8"):
        load_params(directory / "Latin.json")
    with pytest.raises(ParamsError, match=r"Latin\.json is not UTF-8"):
        load_params("Latin", directory)


def test_a_fifo_or_folder_named_json_is_never_opened(tmp_path):
    directory = make_params_dir(tmp_path, MyModel=GOOD)
    os.mkfifo(directory / "Pipe.json")
    (directory / "Folder.json").mkdir()
    rows = listed(run_cli("--params-dir", directory, "list", "--json", timeout=30))
    assert "MyModel" in rows and not {"Pipe", "Folder"} & set(rows)
    with pytest.raises(ParamsError, match=r"Pipe\.json is not a regular file"):
        load_params(directory / "Pipe.json")
    with pytest.raises(UnknownModelError, match="'Pipe'"):
        load_params("Pipe", directory)


# -- names and paths ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,match", [("missing", "does not exist"), ("file", "is not a directory")])
def test_a_params_dir_that_is_missing_or_a_file_is_an_error(tmp_path, monkeypatch, kind, match):
    path = tmp_path / "nowhere"
    if kind == "file":
        path.write_text(json.dumps(GOOD))
    with pytest.raises(ParamsError, match=match) as info:
        load_params("Qwen-Image", params_dir=path)
    assert str(path) in str(info.value) and "--params-dir" in str(info.value)
    out = run_cli("--params-dir", path, "list")
    assert out.returncode == 2 and str(path) in out.stderr and match in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    monkeypatch.setenv(PARAMS_DIR_ENV, str(path))
    with pytest.raises(ParamsError, match=match) as info:
        list_models()
    assert str(path) in str(info.value) and PARAMS_DIR_ENV in str(info.value)


def test_a_file_named_apart_from_its_model_type_warns_and_the_file_name_wins(tmp_path):
    directory = make_params_dir(tmp_path, **{"my-wan": {**GOOD, "K": 7, "model_type": "Wan2.1-T2V-1.3B"}})
    with pytest.warns(UserWarning) as record:
        models = list_models(directory)
    assert len(record) == 1
    message = str(record[0].message)
    assert "my-wan.json" in message and "'Wan2.1-T2V-1.3B'" in message and "Wan2_1-T2V-1_3B.json" in message
    assert "my-wan" in models
    assert load_params("my-wan", directory).K == 7
    assert load_params("Wan2.1-T2V-1.3B", directory).K == 4  # the shipped file: lookups go by file name


def test_a_file_no_model_name_looks_up_is_skipped_with_the_name_to_use(tmp_path):
    directory = make_params_dir(tmp_path, **{"Foo.1": {**GOOD, "model_type": "Foo.1"}})
    with pytest.warns(UserWarning, match=r"Foo\.1\.json.*rename it to Foo_1\.json"):
        models = list_models(directory)
    assert "Foo.1" not in models and "Foo_1" not in models


def test_default_user_params_dir_follows_env_then_xdg_then_home(tmp_path, monkeypatch):
    from ditcache.params import default_user_params_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_user_params_dir() == tmp_path / "home" / ".config" / "ditcache" / "params"
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/config")  # relative: invalid, so ignored
    assert default_user_params_dir() == tmp_path / "home" / ".config" / "ditcache" / "params"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_user_params_dir() == tmp_path / "xdg" / "ditcache" / "params"
    monkeypatch.setenv(PARAMS_DIR_ENV, str(tmp_path / "mine"))
    assert default_user_params_dir() == tmp_path / "mine"


def test_the_default_user_dir_is_searched_once_it_exists(tmp_path):
    from ditcache.params import default_user_params_dir

    assert "MyModel" not in list_models()  # a missing default folder is no error
    path = write_params(GOOD, default_user_params_dir() / "MyModel.json")
    assert "MyModel" in list_models()
    assert load_params("MyModel").path == str(path)


def test_is_shipped_params_path(tmp_path):
    from ditcache.params import is_shipped_params_path

    assert is_shipped_params_path(SHIPPED_PARAMS_DIR / "Qwen-Image.json")
    assert is_shipped_params_path(SHIPPED_PARAMS_DIR / "New-Model.json")
    assert is_shipped_params_path(SHIPPED_PARAMS_DIR.parent / "cache" / ".." / "params" / "x.json")
    link = tmp_path / "link"
    link.symlink_to(SHIPPED_PARAMS_DIR)
    assert is_shipped_params_path(link / "Qwen-Image.json")
    assert not is_shipped_params_path(tmp_path / "Qwen-Image.json")
    assert not is_shipped_params_path(SHIPPED_PARAMS_DIR.parent / "params-old" / "x.json")
