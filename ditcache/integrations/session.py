"""The per-pipeline state behind the hooks: requests, the caches of each, the call in flight.

A diffusers pipeline tells its transformer nothing about requests: it calls it once per step and
CFG branch, inside ``cache_context("cond")`` / ``("uncond")``. The session derives the rest:

- **Steps.** Every step calls the conditional branch once (and the unconditional one under CFG),
  whichever expert runs it, so a per-branch call count is the pipeline's global step index.
- **Requests.** A request ends when the pipeline resets its stateful hooks, which every diffusers
  pipeline does at the end of ``__call__`` (``maybe_free_model_hooks``). A call also starts a new
  request when the previous one ended some other way (an exception, a pipeline that does not reset):
  when its branch has already run every step of the request, or when the call's timestep is not
  below the branch's previous one (timesteps fall through a request, so a repeat or a rise means
  the sampler started over). Telemetry of a finished request stays readable until the next starts.
- **Caches.** At the first call of a request the schedule is read from the pipeline's scheduler
  (``timesteps``, already set by then; ``sigmas``). Each expert's cache is built at the expert's
  first call, counting from that step (``init_step``), so Wan2.2's low-noise expert starts with a
  computed step and no residual crosses the switch. A config whose cache ``spans_experts`` (the
  calibrator) gets one cache per request shared by every expert, and a built cache is that one
  object for every request, reset at each (a Calibrator keeps pooling its statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.calibrator import Calibrator
from ditcache.cache.context import branch_name
from ditcache.cache.registry import CacheConfig
from ditcache.errors import CacheConfigError


@dataclass
class Call:
    """One transformer call in flight: whom it serves and the cache that decides it."""

    expert: str
    is_cond: bool
    step: int
    sigma: float | None
    timestep: float
    cache: BaseFeatureCache
    compute: bool = True
    arg: Any = None  # what the cache was asked with (a StepContext, or the bare branch flag)
    stack_input: torch.Tensor | None = None


@dataclass
class _Request:
    """The schedule of the running request and how far each branch got."""

    num_steps: int
    sigmas: list[float] | None
    timesteps: list[float]
    shared: BaseFeatureCache | None
    steps: dict[bool, int] = field(default_factory=dict)
    last_timestep: dict[bool, float] = field(default_factory=dict)


class CacheSession:
    """ditcache's cache on one diffusers pipeline (what :func:`enable_cache` returns).

    Attributes:
        caches: expert name -> the cache serving it in the current (or last) request; an expert
            that has not run yet has none. A shared cache appears under every expert it served.
        stack_passes: expert -> branch -> real block-stack runs in the current (or last) request,
            counted by the hooks, independently of what the cache reports.
    """

    def __init__(self, pipe: Any, source: CacheConfig | BaseFeatureCache, experts: Sequence[str]) -> None:
        self.pipe = pipe
        self.source = source
        self.experts = tuple(experts)
        self.caches: dict[str, BaseFeatureCache] = {}
        self.stack_passes: dict[str, dict[str, int]] = {}
        self.call: Call | None = None
        self._request: _Request | None = None

    # -- telemetry --------------------------------------------------------------------------------

    def stats(self) -> dict[str, dict[str, dict]]:
        """expert -> branch -> what its cache did in the current (or last) request."""
        return {name: cache.stats() for name, cache in self.caches.items()}

    # -- calls ------------------------------------------------------------------------------------

    def begin_call(self, expert: str, is_cond: bool, timestep: float) -> Call:
        """Account for one transformer call: its request, its step, the cache deciding it."""
        request = self._request
        if request is None or self._starts_request(request, is_cond, timestep):
            request = self._start_request()
        step = request.steps.get(is_cond, 0)
        request.steps[is_cond] = step + 1
        request.last_timestep[is_cond] = timestep
        cache = self.caches.get(expert)
        if cache is None:
            shared = request.shared
            cache = shared if shared is not None else self._config().build(request.num_steps, request.sigmas, step)
            if shared is None:  # a new expert takes over: the ones before it have run their last step
                for previous in self.caches.values():
                    previous.release()
            self.caches[expert] = cache
        sigma = None if request.sigmas is None else request.sigmas[step]
        self.call = Call(expert, is_cond, step, sigma, request.timesteps[step], cache)
        return self.call

    def end_call(self) -> None:
        self.call = None

    def count_pass(self, call: Call) -> None:
        per_branch = self.stack_passes.setdefault(call.expert, {})
        name = branch_name(call.is_cond)
        per_branch[name] = per_branch.get(name, 0) + 1

    # -- requests ---------------------------------------------------------------------------------

    def end_request(self) -> None:
        """The pipeline finished a request: the next call starts a new one (telemetry stays)."""
        self._request = None

    def close(self) -> None:
        """Drop every cache's state (``disable_cache``)."""
        for cache in {id(c): c for c in self.caches.values()}.values():
            cache.reset()
        self.caches = {}
        self.stack_passes = {}
        self.call = None
        self._request = None

    @staticmethod
    def _starts_request(request: _Request, is_cond: bool, timestep: float) -> bool:
        done = request.steps.get(is_cond, 0) >= request.num_steps
        previous = request.last_timestep.get(is_cond)
        return done or (previous is not None and timestep >= previous)

    def _start_request(self) -> _Request:
        scheduler = getattr(self.pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            raise CacheConfigError(
                "the pipeline's scheduler has no timesteps set: ditcache's cache reads the request's schedule "
                "from it, so call the transformer through the pipeline"
            )
        num_steps = len(timesteps)
        all_sigmas = getattr(scheduler, "sigmas", None)
        sigmas = None
        if all_sigmas is not None and len(all_sigmas) >= num_steps:
            sigmas = [float(s) for s in all_sigmas[:num_steps]]
        shared = self._shared_cache(num_steps, sigmas)
        for cache in {id(c): c for c in self.caches.values()}.values():
            if cache is not shared:
                cache.reset()
        self.caches = {}
        self.stack_passes = {}
        self._request = _Request(num_steps, sigmas, [float(t) for t in timesteps], shared)
        return self._request

    def _shared_cache(self, num_steps: int, sigmas: list[float] | None) -> BaseFeatureCache | None:
        """The cache every expert of this request shares, reset for it; None for per-expert caches."""
        source = self.source
        if isinstance(source, CacheConfig):
            return source.build(num_steps, sigmas, 0) if source.spans_experts else None
        built_for = getattr(source, "num_inference_steps", num_steps)
        if built_for != num_steps:
            raise CacheConfigError(f"the cache was built for {built_for} steps but the request has {num_steps}")
        source.reset()
        if isinstance(source, Calibrator) and sigmas is not None:
            source.observe_sigmas(sigmas)
        return source

    def _config(self) -> CacheConfig:
        assert isinstance(self.source, CacheConfig), "a built cache is always shared"
        return self.source
