"""Pre-flight checks of the files a launch will write, run before any model loads.

A generation or calibration on a large model takes minutes to hours; refusing its output only when
it is done throws that away. So everything about the destination that can be known up front is
checked first: a known suffix, a parent that is (or can become) a directory we may write in, not a
directory itself, not a params file shipped with ditcache, and not an existing file unless the user
said ``--overwrite``. What cannot be known up front (a disk that fills) still fails at write time,
where the writers replace files atomically so a failure never leaves half a file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ditcache.errors import ParamsError
from ditcache.params.userdir import is_shipped_params_path


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the filesystem root at worst)."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def check_writable_dir(folder: Path, what: str) -> Path:
    """``folder`` can hold new files: it is a writable directory, or can be created as one."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        where = "is a file" if existing == folder.absolute() else f"lies under {existing}, which is a file"
        raise ParamsError(f"{what}: {folder} {where}, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ParamsError(f"{what}: cannot write in {existing} (permission denied); choose another path")
    return folder


def check_output_path(
    path: Path, suffixes: Sequence[str], *, overwrite: bool, flag: str = "--output", allow_shipped: bool = False
) -> Path:
    """``path`` is a file this launch may create or, with ``overwrite``, replace; raises ParamsError otherwise.

    ``allow_shipped`` lets a maintainer regenerate a shipped params file (``--overwrite-shipped``).
    """
    if path.suffix.lower() not in suffixes:
        raise ParamsError(f"{flag} {path} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise ParamsError(f"{flag} {path} is a directory; give a file name inside it")
    if is_shipped_params_path(path) and not allow_shipped:
        raise ParamsError(f"{flag} {path} is inside ditcache's shipped params; write to your own params directory")
    check_writable_dir(path.parent, f"{flag} {path}")
    if path.exists() and not overwrite:
        raise ParamsError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another name")
    return path
