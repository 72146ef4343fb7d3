"""ditcache: feature-cached, distributed inference for diffusion transformers.

    import ditcache

    pipe = ditcache.load_pipeline("path/to/Wan2.1-T2V-1.3B-Diffusers")        # family detected
    out = pipe("a cat surfing", cache=ditcache.AdaTaylorConfig(n_derivatives=1))
    out = pipe("a cat surfing", cache="ada_taylor")                           # or by registered name

    ditcache.enable_cache(diffusers_pipe, ditcache.AdaTaylorConfig())         # diffusers' own pipeline
    diffusers_pipe("a cat surfing")
    ditcache.disable_cache(diffusers_pipe)

Names resolve on first use, so ``import ditcache`` loads no diffusers model class and no torch
model code until one is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # caches
    "AdaTaylorCache": "ditcache.cache",
    "AdaTaylorConfig": "ditcache.cache",
    "BaseFeatureCache": "ditcache.cache",
    "CacheConfig": "ditcache.cache",
    "Calibrator": "ditcache.cache",
    "CalibratorConfig": "ditcache.cache",
    "FirstBlockCacheConfig": "ditcache.cache",
    "FixedIntervalTaylorConfig": "ditcache.cache",
    "NoCacheConfig": "ditcache.cache",
    "StepContext": "ditcache.cache",
    "TeaCacheConfig": "ditcache.cache",
    "available_caches": "ditcache.cache",
    "cache_config": "ditcache.cache",
    "create_feature_cache": "ditcache.cache",
    "register_cache": "ditcache.cache",
    # pipelines
    "GenerationOutput": "ditcache.runtime.denoise",
    "HunyuanVideoPipeline": "ditcache.families.hunyuan_video.pipeline",
    "QwenImagePipeline": "ditcache.families.qwen_image.pipeline",
    "Wan22Pipeline": "ditcache.families.wan.pipeline",
    "WanPipeline": "ditcache.families.wan.pipeline",
    "load_pipeline": "ditcache.families",
    "compile_pipeline": "ditcache.runtime.compile",
    # diffusers integration
    "cache_stats": "ditcache.integrations",
    "disable_cache": "ditcache.integrations",
    "enable_cache": "ditcache.integrations",
    # parallel
    "ParallelConfig": "ditcache.parallel",
    "destroy_parallel": "ditcache.parallel",
    "init_parallel": "ditcache.parallel",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ditcache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:
    from ditcache.cache import (
        AdaTaylorCache,
        AdaTaylorConfig,
        BaseFeatureCache,
        CacheConfig,
        Calibrator,
        CalibratorConfig,
        FirstBlockCacheConfig,
        FixedIntervalTaylorConfig,
        NoCacheConfig,
        StepContext,
        TeaCacheConfig,
        available_caches,
        cache_config,
        create_feature_cache,
        register_cache,
    )
    from ditcache.integrations import cache_stats, disable_cache, enable_cache
    from ditcache.parallel import ParallelConfig, destroy_parallel, init_parallel
    from ditcache.families import load_pipeline
    from ditcache.families.hunyuan_video.pipeline import HunyuanVideoPipeline
    from ditcache.families.qwen_image.pipeline import QwenImagePipeline
    from ditcache.families.wan.pipeline import Wan22Pipeline, WanPipeline
    from ditcache.runtime.compile import compile_pipeline
    from ditcache.runtime.denoise import GenerationOutput
