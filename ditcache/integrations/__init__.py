"""ditcache's caches on other libraries' pipelines: diffusers (:mod:`ditcache.integrations.diffusers`)."""

from ditcache.integrations.diffusers import cache_session, cache_stats, disable_cache, enable_cache
from ditcache.integrations.session import CacheSession

__all__ = ["CacheSession", "cache_session", "cache_stats", "disable_cache", "enable_cache"]
