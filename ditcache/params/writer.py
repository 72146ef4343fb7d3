"""Write params files atomically, never over a shipped file by accident."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ditcache.errors import ParamsError
from ditcache.params.loader import SHIPPED_PARAMS_DIR, params_from_dict


def write_params(data: dict[str, Any], path: str | os.PathLike, *, overwrite_shipped: bool = False) -> Path:
    """Validate ``data`` and write it to ``path`` through a temp file and a rename.

    A reader (another rank, a later run) sees the old file or the new one, never half of one.
    Refuses to replace a file shipped with ditcache unless ``overwrite_shipped`` is set.
    """
    target = Path(path)
    params_from_dict(data, source=str(target))
    if target.resolve().parent == SHIPPED_PARAMS_DIR and target.exists() and not overwrite_shipped:
        raise ParamsError(
            f"{target} is a shipped params file; write elsewhere (output_path / --output / a params dir), "
            "or pass overwrite_shipped=True (--overwrite-shipped) to replace it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
