"""Write params files atomically, never over a shipped file by accident."""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from ditcache.errors import ParamsError
from ditcache.params.loader import params_from_dict
from ditcache.params.userdir import is_shipped_params_path

# ".<name>.json.<8 chars>.tmp": the temp files of this writer and of its mkstemp-based predecessor
TEMP_NAME = re.compile(r"^\..+\.json\.[a-z0-9_]{8}\.tmp$")
STALE_TEMP_AGE_S = 600.0


def write_params(data: dict[str, Any], path: str | os.PathLike, *, overwrite_shipped: bool = False) -> Path:
    """Validate ``data`` and write it to ``path`` through a temp file in the same directory and a rename.

    A reader (another rank, a later run) sees the old file or the new one, never half of one. The new
    file keeps the mode of the file it replaces (a shared 0644 file stays readable by the others), and a
    new file gets 0666 masked by the umask, like any file the user creates. Stale temp files that killed
    writers left in the directory are removed first (see ``remove_stale_temp_files``).
    Refuses to replace a file shipped with ditcache unless ``overwrite_shipped`` is set.
    """
    target = Path(path)
    params_from_dict(data, source=str(target))
    if is_shipped_params_path(target) and target.exists() and not overwrite_shipped:
        raise ParamsError(
            f"{target} is a shipped params file; write elsewhere (output_path / --output / a params dir), "
            "or pass overwrite_shipped=True (--overwrite-shipped) to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(target.parent)
    _replace_atomically(target, data)
    return target


def remove_stale_temp_files(directory: Path, max_age_s: float = STALE_TEMP_AGE_S) -> None:
    """Delete this writer's temp files in ``directory`` last modified more than ``max_age_s`` ago.

    Only regular files named like ours (``TEMP_NAME``, so temp files of ``*.json`` targets) are touched. Age is the rule rather than a dead
    writer pid because a params directory may be shared by several hosts, where a pid says nothing; a
    write of a few kilobytes takes far less than ten minutes, so an older temp file has no live writer.
    Cleanup is best effort: a file another writer already removed, or one we may not delete, is skipped.
    """
    cutoff = time.time() - max_age_s
    try:
        entries = [e for e in os.scandir(directory) if TEMP_NAME.match(e.name)]
    except OSError:
        return
    for entry in entries:
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            continue


def _replace_atomically(target: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON to a fresh temp file beside ``target``, fsync it, then rename it over ``target``."""
    mode = _mode_to_keep(target)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            json.dump(data, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_to_keep(target: Path) -> int | None:
    """Permission bits of the regular file being replaced, or None for a new file."""
    try:
        info = os.stat(target)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(info.st_mode) if stat.S_ISREG(info.st_mode) else None


def _create_temp(target: Path) -> tuple[int, Path]:
    """Create a new temp file beside ``target`` with mode 0666, which the kernel masks by the umask.

    mkstemp would force 0600; O_EXCL keeps its guarantee that no other writer holds the name.
    """
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
