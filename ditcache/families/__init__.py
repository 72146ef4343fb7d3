"""Model families, one folder each, and the registry that finds them.

Each folder (``wan/``, ``hunyuan_video/``, ``qwen_image/``) holds a family's adapter, its Ulysses
attention processors, its pipeline(s) and, in its ``__init__.py``, the :class:`Family` record that
names them. A new family is a new folder: the registry finds it by scanning this package.
``load_pipeline(model_dir)`` detects the family of a directory and loads its pipeline.
"""

from ditcache.families.family import Family
from ditcache.families.registry import (
    adapter_class,
    adapter_for,
    family,
    family_for_dir,
    family_for_transformer,
    known_families,
    load_pipeline,
    register_family,
)

__all__ = [
    "Family",
    "adapter_class",
    "adapter_for",
    "family",
    "family_for_dir",
    "family_for_transformer",
    "known_families",
    "load_pipeline",
    "register_family",
]
