"""Feature caches: the contract, the step context, the registry of cache configs, AdaTaylorCache,
the calibrator, the skip schedule and the seed API's factory."""

from ditcache.cache.ada_taylor import AdaTaylorCache, AdaTaylorConfig
from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.calibrator import CalibrationStats, Calibrator, CalibratorConfig
from ditcache.cache.context import StepContext, branch_name, branch_of
from ditcache.cache.factory import create_feature_cache
from ditcache.cache.first_block import FirstBlockCache, FirstBlockCacheConfig
from ditcache.cache.fixed_interval import FixedIntervalTaylorCache, FixedIntervalTaylorConfig
from ditcache.cache.none import NoCache, NoCacheConfig
from ditcache.cache.registry import CacheConfig, available_caches, cache_config, register_cache
from ditcache.cache.schedule import compute_skip_schedule, resample_nearest
from ditcache.cache.teacache import TeaCacheConfig, TeaCacheRule, fit_teacache_polynomial

__all__ = [
    "AdaTaylorCache",
    "AdaTaylorConfig",
    "BaseFeatureCache",
    "CacheConfig",
    "CalibrationStats",
    "Calibrator",
    "CalibratorConfig",
    "FirstBlockCache",
    "FirstBlockCacheConfig",
    "FixedIntervalTaylorCache",
    "FixedIntervalTaylorConfig",
    "NoCache",
    "NoCacheConfig",
    "StepContext",
    "TeaCacheConfig",
    "TeaCacheRule",
    "available_caches",
    "branch_name",
    "branch_of",
    "cache_config",
    "compute_skip_schedule",
    "create_feature_cache",
    "fit_teacache_polynomial",
    "register_cache",
    "resample_nearest",
]
