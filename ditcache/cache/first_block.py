"""FirstBlockCache: a re-implementation of diffusers' FirstBlockCache rule on ditcache's contract ("first_block").

This is not diffusers' hook: it is the same rule, re-written to decide from a
:class:`~ditcache.cache.context.StepContext`, so it runs inside any ditcache pipeline (every family,
per-branch state without ``cache_context``, per-expert caches, a reset per request, sequence
parallelism). Per branch and step:

1. Run the first transformer block (``ctx.first_block()``; a computed step continues from its
   output, so the block runs once either way) and take its residual ``r = first_block(x) - x``.
2. Compare ``r`` with the first-block residual of the previous *computed* step:
   ``sum |r - r_prev| / sum |r_prev|``. Above ``threshold`` the rest of the stack runs; otherwise
   it is skipped and the output is the first block's output plus the residual of the remaining
   blocks (stack output - first-block output) stored on the last computed step.

As in diffusers, the first step of a branch always computes, ``r_prev`` moves only on computed
steps, and a skipped step still pays for one block. Under sequence parallelism both sums are reduced
with ``ctx.group_sum`` before dividing, so every rank of the group takes the same decision (the
residual of a token shard would not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats, stats_by_branch, tensor_bytes
from ditcache.cache.context import StepArg, branch_of
from ditcache.cache.registry import CacheConfig, register_cache
from ditcache.cache.teacache import relative_l1, require_context
from ditcache.errors import CacheConfigError, CacheStateError


@dataclass
class _BranchState:
    step: int
    first_residual: torch.Tensor | None = None  # first block's residual on the last computed step
    probe: torch.Tensor | None = None  # this step's first-block residual, until update() keeps it
    tail_residual: torch.Tensor | None = None  # stack output - first-block output, last computed step
    stats: BranchStats = field(default_factory=BranchStats)


class FirstBlockCache(BaseFeatureCache):
    """diffusers' FirstBlockCache rule (see the module docstring).

    Args:
        num_inference_steps: steps of the run.
        threshold: relative change of the first block's residual above which the stack computes.
        init_step: the first step this cache is asked about (a Wan2.2 expert's first step).
    """

    uses_step_context = True

    def __init__(self, num_inference_steps: int, threshold: float = 0.05, init_step: int = 0) -> None:
        _check_threshold(threshold)
        self.num_inference_steps = num_inference_steps
        self.threshold = float(threshold)
        self.init_step = init_step
        self.reset()

    def reset(self) -> None:
        self._branches = {c: _BranchState(step=self.init_step - 1) for c in (True, False)}

    def should_compute(self, ctx: StepArg) -> bool:
        ctx = require_context(ctx, "FirstBlockCache")
        if ctx.first_block is None or ctx.hidden_states is None:
            raise CacheStateError("FirstBlockCache needs a step context that can run the first block")
        state = self._branches[ctx.is_cond]
        if state.step + 1 >= self.num_inference_steps:
            raise CacheStateError(
                f"FirstBlockCache ({ctx.branch} branch) asked about step {state.step + 1} of a "
                f"{self.num_inference_steps}-step run; call reset() between requests"
            )
        state.step += 1
        residual = ctx.first_block().detach().float() - ctx.hidden_states.detach().float()
        if state.first_residual is None or state.tail_residual is None:
            compute = True
        else:
            compute = relative_l1(residual, state.first_residual, ctx.group_sum) > self.threshold
        state.probe = residual if compute else None
        (state.stats.computed_steps if compute else state.stats.skipped_steps).append(state.step)
        return compute

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        state = self._branches[branch_of(ctx)]
        if state.probe is None:
            raise CacheStateError("FirstBlockCache.update() without a computed should_compute() before it")
        first_output = ori_input.detach().float() + state.probe
        state.first_residual, state.probe = state.probe, None
        state.tail_residual = output.detach().float() - first_output

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        ctx = require_context(ctx, "FirstBlockCache")
        state = self._branches[ctx.is_cond]
        state.stats.reuse_approximations += 1
        return (ctx.first_block().float() + state.tail_residual).to(input.dtype)

    def current_step(self, is_cond: StepArg) -> int:
        return self._branches[branch_of(is_cond)].step

    def stats(self) -> dict[str, dict]:
        return stats_by_branch(self._branches)

    def release(self) -> None:
        for state in self._branches.values():
            state.first_residual = state.tail_residual = None

    def memory_bytes(self) -> int:
        return tensor_bytes(t for s in self._branches.values() for t in (s.first_residual, s.tail_residual))


def _check_threshold(threshold: float) -> None:
    if not threshold >= 0:
        raise CacheConfigError(f"threshold must be >= 0, got {threshold!r}")


@register_cache
@dataclass(frozen=True)
class FirstBlockCacheConfig(CacheConfig):
    """FirstBlockCache's settings ("first_block"); see :class:`FirstBlockCache`."""

    name: ClassVar[str] = "first_block"
    cache_class: ClassVar[type[BaseFeatureCache]] = FirstBlockCache

    threshold: float = 0.05

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
