"""Model-family adapters and the registry that maps transformers to them.

The built-in family modules are imported on first lookup rather than at package import, so that
importing ``ditcache.runtime`` does not import every diffusers transformer class.
"""

from __future__ import annotations

import importlib

import torch

from ditcache.errors import UnknownModelError
from ditcache.runtime.adapters.base import (
    FamilyAdapter,
    StackState,
    register_adapter,
    registered_adapters,
)

__all__ = [
    "FamilyAdapter",
    "StackState",
    "adapter_class",
    "adapter_for",
    "known_families",
    "register_adapter",
]

_BUILTIN_MODULES = ("wan", "hunyuan_video", "qwen_image")


def _load_builtins() -> None:
    for name in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{name}")


def known_families() -> list[str]:
    """Names of every family with a registered adapter."""
    _load_builtins()
    return sorted(registered_adapters())


def adapter_class(family: str) -> type[FamilyAdapter]:
    """The adapter class registered under ``family``."""
    _load_builtins()
    registry = registered_adapters()
    if family not in registry:
        raise UnknownModelError(
            f"unknown model family {family!r}; known families: {', '.join(sorted(registry))}"
        )
    return registry[family]


def adapter_for(transformer: torch.nn.Module) -> FamilyAdapter:
    """Wrap ``transformer`` in the adapter whose ``transformer_class`` it is an instance of."""
    _load_builtins()
    for cls in registered_adapters().values():
        if isinstance(transformer, cls.transformer_class):
            return cls(transformer)
    known = ", ".join(f"{c.transformer_class.__name__} ({f})" for f, c in sorted(registered_adapters().items()))
    raise UnknownModelError(
        f"no adapter for transformer class {type(transformer).__name__}; supported: {known}"
    )
