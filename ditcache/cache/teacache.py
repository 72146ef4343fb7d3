"""TeaCacheRule: a re-implementation of TeaCache's skip rule on ditcache's cache contract ("teacache").

This is not TeaCache's code: it is TeaCache's rule, re-written to decide from a
:class:`~ditcache.cache.context.StepContext` so it runs inside any ditcache pipeline (every family,
both CFG branches, per-expert caches, sequence parallelism). The rule, per branch:

1. The signal is the step's timestep modulation of the first block (``ctx.modulation``: Wan's
   ``timestep_proj``, TeaCache's ``e0`` in its ``use_ret_steps`` recipe). A family whose adapter
   exposes no modulation gives ``None`` there; the rule then decides on the block-stack input
   (``ctx.hidden_states``), the tensor the modulation would act on.
2. Its relative L1 change to the previous step's signal, ``sum |a - b| / sum |b|``, is rescaled by a
   polynomial (TeaCache fits one per model from input change to model-output change; see
   :func:`fit_teacache_polynomial`) and accumulated.
3. While the sum stays under ``thresh`` the block stack is skipped and the last computed step's
   residual (output - input) is reused; reaching ``thresh`` computes and restarts the sum. The first
   ``warmup`` steps (TeaCache's ``ret_steps``) always compute.

Under sequence parallelism the signal may be a token shard (the fallback, or a per-token
modulation), so both sums are reduced with ``ctx.group_sum`` before dividing: every rank of the
group takes the same decision. A per-sample modulation is the same on every rank and the reduction
then leaves the ratio unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats, stats_by_branch, tensor_bytes
from ditcache.cache.context import StepArg, StepContext, branch_of, local_sum
from ditcache.cache.registry import CacheConfig, register_cache
from ditcache.errors import CacheConfigError, CacheStateError

#: Without fitted coefficients the raw relative change is accumulated (rescale(d) = d).
IDENTITY_POLYNOMIAL = (1.0, 0.0)


def relative_l1(
    current: torch.Tensor,
    previous: torch.Tensor,
    group_sum: Callable[[torch.Tensor], torch.Tensor] = local_sum,
) -> float:
    """``sum |current - previous| / sum |previous|``, both sums taken over ``group_sum``'s ranks.

    On one rank this is TeaCache's ``mean |a - b| / mean |b|`` (the counts cancel). The two sums are
    reduced together (one collective) in float64, so every rank divides the same two numbers.
    """
    previous = previous.float()
    sums = torch.stack(
        [
            (current.float() - previous).abs().sum(dtype=torch.float64),
            previous.abs().sum(dtype=torch.float64),
        ]
    )
    change, size = group_sum(sums).tolist()
    return change / max(size, 1e-30)


def fit_teacache_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> list[float]:
    """``np.polyfit(x, y, degree)``: TeaCache's rescaling from input change to output change.

    ``x`` are relative L1 changes of the signal between consecutive steps of a calibration run, ``y``
    the relative L1 changes of the model output over the same steps. Coefficients come highest
    power first (``np.polyval`` order).
    """
    if len(x) != len(y) or len(x) <= degree:
        raise CacheConfigError(f"need more than {degree} (x, y) pairs to fit the TeaCache polynomial, got {len(x)}")
    return [float(c) for c in np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), degree)]


def teacache_signal(ctx: StepContext) -> torch.Tensor:
    """What the rule compares between steps: the modulation, or the block-stack input without one."""
    signal = ctx.modulation if ctx.modulation is not None else ctx.hidden_states
    if signal is None:
        raise CacheStateError("TeaCacheRule needs a step context with modulation or hidden_states")
    return signal


def require_context(ctx: StepArg, cache: str) -> StepContext:
    """``ctx`` as a StepContext; a data-dependent cache cannot decide from the bare branch flag."""
    if not isinstance(ctx, StepContext):
        raise CacheStateError(
            f"{cache} decides on the step's tensors and needs a StepContext, got the bare branch flag {ctx!r}"
        )
    return ctx


@dataclass
class _BranchState:
    step: int
    accumulated: float = 0.0
    previous_signal: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    stats: BranchStats = field(default_factory=BranchStats)


class TeaCacheRule(BaseFeatureCache):
    """TeaCache's rule (see the module docstring), with per-branch state and residual reuse.

    Args:
        num_inference_steps: steps of the run.
        coefficients: the rescaling polynomial, highest power first; the default accumulates the
            raw change.
        thresh: the accumulated (rescaled) change at which the stack computes again.
        warmup: steps from ``init_step`` on that always compute (TeaCache's ``ret_steps``).
        compute_last: also force the last step (TeaCache's recipe without ``ret_steps`` does).
        init_step: the first step this cache is asked about (a Wan2.2 expert's first step); it
            always computes, so no residual crosses an expert switch.
    """

    uses_step_context = True

    def __init__(
        self,
        num_inference_steps: int,
        coefficients: Sequence[float] = IDENTITY_POLYNOMIAL,
        thresh: float = 0.1,
        warmup: int = 5,
        compute_last: bool = False,
        init_step: int = 0,
    ) -> None:
        _check_settings(coefficients, thresh, warmup)
        self.num_inference_steps = num_inference_steps
        self.coefficients = [float(c) for c in coefficients]
        self.thresh = float(thresh)
        self.warmup = warmup
        self.compute_last = compute_last
        self.init_step = init_step
        self.reset()

    def reset(self) -> None:
        self._branches = {c: _BranchState(step=self.init_step - 1) for c in (True, False)}

    def should_compute(self, ctx: StepArg) -> bool:
        ctx = require_context(ctx, "TeaCacheRule")
        state = self._branches[ctx.is_cond]
        if state.step + 1 >= self.num_inference_steps:
            raise CacheStateError(
                f"TeaCacheRule ({ctx.branch} branch) asked about step {state.step + 1} of a "
                f"{self.num_inference_steps}-step run; call reset() between requests"
            )
        state.step += 1
        signal = teacache_signal(ctx).detach()
        forced = (
            state.step - self.init_step < self.warmup
            or state.previous_signal is None
            or state.residual is None
            or (self.compute_last and state.step == self.num_inference_steps - 1)
        )
        if forced:
            compute = True
        else:
            change = relative_l1(signal, state.previous_signal, ctx.group_sum)
            state.accumulated += float(np.polyval(self.coefficients, change))
            compute = state.accumulated >= self.thresh
        if compute:
            state.accumulated = 0.0
        state.previous_signal = signal
        (state.stats.computed_steps if compute else state.stats.skipped_steps).append(state.step)
        return compute

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        self._branches[branch_of(ctx)].residual = output.detach().float() - ori_input.detach().float()

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        state = self._branches[branch_of(ctx)]
        if state.residual is None:
            raise CacheStateError(f"TeaCacheRule.approximate() at step {state.step} with nothing cached")
        state.stats.reuse_approximations += 1
        return (input.float() + state.residual).to(input.dtype)

    def current_step(self, is_cond: StepArg) -> int:
        return self._branches[branch_of(is_cond)].step

    def stats(self) -> dict[str, dict]:
        return stats_by_branch(self._branches)

    def release(self) -> None:
        for state in self._branches.values():
            state.residual = state.previous_signal = None

    def memory_bytes(self) -> int:
        return tensor_bytes(t for s in self._branches.values() for t in (s.residual, s.previous_signal))


def _check_settings(coefficients: Sequence[float], thresh: float, warmup: int) -> None:
    if len(coefficients) < 1:
        raise CacheConfigError("coefficients must hold at least one polynomial coefficient")
    if not thresh > 0:
        raise CacheConfigError(f"thresh must be > 0, got {thresh!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise CacheConfigError(f"warmup must be an integer >= 1, got {warmup!r}")


@register_cache
@dataclass(frozen=True)
class TeaCacheConfig(CacheConfig):
    """TeaCacheRule's settings ("teacache"); see :class:`TeaCacheRule` for each field."""

    name: ClassVar[str] = "teacache"
    cache_class: ClassVar[type[BaseFeatureCache]] = TeaCacheRule

    coefficients: tuple[float, ...] = IDENTITY_POLYNOMIAL
    thresh: float = 0.1
    warmup: int = 5
    compute_last: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        _check_settings(self.coefficients, self.thresh, self.warmup)
