"""Find, validate and load cache params files (shipped, user directory, or an explicit path).

Search order for a model_type: the ``params_dir`` argument, then the user folder (``$DITCACHE_PARAMS_DIR``,
else the XDG default of ``default_user_params_dir`` when it exists), then the files shipped in this
package. A model_type is looked up as ``sanitize_model_name(model_type) + ".json"`` and the first directory
holding that file wins, so a user directory overrides or extends the shipped set without touching the
installation. Listing reads only regular, non-hidden ``*.json`` files, and a FIFO or other non-regular
file is never opened.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditcache.errors import ParamsError, UnknownModelError
from ditcache.params.userdir import PARAMS_DIR_ENV as PARAMS_DIR_ENV  # re-exported: callers import it from here
from ditcache.params.userdir import (
    SHIPPED_PARAMS_DIR,
    checked_params_dir,
    is_regular_file,
    user_params_dir,
)

REQUIRED_KEYS = ("K", "retention_ratio", "thresh", "cond_mag_ratios", "uncond_mag_ratios")


def sanitize_model_name(name: str) -> str:
    """File stem for a model name: '.' and path separators become '_' (Wan2.1-T2V-1.3B -> Wan2_1-T2V-1_3B)."""
    if not isinstance(name, str) or not name.strip():
        raise ParamsError(f"model name must be a non-empty string, got {name!r}")
    stem = name.strip()
    for ch in "./\\":
        stem = stem.replace(ch, "_")
    return stem


@dataclass(frozen=True)
class CacheParams:
    """A validated params file: skip-schedule settings plus per-branch magnitude-ratio curves."""

    model_type: str
    K: int
    thresh: float
    retention_ratio: float
    cond_mag_ratios: tuple[float, ...]
    uncond_mag_ratios: tuple[float, ...]
    num_inference_steps: int
    sigma_shift: float | None = None
    default_steps: int | None = None
    sigmas: tuple[float, ...] | None = None  # noise level of each calibrated step, when recorded
    # two-expert models (Wan2.2 A14B): the model's switch (timestep >= boundary_ratio * 1000 runs the
    # high-noise expert) and its default sigma shift, so a plan can be made without the model
    boundary_ratio: float | None = None
    default_shift: float | None = None
    # tuned placement of the computed steps for one step count: {"num_inference_steps": N,
    # "cond": [...], "uncond": [...]}; used instead of the threshold rule when a run has N steps
    compute_steps: dict[str, Any] | None = None
    # the forecast a tuned plan was chosen with: {"n_derivatives": n, "taylor_threshold": t}; a cache
    # built on these params uses it unless it is given its own
    forecast: dict[str, int] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def curve(self, is_cond: bool) -> tuple[float, ...]:
        return self.cond_mag_ratios if is_cond else self.uncond_mag_ratios


def search_dirs(params_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for params files, highest priority first.

    Raises ParamsError when ``params_dir`` or ``$DITCACHE_PARAMS_DIR`` names a missing path or a file.
    """
    dirs: list[Path] = []
    if params_dir is not None:
        dirs.append(checked_params_dir(Path(params_dir), "params_dir / --params-dir"))
    user = user_params_dir()
    if user is not None:
        dirs.append(user)
    dirs.append(SHIPPED_PARAMS_DIR)
    return dirs


def _model_files(params_dir: str | os.PathLike | None) -> dict[str, Path]:
    """Listed name -> the file that loading that name reads.

    Files are claimed by stem, highest-priority directory first, as ``resolve_params_path`` does: a bad
    user file still shadows the shipped file of the same name, so its model is left out of the listing
    (with the warning) rather than listed with params that loading it would not return.
    """
    found: dict[str, Path] = {}
    claimed: set[str] = set()
    for directory in search_dirs(params_dir):
        for path in _params_files(directory):
            if path.stem in claimed:
                continue
            claimed.add(path.stem)
            name = _listed_name(path)
            if name is not None:
                found[name] = path
    return found


def _params_files(directory: Path) -> list[Path]:
    """Regular, non-hidden ``*.json`` files in ``directory``; a FIFO or socket named *.json would block a read."""
    return [p for p in sorted(directory.glob("*.json")) if not p.name.startswith(".") and is_regular_file(p)]


def _listed_name(path: Path) -> str | None:
    """The name that finds ``path``, or None when it is bad or no name finds it; each problem warns once.

    The file name wins over a differing ``model_type`` inside the file, since lookups go by file name:
    such a file is listed (and loaded) under its stem, and the params keep the model_type they declare.
    """
    try:
        declared = _read_params(path).model_type
        wanted = sanitize_model_name(declared)
    except ParamsError as exc:
        warnings.warn(f"skipped a bad params file: {exc}; fix or remove it", stacklevel=2)
        return None
    if not _is_lookup_stem(path.stem):
        warnings.warn(
            f"skipped params file {path}: no model name is looked up as {path.name} "
            f"(names map '.', '/' and '\\' to '_'); rename it to {wanted}.json",
            stacklevel=2,
        )
        return None
    if wanted != path.stem:
        warnings.warn(
            f"params file {path} declares model_type {declared!r} (looked up as {wanted}.json) but is named "
            f"{path.name}; it is listed and loaded as {path.stem!r}: rename it to {wanted}.json or set its "
            f"model_type to {path.stem!r}",
            stacklevel=2,
        )
        return path.stem
    return declared


def _is_lookup_stem(stem: str) -> bool:
    """True when some model name is looked up as ``<stem>.json``."""
    try:
        return sanitize_model_name(stem) == stem
    except ParamsError:
        return False


def list_models(params_dir: str | os.PathLike | None = None) -> list[str]:
    """Model types with a params file, shipped or in a user directory; each one loads with ``load_params``.

    A user file that is bad (unreadable, not UTF-8 JSON, invalid params) or that no name looks up is
    skipped with one warning naming it, so it cannot hide the other models.
    """
    return sorted(_model_files(params_dir))


def resolve_params_path(model_type: str, params_dir: str | os.PathLike | None = None) -> Path:
    """Path of the params file for ``model_type``; raises UnknownModelError listing the known ones."""
    stem = sanitize_model_name(model_type)
    dirs = search_dirs(params_dir)
    for directory in dirs:
        candidate = directory / f"{stem}.json"
        if is_regular_file(candidate):
            return candidate
    known = ", ".join(list_models(params_dir)) or "(none)"
    raise UnknownModelError(
        f"unknown model_type {model_type!r}: no {stem}.json in {', '.join(str(d) for d in dirs)}. "
        f"Known model types: {known}. Calibrate one with `python launch/calibrate.py` or pass explicit params."
    )


def load_params(model_type_or_path: str | os.PathLike, params_dir: str | os.PathLike | None = None) -> CacheParams:
    """Load and validate params by model_type (searching the params dirs) or by a JSON file path.

    Every failure to read the file (missing, not a regular file, unreadable, not UTF-8, not JSON,
    invalid params) is a ParamsError that names it.
    """
    as_path = Path(model_type_or_path)
    if str(model_type_or_path).endswith(".json") or is_regular_file(as_path):
        return _read_params(as_path)
    return _read_params(resolve_params_path(str(model_type_or_path), params_dir))


def _read_params(path: Path) -> CacheParams:
    """Validated params of one file; listing and loading share it so they judge a file alike."""
    return params_from_dict(_read_json(path), source=str(path), default_model_type=path.stem)


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; checks it is a regular file first so a FIFO is never opened."""
    if not is_regular_file(path):
        what = "is not a regular file" if os.path.lexists(path) else "does not exist"
        raise ParamsError(f"params file {path} {what}; point at a JSON params file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ParamsError(f"params file {path} cannot be read ({exc.strerror}); fix its permissions") from exc
    except UnicodeDecodeError as exc:
        raise ParamsError(
            f"params file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8 JSON"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ParamsError(f"params file {path} is not valid JSON: {exc}") from exc


def _check_curve(values: Any, key: str, source: str) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise ParamsError(f"{source}: '{key}' must be a non-empty list of positive numbers")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ParamsError(f"{source}: '{key}'[{i}] is {v!r}, not a number")
        if not math.isfinite(v) or v <= 0:
            raise ParamsError(
                f"{source}: '{key}'[{i}] is {v!r}; magnitude ratios must be finite and > 0 "
                "(re-run calibration, or fix the entry)"
            )
        out.append(float(v))
    return tuple(out)


def _check_sigmas(values: Any, n: int, source: str) -> tuple[float, ...]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ParamsError(f"{source}: 'sigmas' must list one noise level per calibrated step ({n} entries)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ParamsError(f"{source}: 'sigmas'[{i}] is {v!r}; noise levels must be finite and >= 0")
        out.append(float(v))
    if any(b >= a for a, b in zip(out, out[1:])):
        raise ParamsError(f"{source}: 'sigmas' must fall strictly from step to step")
    return tuple(out)


def _check_compute_steps(value: Any, source: str) -> dict[str, Any] | None:
    if value is None:
        return None
    n = value.get("num_inference_steps") if isinstance(value, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParamsError(f"{source}: 'compute_steps' needs an integer 'num_inference_steps' >= 1")
    out: dict[str, Any] = {"num_inference_steps": n}
    for branch in ("cond", "uncond"):
        steps = value.get(branch)
        if (
            not isinstance(steps, list)
            or not steps
            or any(isinstance(s, bool) or not isinstance(s, int) for s in steps)
            or steps != sorted(set(steps))
            or steps[0] != 0
            or steps[-1] > n - 1
        ):
            raise ParamsError(
                f"{source}: 'compute_steps'.'{branch}' must be a sorted list of distinct step indices "
                f"from 0 to {n - 1} that starts with 0"
            )
        out[branch] = list(steps)
    return out


def _check_forecast(value: Any, source: str) -> dict[str, int] | None:
    if value is None:
        return None
    least = {"n_derivatives": 0, "taylor_threshold": 1}
    if not isinstance(value, dict) or set(value) != set(least) or any(
        isinstance(value[k], bool) or not isinstance(value[k], int) or value[k] < low for k, low in least.items()
    ):
        raise ParamsError(
            f"{source}: 'forecast' must be {{\"n_derivatives\": integer >= 0, \"taylor_threshold\": integer >= 1}}, "
            f"got {value!r}"
        )
    return {k: int(value[k]) for k in least}


def params_from_dict(data: Any, source: str = "<params>", default_model_type: str = "custom") -> CacheParams:
    """Validate a params mapping; every error names ``source`` and the offending key."""
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: params must be a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ParamsError(f"{source}: missing required key(s) {missing}; a params file needs {list(REQUIRED_KEYS)}")
    K = data["K"]
    if isinstance(K, bool) or not isinstance(K, int) or K < 0:
        raise ParamsError(f"{source}: 'K' must be an integer >= 0, got {K!r}")
    thresh = data["thresh"]
    if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not math.isfinite(thresh) or thresh < 0:
        raise ParamsError(f"{source}: 'thresh' must be a finite number >= 0, got {thresh!r}")
    retention = data["retention_ratio"]
    if isinstance(retention, bool) or not isinstance(retention, (int, float)) or not 0 <= retention < 1:
        raise ParamsError(f"{source}: 'retention_ratio' must be in [0, 1), got {retention!r}")
    cond = _check_curve(data["cond_mag_ratios"], "cond_mag_ratios", source)
    uncond = _check_curve(data["uncond_mag_ratios"], "uncond_mag_ratios", source)
    if len(cond) != len(uncond):
        raise ParamsError(
            f"{source}: 'cond_mag_ratios' has {len(cond)} entries but 'uncond_mag_ratios' has {len(uncond)}; "
            "both curves must cover the same steps"
        )
    steps = data.get("num_inference_steps", len(cond))
    if steps != len(cond):
        raise ParamsError(
            f"{source}: 'num_inference_steps' is {steps!r} but the curves have {len(cond)} entries; "
            "they must match (the curve has one ratio per calibrated step)"
        )
    shift = data.get("sigma_shift")
    if shift is not None and (not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0):
        raise ParamsError(f"{source}: 'sigma_shift' must be a positive number or null, got {shift!r}")
    default_steps = data.get("default_steps")
    if default_steps is not None and (not isinstance(default_steps, int) or default_steps < 1):
        raise ParamsError(f"{source}: 'default_steps' must be an integer >= 1 or null, got {default_steps!r}")
    sigmas = data.get("sigmas")
    if sigmas is not None:
        sigmas = _check_sigmas(sigmas, len(cond), source)
    boundary = data.get("boundary_ratio")
    if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float)) or not 0 < boundary <= 1):
        raise ParamsError(f"{source}: 'boundary_ratio' must be a number in (0, 1] or null, got {boundary!r}")
    default_shift = data.get("default_shift")
    if default_shift is not None and (
        isinstance(default_shift, bool) or not isinstance(default_shift, (int, float)) or not default_shift > 0
    ):
        raise ParamsError(f"{source}: 'default_shift' must be a positive number or null, got {default_shift!r}")
    model_type = data.get("model_type") or data.get("model_name") or default_model_type
    return CacheParams(
        model_type=str(model_type),
        K=int(K),
        thresh=float(thresh),
        retention_ratio=float(retention),
        cond_mag_ratios=cond,
        uncond_mag_ratios=uncond,
        num_inference_steps=len(cond),
        sigma_shift=None if shift is None else float(shift),
        default_steps=default_steps,
        sigmas=sigmas,
        boundary_ratio=None if boundary is None else float(boundary),
        default_shift=None if default_shift is None else float(default_shift),
        compute_steps=_check_compute_steps(data.get("compute_steps"), source),
        forecast=_check_forecast(data.get("forecast"), source),
        provenance=dict(data.get("provenance") or {}),
        path=None if source.startswith("<") else source,
    )
