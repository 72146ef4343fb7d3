"""Cache configs and the registry that names them.

A cache travels through the stack as a *config*: a small frozen dataclass holding the user's
choices (order, params, thresholds) but no per-request state. ``config.build(num_inference_steps,
sigmas, init_step)`` makes the per-request cache, so one config serves every request, every rank
and every expert of a pipeline (Wan2.2 builds one cache per expert, each counting from its first
step). Configs are registered by name, which is how pipelines, launchers and the CLI find a cache a
user wrote::

    @register_cache
    @dataclass(frozen=True)
    class MyConfig(CacheConfig):
        name: ClassVar[str] = "mine"
        cache_class: ClassVar[type[BaseFeatureCache]] = MyCache
        thresh: float = 0.1

    pipe(prompt, cache=cache_config("mine", thresh=0.2))
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ditcache.cache.base import BaseFeatureCache
from ditcache.errors import CacheConfigError

#: Arguments ``build`` fills in from the request; a config never stores them.
RUN_ARGUMENTS = ("num_inference_steps", "sigmas", "init_step")


@dataclass(frozen=True)
class CacheConfig:
    """A cache's settings, independent of any request. Subclasses set ``name`` and ``cache_class``.

    The default :meth:`build` passes the config's fields plus whichever of ``num_inference_steps``,
    ``sigmas`` and ``init_step`` the cache class accepts; override it when the mapping is not 1:1.
    """

    name: ClassVar[str]
    cache_class: ClassVar[type[BaseFeatureCache]]

    def build(
        self, num_inference_steps: int, sigmas: Sequence[float] | None = None, init_step: int = 0
    ) -> BaseFeatureCache:
        """The cache for one request (or one expert of it, counting from ``init_step``)."""
        accepted = accepted_arguments(self.cache_class)
        run = {"num_inference_steps": num_inference_steps, "sigmas": sigmas, "init_step": init_step}
        return self.cache_class(**self.options(), **{k: v for k, v in run.items() if k in accepted})

    def for_model(self, model_type: str | None) -> CacheConfig:
        """This config with the pipeline's model defaults filled in (params-driven caches use it)."""
        return self

    def options(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def spans_experts(self) -> bool:
        """Whether one cache serves every expert of a request (see ``BaseFeatureCache``)."""
        return self.cache_class.spans_experts

    def describe(self) -> str:
        """A stable one-line description (ranks compare it; the summary prints it)."""
        return f"{self.name}({json.dumps(self.options(), sort_keys=True, default=str)})"


_CONFIGS: dict[str, type[CacheConfig]] = {}


def register_cache(config_class: type[CacheConfig]) -> type[CacheConfig]:
    """Class decorator: make ``config_class`` usable by its ``name`` from pipelines and the CLI."""
    name = getattr(config_class, "name", None)
    if not isinstance(name, str) or not name:
        raise CacheConfigError(f"{config_class.__name__} must set a non-empty class attribute 'name'")
    if not (isinstance(getattr(config_class, "cache_class", None), type) and dataclasses.is_dataclass(config_class)):
        raise CacheConfigError(f"{config_class.__name__} must be a dataclass with a 'cache_class' attribute")
    if name in _CONFIGS and _CONFIGS[name] is not config_class:
        raise CacheConfigError(f"a cache named {name!r} is already registered ({_CONFIGS[name].__name__})")
    _CONFIGS[name] = config_class
    return config_class


def available_caches() -> list[str]:
    """Names of every registered cache."""
    return sorted(_CONFIGS)


def config_class(name: str) -> type[CacheConfig]:
    """The config class registered as ``name``, with an error that lists the known names."""
    cls = _CONFIGS.get(name)
    if cls is None:
        raise CacheConfigError(f"unknown cache {name!r}; known caches: {', '.join(available_caches())}")
    return cls


def cache_config(name: str, **options: Any) -> CacheConfig:
    """The config of the cache registered as ``name``, with ``options`` checked against its fields."""
    cls = config_class(name)
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise CacheConfigError(
            f"cache {name!r} does not take {unknown}; it accepts: {', '.join(fields) or '(no options)'}"
        )
    return cls(**options)


def accepted_arguments(cls: type) -> set[str]:
    return {
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
