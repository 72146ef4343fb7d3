"""``create_feature_cache``: build a cache by its registered name, in one call.

The seed API's factory: ``create_feature_cache("ada_taylor", model_type=..., num_inference_steps=50)``
builds the cache directly. Pipelines take a config instead (``cache_config``), which is built per
request; both look names up in the same registry, so a cache a user registers works in both.
"""

from __future__ import annotations

import inspect
from typing import Any

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.registry import accepted_arguments, config_class
from ditcache.errors import CacheConfigError


def create_feature_cache(name: str, **kwargs: Any) -> BaseFeatureCache:
    """Build the cache registered as ``name`` ("none", "ada_taylor", "calibrator", ...)."""
    cache_class = config_class(name).cache_class
    accepted = sorted(accepted_arguments(cache_class))
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise CacheConfigError(
            f"feature cache {name!r} does not take {unknown}; it accepts: {', '.join(accepted) or '(no arguments)'}"
        )
    required = [
        p.name
        for p in inspect.signature(cache_class).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs
    ]
    if required:
        raise CacheConfigError(f"feature cache {name!r} needs {', '.join(required)}: pass them as keywords")
    return cache_class(**kwargs)
