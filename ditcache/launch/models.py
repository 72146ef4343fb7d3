"""What ``--model`` / ``--model-dir`` name: a bundled reference model, or a family and its directory.

One place for model lookup, so generate, calibrate and the Ray launcher accept the same names and
fail with the same message before anything is loaded. The families are the registry's
(``ditcache.families``): a new family folder is a new ``--model`` here without an edit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ditcache.errors import ParamsError, UnknownModelError
from ditcache.families import family as family_record
from ditcache.families import known_families
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.parallel import ParallelGroups

BUNDLED_MODELS = {"reference": REFERENCE_DIGITS, "reference-moe": REFERENCE_DIGITS_MOE}
# Models whose samples are single images unless --num-frames says otherwise.
IMAGE_MODELS = (*BUNDLED_MODELS, *(name for name in known_families() if family_record(name).image_model))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_help() -> str:
    families = ", ".join(known_families())
    return f"a bundled model ({', '.join(BUNDLED_MODELS)}) or a family ({families}) with --model-dir"


def resolve_model(model: str, model_dir: Path | None) -> tuple[str, Path]:
    """(family, directory) for ``--model``/``--model-dir``."""
    if model in BUNDLED_MODELS:
        return "wan", model_dir or BUNDLED_MODELS[model]
    if model in known_families():
        if model_dir is None:
            raise ParamsError(f"--model {model} needs --model-dir (a local diffusers-format folder)")
        return model, model_dir
    raise UnknownModelError(f"unknown --model {model!r}; choose {model_help()}")


def load_pipeline(
    family: str,
    model_dir: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    parallel: ParallelGroups | None = None,
) -> Any:
    """The family's pipeline for ``model_dir``, laid out over ``parallel`` (None: one process)."""
    return family_record(family).from_pretrained(model_dir, device=device, dtype=dtype, parallel=parallel)


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """``--dtype``, else bfloat16 on GPU and float32 on CPU."""
    if name:
        return DTYPES[name]
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
