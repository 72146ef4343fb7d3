"""Where params files live: the folder shipped inside this package and the user's own folder.

Calibration writes to the user folder and the loader searches it, so a new model's params never have to
go into the installed package, where an upgrade or reinstall would drop or overwrite them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ditcache.errors import ParamsError

SHIPPED_PARAMS_DIR = Path(__file__).resolve().parent
PARAMS_DIR_ENV = "DITCACHE_PARAMS_DIR"


def default_user_params_dir() -> Path:
    """The user's params folder (it need not exist yet).

    ``$DITCACHE_PARAMS_DIR`` when set; else ``$XDG_CONFIG_HOME/ditcache/params`` (a relative
    ``XDG_CONFIG_HOME`` is ignored, as the XDG base-directory rules require); else
    ``~/.config/ditcache/params``. Calibration writes here by default and the loader searches it.
    """
    env = os.environ.get(PARAMS_DIR_ENV)
    if env:
        return Path(env)
    config = os.environ.get("XDG_CONFIG_HOME")
    base = Path(config) if config and Path(config).is_absolute() else Path.home() / ".config"
    return base / "ditcache" / "params"


def user_params_dir() -> Path | None:
    """The user folder the loader searches, or None when there is none.

    A folder named by ``$DITCACHE_PARAMS_DIR`` must exist (see ``checked_params_dir``); the XDG default
    is searched only once something created it, since most users never calibrate.
    """
    folder = default_user_params_dir()
    if os.environ.get(PARAMS_DIR_ENV):
        return checked_params_dir(folder, f"${PARAMS_DIR_ENV}")
    mode = _mode(folder)
    return folder if mode is not None and stat.S_ISDIR(mode) else None


def checked_params_dir(path: Path, origin: str) -> Path:
    """``path`` when it is a directory; raises ParamsError when it is missing or not a directory.

    A folder the user configured (``origin`` says how) and that cannot be searched is reported, not
    skipped: skipping it would silently fall back to the shipped params and make the user's look lost.
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise ParamsError(f"params directory {path} (from {origin}) does not exist; create it or point {origin} "
                          "at an existing directory") from None
    except OSError as exc:
        raise ParamsError(f"params directory {path} (from {origin}) cannot be read ({exc.strerror}); fix its "
                          f"permissions or point {origin} elsewhere") from None
    if not stat.S_ISDIR(mode):
        raise ParamsError(f"params directory {path} (from {origin}) is not a directory; point {origin} at the "
                          "directory that holds the *.json params files")
    return path


def is_shipped_params_path(path: str | os.PathLike) -> bool:
    """True for a path inside the installed package's params folder (symlinks and '..' resolved).

    Writers use it to keep out of the package: a file written there is lost on upgrade, and replacing a
    shipped file changes every user's results.
    """
    resolved = Path(path).resolve()
    return resolved == SHIPPED_PARAMS_DIR or SHIPPED_PARAMS_DIR in resolved.parents


def is_regular_file(path: Path) -> bool:
    """True for a regular file (or a link to one); a FIFO, socket or device is never opened as params."""
    mode = _mode(path)
    return mode is not None and stat.S_ISREG(mode)


def _mode(path: Path) -> int | None:
    """``st_mode`` of ``path`` (links followed), or None when it cannot be stat'ed."""
    try:
        return os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return None
