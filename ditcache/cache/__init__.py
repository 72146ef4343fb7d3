"""Feature caches: the contract, AdaTaylorCache, the calibrator, the skip schedule and the factory."""

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.base import BaseFeatureCache, NoCache
from ditcache.cache.calibrator import CalibrationStats, Calibrator
from ditcache.cache.factory import create_feature_cache, register_cache
from ditcache.cache.schedule import compute_skip_schedule, resample_nearest

__all__ = [
    "AdaTaylorCache",
    "BaseFeatureCache",
    "CalibrationStats",
    "Calibrator",
    "NoCache",
    "compute_skip_schedule",
    "create_feature_cache",
    "register_cache",
    "resample_nearest",
]
