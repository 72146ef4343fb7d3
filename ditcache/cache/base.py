"""The cache contract shared by every feature cache.

A feature cache sits around the transformer block stack only (embeddings and head always run)::

    ori_x = x
    if cache.should_compute(is_cond):
        x = blocks(x, ...)
        cache.update(x, ori_x, is_cond)
    else:
        x = cache.approximate(x, is_cond)

``should_compute`` advances the branch's step counter, so it is called exactly once per branch
per denoising step. ``is_cond`` selects the branch (conditional or unconditional CFG pass); the two
branches keep separate state because their residuals differ.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


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


def branch_name(is_cond: bool) -> str:
    return "cond" if is_cond else "uncond"


class BaseFeatureCache(ABC):
    """Interface of every feature cache (see module docstring for the call pattern)."""

    @abstractmethod
    def should_compute(self, is_cond: bool) -> bool:
        """Advance this branch's step counter, then say whether the block stack must run."""

    @abstractmethod
    def update(self, output: torch.Tensor, ori_input: torch.Tensor, is_cond: bool) -> None:
        """Record the block stack's real output for the step just decided as 'compute'."""

    @abstractmethod
    def approximate(self, input: torch.Tensor, is_cond: bool) -> torch.Tensor:
        """Return an estimate of the block stack's output for the step just decided as 'skip'."""

    @abstractmethod
    def reset(self) -> None:
        """Drop all state so the next request starts as if the cache were new."""

    def current_step(self, is_cond: bool) -> int:
        """Index of the step last decided for this branch (-1 before the first decision)."""
        return -1

    def stats(self) -> dict[str, dict]:
        """Per-branch telemetry of the current request; empty for caches that track nothing."""
        return {}

    def memory_bytes(self) -> int:
        """Bytes held in cached tensors right now."""
        return 0


class NoCache(BaseFeatureCache):
    """Computes every step; the uncached baseline. Counts steps so telemetry still works."""

    def __init__(self) -> None:
        self._stats: dict[bool, BranchStats] = {}
        self._step: dict[bool, int] = {}

    def should_compute(self, is_cond: bool) -> bool:
        step = self._step.get(is_cond, -1) + 1
        self._step[is_cond] = step
        self._stats.setdefault(is_cond, BranchStats()).computed_steps.append(step)
        return True

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, is_cond: bool) -> None:
        pass

    def approximate(self, input: torch.Tensor, is_cond: bool) -> torch.Tensor:
        raise NotImplementedError("NoCache never skips; approximate() must not be called")

    def reset(self) -> None:
        self._stats.clear()
        self._step.clear()

    def current_step(self, is_cond: bool) -> int:
        return self._step.get(is_cond, -1)

    def stats(self) -> dict[str, dict]:
        return {branch_name(c): s.as_dict() for c, s in sorted(self._stats.items(), reverse=True)}
