"""``create_feature_cache``: build a cache by name, with errors that list what is accepted."""

from __future__ import annotations

import inspect
from typing import Callable

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.base import BaseFeatureCache, NoCache
from ditcache.cache.calibrator import Calibrator
from ditcache.errors import CacheConfigError

CACHE_REGISTRY: dict[str, Callable[..., BaseFeatureCache]] = {
    "none": NoCache,
    "ada_taylor": AdaTaylorCache,
    "calibrator": Calibrator,
}


def register_cache(name: str, builder: Callable[..., BaseFeatureCache]) -> None:
    """Make a cache class available to ``create_feature_cache`` (and the CLIs) under ``name``."""
    if name in CACHE_REGISTRY:
        raise CacheConfigError(f"a cache named {name!r} is already registered")
    CACHE_REGISTRY[name] = builder


def create_feature_cache(name: str, **kwargs) -> BaseFeatureCache:
    """Build the cache registered as ``name`` ("none", "ada_taylor", "calibrator", ...)."""
    builder = CACHE_REGISTRY.get(name)
    if builder is None:
        raise CacheConfigError(f"unknown feature cache {name!r}; known caches: {', '.join(sorted(CACHE_REGISTRY))}")
    accepted = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise CacheConfigError(
            f"feature cache {name!r} does not take {unknown}; it accepts: {', '.join(accepted) or '(no arguments)'}"
        )
    return builder(**kwargs)
