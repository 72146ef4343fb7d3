"""ResidualRecorder: a cache that always computes and keeps each step's block-stack residual.

The auto-tuner (``ditcache.cache.tune``) replays candidate skip schedules offline against these
residuals. A fixed, seeded subset of token positions is kept (forecasts act on each token
independently, so a token sample estimates the error of the whole sequence without storing
N x tokens x channels of a video model).
"""

from __future__ import annotations

import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats
from ditcache.cache.context import StepArg, branch_name, branch_of
from ditcache.errors import CacheConfigError, CacheStateError


class ResidualRecorder(BaseFeatureCache):
    """Records the fp32 residual of every step of every request, per branch."""

    uses_step_context = True
    spans_experts = True  # it measures a whole run, across an expert switch

    def __init__(self, num_inference_steps: int, max_tokens: int = 1024, seed: int = 0) -> None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise CacheConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if max_tokens < 1:
            raise CacheConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        self.num_inference_steps = num_inference_steps
        self.max_tokens = max_tokens
        self.seed = seed
        self.requests: dict[bool, list[list[torch.Tensor]]] = {True: [], False: []}
        self._current: dict[bool, list[torch.Tensor]] = {}
        self._stats: dict[bool, BranchStats] = {}

    def _token_index(self, num_tokens: int) -> torch.Tensor | None:
        if num_tokens <= self.max_tokens:
            return None
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(num_tokens, generator=gen)[: self.max_tokens].sort().values

    def should_compute(self, ctx: StepArg) -> bool:
        is_cond = branch_of(ctx)
        current = self._current.setdefault(is_cond, [])
        if len(current) >= self.num_inference_steps:
            raise CacheStateError(
                f"ResidualRecorder ({branch_name(is_cond)}) got more than {self.num_inference_steps} steps; "
                "call reset() between requests"
            )
        self._stats.setdefault(is_cond, BranchStats()).computed_steps.append(len(current))
        return True

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        is_cond = branch_of(ctx)
        residual = output.detach().float() - ori_input.detach().float()
        index = self._token_index(residual.shape[-2])
        if index is not None:
            residual = residual.index_select(-2, index.to(residual.device))
        current = self._current[bool(is_cond)]
        current.append(residual.cpu())
        if len(current) == self.num_inference_steps:
            self.requests[bool(is_cond)].append(current)
            self._current[bool(is_cond)] = []

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        raise CacheStateError("the ResidualRecorder computes every step; approximate() must not be called")

    def reset(self) -> None:
        """Start a new request; recorded requests are kept (a tuner wants several)."""
        self._current = {}
        self._stats = {}

    def stats(self) -> dict[str, dict]:
        return {branch_name(c): s.as_dict() for c, s in sorted(self._stats.items(), reverse=True)}

    def trajectories(self, is_cond: bool) -> list[torch.Tensor]:
        """One tensor [N, *residual shape] per completed request of this branch."""
        return [torch.stack(steps) for steps in self.requests[bool(is_cond)]]
