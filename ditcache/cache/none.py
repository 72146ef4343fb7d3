"""NoCache: the uncached baseline, and its config ("none")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats
from ditcache.cache.context import StepArg, branch_name, branch_of
from ditcache.cache.registry import CacheConfig, register_cache


class NoCache(BaseFeatureCache):
    """Computes every step; the uncached baseline. Counts steps (from ``init_step``, the first step
    of the expert it serves) so telemetry still says what ran."""

    uses_step_context = True

    def __init__(self, init_step: int = 0) -> None:
        self.init_step = init_step
        self._stats: dict[bool, BranchStats] = {}
        self._step: dict[bool, int] = {}

    def should_compute(self, ctx: StepArg) -> bool:
        is_cond = branch_of(ctx)
        step = self._step.get(is_cond, self.init_step - 1) + 1
        self._step[is_cond] = step
        self._stats.setdefault(is_cond, BranchStats()).computed_steps.append(step)
        return True

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        pass

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        raise NotImplementedError("NoCache never skips; approximate() must not be called")

    def reset(self) -> None:
        self._stats.clear()
        self._step.clear()

    def current_step(self, is_cond: StepArg) -> int:
        return self._step.get(branch_of(is_cond), self.init_step - 1)

    def stats(self) -> dict[str, dict]:
        return {branch_name(c): s.as_dict() for c, s in sorted(self._stats.items(), reverse=True)}


@register_cache
@dataclass(frozen=True)
class NoCacheConfig(CacheConfig):
    """Compute every step ("none")."""

    name: ClassVar[str] = "none"
    cache_class: ClassVar[type[BaseFeatureCache]] = NoCache
