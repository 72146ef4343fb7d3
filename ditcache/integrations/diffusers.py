"""ditcache's caches on diffusers' own pipelines, in one call::

    pipe = diffusers.WanPipeline.from_pretrained(...)
    session = enable_cache(pipe, AdaTaylorConfig(model_type="Wan2.1-T2V-1.3B"))
    video = pipe(prompt, ...).frames
    print(cache_stats(pipe))          # expert -> branch -> what the cache did in that request
    disable_cache(pipe)

Supported: pipelines whose ``transformer`` (and Wan2.2 A14B's ``transformer_2``) is a
``WanTransformer3DModel``, ``HunyuanVideoTransformer3DModel`` or ``QwenImageTransformer2DModel``
(WanPipeline, WanImageToVideoPipeline, HunyuanVideoPipeline, QwenImagePipeline, ...). The cache
runs on diffusers' hook mechanism around the transformer's block stack (see
:mod:`ditcache.integrations.hooks`); requests, steps and experts are tracked as
:mod:`ditcache.integrations.session` describes, so back-to-back requests need nothing in between.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.registry import CacheConfig, cache_config
from ditcache.errors import CacheConfigError
from ditcache.integrations.hooks import install, session_of, uninstall
from ditcache.integrations.session import CacheSession
from ditcache.integrations.stacks import layout_of
from ditcache.params import load_params

#: The pipeline attributes that hold the experts, in the order a Wan2.2 request runs them.
EXPERTS = ("transformer", "transformer_2")

CacheSource = Union[str, CacheConfig, BaseFeatureCache]


def enable_cache(pipe: Any, cache: CacheSource, *, model_type: str | None = None) -> CacheSession:
    """Put a ditcache cache on ``pipe``'s transformer(s); returns the session (caches, telemetry).

    ``cache`` is a registered cache's name, a cache config (built anew for every request, one per
    expert, or one shared by all experts when it ``spans_experts``), or a built cache used for every
    request (a Calibrator pooling its statistics; it must span experts when the pipeline has two).
    ``model_type`` names the params of a params-driven config that names none.
    """
    experts = _experts(pipe)
    for name, transformer in experts.items():
        layout_of(transformer, f"pipe.{name}")
        if session_of(transformer) is not None:
            raise CacheConfigError(
                f"ditcache's cache is already enabled on pipe.{name}: call ditcache.disable_cache(pipe) first"
            )
        if getattr(transformer, "is_cache_enabled", False):
            raise CacheConfigError(
                f"a diffusers cache ({type(transformer._cache_config).__name__}) is enabled on pipe.{name}: "
                f"call pipe.{name}.disable_cache() first"
            )
    source = _source(cache, model_type)
    if isinstance(source, BaseFeatureCache) and len(experts) > 1 and not source.spans_experts:
        raise CacheConfigError(
            f"the pipeline runs the experts {list(experts)} and a residual must not cross the switch: pass a cache "
            "config (built once per expert) instead of a built cache"
        )
    session = CacheSession(pipe, source, list(experts))
    for name, transformer in experts.items():
        install(transformer, layout_of(transformer, f"pipe.{name}"), session, name)
    return session


def disable_cache(pipe: Any) -> None:
    """Remove ditcache's hooks from ``pipe`` and drop its caches' state (a no-op when none are on)."""
    for transformer in _experts(pipe).values():
        session = session_of(transformer)
        if session is not None:
            session.close()
            uninstall(transformer)


def cache_stats(pipe: Any) -> dict[str, dict[str, dict]]:
    """expert -> branch -> what the cache did in ``pipe``'s current (or last) request."""
    return cache_session(pipe).stats()


def cache_session(pipe: Any) -> CacheSession:
    """The session :func:`enable_cache` put on ``pipe`` (its caches, block-pass counts)."""
    for transformer in _experts(pipe).values():
        session = session_of(transformer)
        if session is not None:
            return session
    raise CacheConfigError("no ditcache cache is enabled on this pipeline: call ditcache.enable_cache(pipe, ...)")


def _experts(pipe: Any) -> dict[str, torch.nn.Module]:
    experts = {name: getattr(pipe, name) for name in EXPERTS if getattr(pipe, name, None) is not None}
    if not experts:
        raise CacheConfigError(
            f"{type(pipe).__name__} has no transformer: ditcache.enable_cache works on pipelines with a "
            "`transformer` (and Wan2.2's `transformer_2`)"
        )
    if len({id(t) for t in experts.values()}) < len(experts):
        raise CacheConfigError("pipe.transformer and pipe.transformer_2 are the same module; give each expert its own")
    return experts


def _source(cache: CacheSource, model_type: str | None) -> CacheConfig | BaseFeatureCache:
    """The config (model defaults filled in, its params found) or built cache that ``cache`` names."""
    if isinstance(cache, BaseFeatureCache):
        return cache
    if isinstance(cache, str):
        cache = cache_config(cache)
    if not isinstance(cache, CacheConfig):
        raise CacheConfigError(
            f"cache must be a registered cache's name, a cache config or a built cache; got {type(cache).__name__}"
        )
    config = cache.for_model(model_type)
    named = getattr(config, "model_type", None)
    if named is not None:  # fail here, not at the first step of the first request
        load_params(named, getattr(config, "params_dir", None))
    return config
