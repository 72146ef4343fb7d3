"""The family registry: which families exist, which one a directory or a transformer belongs to.

Built-in families are found by scanning ``ditcache/families/`` for sub-packages and importing each
(its ``__init__.py`` registers its :class:`Family`), so a new family folder needs no edit anywhere
else. A family living outside ditcache registers itself with :func:`register_family`.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ditcache.errors import ParamsError, UnknownModelError
from ditcache.families.family import Family
from ditcache.runtime.loading import read_model_index

if TYPE_CHECKING:
    from ditcache.parallel import ParallelGroups
    from ditcache.runtime.adapter import FamilyAdapter
    from ditcache.runtime.denoise import DenoisingPipeline

_FAMILIES: dict[str, Family] = {}
_scanned = False


def register_family(record: Family) -> Family:
    """Make ``record`` known by its name; registering the same record again is a no-op."""
    known = _FAMILIES.get(record.name)
    if known is not None and known != record:
        raise ParamsError(f"a different family named {record.name!r} is already registered; register it under another name")
    _FAMILIES[record.name] = record
    return record


def _scan_builtins() -> None:
    """Import every sub-package of ``ditcache.families`` once (each registers its family)."""
    global _scanned
    if _scanned:
        return
    import ditcache.families as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.ispkg:
            importlib.import_module(f"{package.__name__}.{info.name}")
    _scanned = True


def known_families() -> list[str]:
    """Names of every registered family."""
    _scan_builtins()
    return sorted(_FAMILIES)


def family(name: str) -> Family:
    """The family registered as ``name``."""
    _scan_builtins()
    record = _FAMILIES.get(name)
    if record is None:
        raise UnknownModelError(f"unknown model family {name!r}; known families: {', '.join(known_families())}")
    return record


def family_for_dir(model_dir: str | Path) -> Family:
    """The family of a diffusers-format directory, from its ``model_index.json``."""
    index = read_model_index(model_dir)
    _scan_builtins()
    matches = [record for record in _FAMILIES.values() if record.detect(index)]
    if len(matches) == 1:
        return matches[0]
    what = f"_class_name {index.get('_class_name')!r}, transformer {index.get('transformer')!r}"
    if not matches:
        raise UnknownModelError(
            f"{model_dir}: no model family recognises {what}; known families: {', '.join(known_families())}"
        )
    raise UnknownModelError(
        f"{model_dir}: {what} matches several families ({', '.join(sorted(m.name for m in matches))}); "
        "give their records distinct pipeline and transformer class names"
    )


def family_for_transformer(transformer: torch.nn.Module) -> Family:
    """The family whose transformer class ``transformer`` is an instance of.

    Families are compared by class name first, so only the matching family's modules are imported.
    """
    _scan_builtins()
    names = {cls.__name__ for cls in type(transformer).__mro__}
    for record in _FAMILIES.values():
        if record.transformer in names and isinstance(transformer, record.transformer_class):
            return record
    known = ", ".join(f"{r.transformer} ({r.name})" for r in sorted(_FAMILIES.values(), key=lambda r: r.name))
    raise UnknownModelError(f"no adapter for transformer class {type(transformer).__name__}; supported: {known}")


def adapter_class(name: str) -> type[FamilyAdapter]:
    """The adapter class of the family registered as ``name``."""
    return family(name).adapter_class


def adapter_for(transformer: torch.nn.Module) -> FamilyAdapter:
    """``transformer`` wrapped in its family's adapter."""
    return family_for_transformer(transformer).adapter_class(transformer)


def load_pipeline(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parallel: ParallelGroups | None = None,
) -> DenoisingPipeline:
    """The pipeline a directory calls for, its family detected from ``model_index.json``."""
    return family_for_dir(model_dir).from_pretrained(model_dir, device=device, dtype=dtype, parallel=parallel)
