"""Find, validate and load cache params files (shipped, user directory, or an explicit path).

Search order for a model_type: the ``params_dir`` argument, then ``$DITCACHE_PARAMS_DIR``, then the
files shipped in this package; the first directory holding the file wins, so a user directory
overrides or extends the shipped set without touching the installation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ditcache.errors import ParamsError, UnknownModelError

SHIPPED_PARAMS_DIR = Path(__file__).resolve().parent
PARAMS_DIR_ENV = "DITCACHE_PARAMS_DIR"
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
    # tuned placement of the computed steps for one step count: {"num_inference_steps": N,
    # "cond": [...], "uncond": [...]}; used instead of the threshold rule when a run has N steps
    compute_steps: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def curve(self, is_cond: bool) -> tuple[float, ...]:
        return self.cond_mag_ratios if is_cond else self.uncond_mag_ratios


def search_dirs(params_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for params files, highest priority first."""
    dirs: list[Path] = []
    if params_dir is not None:
        dirs.append(Path(params_dir))
    env = os.environ.get(PARAMS_DIR_ENV)
    if env:
        dirs.append(Path(env))
    dirs.append(SHIPPED_PARAMS_DIR)
    return dirs


def _model_files(params_dir: str | os.PathLike | None) -> dict[str, Path]:
    """model_type -> file, lower-priority directories first so higher ones overwrite."""
    found: dict[str, Path] = {}
    for directory in reversed(search_dirs(params_dir)):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.json")):
            found[_model_type_of(path)] = path
    return found


def _model_type_of(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return path.stem
    name = data.get("model_type") or data.get("model_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) and name else path.stem


def list_models(params_dir: str | os.PathLike | None = None) -> list[str]:
    """Model types with a params file, shipped or in a user directory."""
    return sorted(_model_files(params_dir))


def resolve_params_path(model_type: str, params_dir: str | os.PathLike | None = None) -> Path:
    """Path of the params file for ``model_type``; raises UnknownModelError listing the known ones."""
    stem = sanitize_model_name(model_type)
    for directory in search_dirs(params_dir):
        candidate = directory / f"{stem}.json"
        if candidate.is_file():
            return candidate
    known = ", ".join(list_models(params_dir)) or "(none)"
    dirs = ", ".join(str(d) for d in search_dirs(params_dir))
    raise UnknownModelError(
        f"unknown model_type {model_type!r}: no {stem}.json in {dirs}. Known model types: {known}. "
        "Calibrate one with `python launch/calibrate.py` or pass explicit params."
    )


def load_params(model_type_or_path: str | os.PathLike, params_dir: str | os.PathLike | None = None) -> CacheParams:
    """Load and validate params by model_type (searching the params dirs) or by a JSON file path."""
    as_path = Path(model_type_or_path)
    if str(model_type_or_path).endswith(".json") or as_path.is_file():
        if not as_path.is_file():
            raise ParamsError(f"params file {as_path} does not exist")
        path = as_path
    else:
        path = resolve_params_path(str(model_type_or_path), params_dir)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ParamsError(f"params file {path} is not valid JSON: {exc}") from exc
    return params_from_dict(data, source=str(path), default_model_type=path.stem)


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
            or steps[-1] != n - 1
        ):
            raise ParamsError(
                f"{source}: 'compute_steps'.'{branch}' must be a sorted list of distinct step indices "
                f"from 0 to {n - 1} that includes both ends"
            )
        out[branch] = list(steps)
    return out


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
        compute_steps=_check_compute_steps(data.get("compute_steps"), source),
        provenance=dict(data.get("provenance") or {}),
        path=None if source.startswith("<") else source,
    )
