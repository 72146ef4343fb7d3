"""FixedIntervalTaylorCache: a re-implementation of TaylorSeer's rule on ditcache's contract ("taylorseer_interval").

This is not TaylorSeer's code: it is TaylorSeer's schedule and forecast, applied to the block-stack
residual behind ditcache's cache contract, so it runs inside any ditcache pipeline.

- Schedule: the first ``warmup`` steps compute (TaylorSeer's ``first_enhance``, diffusers'
  ``disable_cache_before_step``), then one step in every ``interval``. Like TaylorSeer the last step
  is not forced. The plan is fixed in advance, so every rank builds the same one.
- Forecast: TaylorSeer's ``sum_i D_i e^i / i!`` with ``D_{i+1} = (D_i - D_i') / window``, where
  ``e`` is the distance to the last computed step and ``window`` the last gap between computed
  steps. For orders 0 and 1 this equals AdaTaylorCache's Newton form; for order 2 it differs (see
  :mod:`ditcache.cache.ada_taylor`). Factors are kept in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats, stats_by_branch, tensor_bytes
from ditcache.cache.context import StepArg, branch_name, branch_of
from ditcache.cache.registry import CacheConfig, register_cache
from ditcache.errors import CacheConfigError, CacheStateError


def fixed_interval_plan(num_steps: int, interval: int, warmup: int, init_step: int = 0) -> list[int]:
    """Steps computed by TaylorSeer's schedule: the first ``warmup`` steps, then every ``interval``-th,
    counted from ``init_step`` (a Wan2.2 expert's first step)."""
    _check_settings(interval, 0, warmup)
    return [
        step
        for step in range(init_step, num_steps)
        if step - init_step < warmup or (step - init_step - (warmup - 1)) % interval == 0
    ]


@dataclass
class _BranchState:
    step: int
    factors: list[torch.Tensor] = field(default_factory=list)  # D_0, D_1, ... (fp32)
    last: int | None = None  # the last computed step
    stats: BranchStats = field(default_factory=BranchStats)


class FixedIntervalTaylorCache(BaseFeatureCache):
    """TaylorSeer's fixed-interval schedule with TaylorSeer's forecast (see the module docstring).

    Args:
        num_inference_steps: steps of the run.
        interval: one computed step in every ``interval`` after the warm-up (TaylorSeer's
            ``fresh_threshold``, diffusers' ``cache_interval``).
        order: TaylorSeer's ``max_order``; 0 is plain residual reuse.
        warmup: steps from ``init_step`` on that always compute.
        init_step: the first step this cache is asked about; it always computes.
    """

    uses_step_context = True

    def __init__(
        self, num_inference_steps: int, interval: int = 3, order: int = 1, warmup: int = 3, init_step: int = 0
    ) -> None:
        _check_settings(interval, order, warmup)
        self.num_inference_steps = num_inference_steps
        self.interval = interval
        self.order = order
        self.warmup = warmup
        self.init_step = init_step
        self.plan = frozenset(fixed_interval_plan(num_inference_steps, interval, warmup, init_step))
        self.reset()

    def planned_compute_steps(self, is_cond: bool) -> list[int]:
        """Steps (from ``init_step`` on) on which the block stack runs; the same for both branches."""
        return sorted(self.plan)

    def reset(self) -> None:
        self._branches = {c: _BranchState(step=self.init_step - 1) for c in (True, False)}

    def should_compute(self, ctx: StepArg) -> bool:
        is_cond = branch_of(ctx)
        state = self._branches[is_cond]
        if state.step + 1 >= self.num_inference_steps:
            raise CacheStateError(
                f"FixedIntervalTaylorCache ({branch_name(is_cond)} branch) asked about step {state.step + 1} of a "
                f"{self.num_inference_steps}-step run; call reset() between requests"
            )
        state.step += 1
        compute = state.step in self.plan or state.last is None
        (state.stats.computed_steps if compute else state.stats.skipped_steps).append(state.step)
        return compute

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        state = self._branches[branch_of(ctx)]
        factors = [output.detach().float() - ori_input.detach().float()]
        if state.last is not None:
            window = state.step - state.last
            for i in range(min(self.order, len(state.factors))):
                factors.append((factors[i] - state.factors[i]) / window)
        state.factors = factors
        state.last = state.step

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        state = self._branches[branch_of(ctx)]
        if state.last is None:
            raise CacheStateError(f"FixedIntervalTaylorCache.approximate() at step {state.step} with nothing cached")
        elapsed = state.step - state.last
        forecast = state.factors[0].clone()
        for i in range(1, len(state.factors)):
            forecast.add_(state.factors[i], alpha=elapsed**i / math.factorial(i))
        if len(state.factors) > 1:
            state.stats.taylor_approximations += 1
        else:
            state.stats.reuse_approximations += 1
        return (input.float() + forecast).to(input.dtype)

    def current_step(self, is_cond: StepArg) -> int:
        return self._branches[branch_of(is_cond)].step

    def stats(self) -> dict[str, dict]:
        return stats_by_branch(self._branches, lambda c, s: {"planned_compute_steps": self.planned_compute_steps(c)})

    def release(self) -> None:
        for state in self._branches.values():
            state.factors = []

    def memory_bytes(self) -> int:
        return tensor_bytes(t for s in self._branches.values() for t in s.factors)


def _check_settings(interval: int, order: int, warmup: int) -> None:
    for name, value, least in (("interval", interval, 1), ("order", order, 0), ("warmup", warmup, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise CacheConfigError(f"{name} must be an integer >= {least}, got {value!r}")


@register_cache
@dataclass(frozen=True)
class FixedIntervalTaylorConfig(CacheConfig):
    """FixedIntervalTaylorCache's settings ("taylorseer_interval"); see :class:`FixedIntervalTaylorCache`."""

    name: ClassVar[str] = "taylorseer_interval"
    cache_class: ClassVar[type[BaseFeatureCache]] = FixedIntervalTaylorCache

    interval: int = 3
    order: int = 1
    warmup: int = 3

    def __post_init__(self) -> None:
        _check_settings(self.interval, self.order, self.warmup)
