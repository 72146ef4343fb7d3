"""The cache contract shared by every feature cache.

A feature cache sits around the transformer block stack only (embeddings and head always run)::

    ori_x = x
    if cache.should_compute(ctx):
        x = blocks(x, ...)
        cache.update(x, ori_x, ctx)
    else:
        x = cache.approximate(x, ctx)

``should_compute`` advances the branch's step counter, so it is called exactly once per branch
per denoising step. ``ctx`` is the step's :class:`~ditcache.cache.context.StepContext` (or, as in
the seed contract, just the branch flag ``is_cond``); the two branches keep separate state because
their residuals differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ditcache.cache.context import StepArg, branch_name


@dataclass
class BranchStats:
    """What one branch of a cache did during a request (telemetry)."""

    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)
    taylor_approximations: int = 0
    reuse_approximations: int = 0

    def as_dict(self) -> dict:
        return {
            "computed_steps": list(self.computed_steps),
            "skipped_steps": list(self.skipped_steps),
            "num_computed": len(self.computed_steps),
            "num_skipped": len(self.skipped_steps),
            "taylor_approximations": self.taylor_approximations,
            "reuse_approximations": self.reuse_approximations,
        }


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by ``tensors`` (None entries hold nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def stats_by_branch(
    branches: Mapping[bool, Any], extra: Callable[[bool, Any], dict] = lambda is_cond, state: {}
) -> dict[str, dict]:
    """``stats()`` of a cache keeping one state per branch (each with a :class:`BranchStats` as
    ``.stats``): the branches that ran, cond first, each with ``extra(is_cond, state)`` merged in."""
    return {
        branch_name(is_cond): {**state.stats.as_dict(), **extra(is_cond, state)}
        for is_cond, state in sorted(branches.items(), reverse=True)
        if state.stats.computed_steps or state.stats.skipped_steps
    }


class BaseFeatureCache(ABC):
    """Interface of every feature cache (see module docstring for the call pattern)."""

    #: A cache that may serve several experts of one request (it measures, or keeps no residual).
    #: Others get one instance per expert, so no residual crosses an expert switch.
    spans_experts: bool = False
    #: Whether ``should_compute``/``update``/``approximate`` take a StepContext; False (a cache
    #: written to the seed contract) gets the branch flag instead.
    uses_step_context: bool = False

    @abstractmethod
    def should_compute(self, ctx: StepArg) -> bool:
        """Advance this branch's step counter, then say whether the block stack must run."""

    @abstractmethod
    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        """Record the block stack's real output for the step just decided as 'compute'."""

    @abstractmethod
    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        """Return an estimate of the block stack's output for the step just decided as 'skip'."""

    @abstractmethod
    def reset(self) -> None:
        """Drop all state so the next request starts as if the cache were new."""

    def current_step(self, is_cond: StepArg) -> int:
        """Index of the step last decided for this branch (-1 before the first decision)."""
        return -1

    def stats(self) -> dict[str, dict]:
        """Per-branch telemetry of the current request; empty for caches that track nothing."""
        return {}

    def memory_bytes(self) -> int:
        """Bytes held in cached tensors right now."""
        return 0

    def release(self) -> None:
        """Drop the cached tensors but keep the request's telemetry: called when this cache's model
        has run its last step of the request (a Wan2.2 expert at the switch), so the memory is free
        for the rest of the run. The cache must not be asked to approximate again before ``reset``."""
