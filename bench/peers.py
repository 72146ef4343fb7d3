"""The peer methods the quality benchmark runs against ditcache, on the same model and sampler.

Two kinds of peers:

* Rules re-implemented here at the block-stack level, behind ditcache's cache contract, so they run
  through the same adapter (embed -> cached block stack -> head) as AdaTaylorCache:

  - :class:`FixedIntervalTaylorCache`: TaylorSeer's schedule (warm-up, then one full compute every
    ``interval`` steps) with TaylorSeer's own forecast ``sum_i D_i e^i / i!``,
    ``D_{i+1} = (D_i - D_i') / window``, applied to the block-stack residual.
  - :class:`TeaCacheRule`: TeaCache's rule. The relative L1 change of the timestep-modulated input
    (Wan's ``timestep_proj``, TeaCache's ``e0`` with ``use_ret_steps``) is rescaled by a polynomial
    fitted on a calibration run (:func:`fit_teacache_polynomial`, ``np.polyfit`` of degree 4 from
    input change to model-output change, as TeaCache fits its coefficients) and accumulated; the
    block stack is skipped, reusing the last residual, while the sum stays under ``thresh``.

* diffusers' own cache hooks on the same ``WanTransformer3DModel`` (:func:`hooked_copy`):
  FirstBlockCache, MagCache and TaylorSeer (with block-level ``cache_identifiers`` so whole blocks
  are predicted instead of only the attention outputs). They run on the diffusers forward; the
  benchmark wraps every call in ``cache_context("cond"|"uncond")``, which keys diffusers' hook state
  per branch, and resets the hooks (``_reset_stateful_cache``) before every request.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats
from ditcache.cache.context import branch_name
from ditcache.errors import CacheConfigError, CacheStateError


# ---------------------------------------------------------------------------------------------
# TaylorSeer-style fixed-interval schedule (stack level)
# ---------------------------------------------------------------------------------------------


def fixed_interval_plan(num_steps: int, interval: int, warmup: int, init_step: int = 0) -> list[int]:
    """Steps computed by TaylorSeer's schedule: the first ``warmup`` steps, then every ``interval``-th.

    Counted from ``init_step`` (a Wan2.2 expert's first step). Like TaylorSeer, the last step is not
    forced: it is computed only when the interval lands on it.
    """
    if interval < 1 or warmup < 1:
        raise CacheConfigError(f"interval and warmup must be >= 1, got {interval}, {warmup}")
    plan = []
    for step in range(init_step, num_steps):
        local = step - init_step
        if local < warmup or (local - (warmup - 1)) % interval == 0:
            plan.append(step)
    return plan


@dataclass
class _TaylorState:
    step: int
    factors: list[torch.Tensor] = field(default_factory=list)  # D_0, D_1, ... (fp32)
    last: int | None = None
    stats: BranchStats = field(default_factory=BranchStats)


class FixedIntervalTaylorCache(BaseFeatureCache):
    """TaylorSeer's rule on the block-stack residual (per branch state, fp32 factors).

    ``order`` is TaylorSeer's ``max_order``; ``warmup`` its ``first_enhance`` / diffusers'
    ``disable_cache_before_step``. The forecast is TaylorSeer's, not ditcache's Newton form: for
    orders 0 and 1 they coincide, for order 2 TaylorSeer's is the anchors' form.
    """

    def __init__(self, num_inference_steps: int, interval: int, order: int = 1, warmup: int = 3, init_step: int = 0):
        if order < 0:
            raise CacheConfigError(f"order must be >= 0, got {order}")
        self.num_inference_steps = num_inference_steps
        self.interval = interval
        self.order = order
        self.warmup = warmup
        self.init_step = init_step
        self.plan = frozenset(fixed_interval_plan(num_inference_steps, interval, warmup, init_step))
        self.reset()

    def reset(self) -> None:
        self._branches = {c: _TaylorState(step=self.init_step - 1) for c in (True, False)}

    def should_compute(self, is_cond: bool) -> bool:
        state = self._branches[bool(is_cond)]
        if state.step + 1 >= self.num_inference_steps:
            raise CacheStateError(f"FixedIntervalTaylorCache asked past step {self.num_inference_steps - 1}")
        state.step += 1
        compute = state.step in self.plan or state.last is None
        (state.stats.computed_steps if compute else state.stats.skipped_steps).append(state.step)
        return compute

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, is_cond: bool) -> None:
        state = self._branches[bool(is_cond)]
        residual = output.detach().float() - ori_input.detach().float()
        new = [residual]
        if state.last is not None:
            window = state.step - state.last
            for i in range(min(self.order, len(state.factors))):
                new.append((new[i] - state.factors[i]) / window)
        state.factors = new
        state.last = state.step

    def approximate(self, input: torch.Tensor, is_cond: bool) -> torch.Tensor:
        state = self._branches[bool(is_cond)]
        if state.last is None:
            raise CacheStateError("approximate() before any computed step")
        e = state.step - state.last
        forecast = state.factors[0].clone()
        for i in range(1, len(state.factors)):
            forecast.add_(state.factors[i], alpha=e**i / math.factorial(i))
        if len(state.factors) > 1:
            state.stats.taylor_approximations += 1
        else:
            state.stats.reuse_approximations += 1
        return (input.float() + forecast).to(input.dtype)

    def current_step(self, is_cond: bool) -> int:
        return self._branches[bool(is_cond)].step

    def stats(self) -> dict[str, dict]:
        return {branch_name(c): s.stats.as_dict() for c, s in sorted(self._branches.items(), reverse=True)}

    def memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self._branches.values() for t in s.factors)


# ---------------------------------------------------------------------------------------------
# TeaCache-style rule (stack level), with its polynomial fitted on a calibration run
# ---------------------------------------------------------------------------------------------


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """TeaCache's distance: mean |a - b| / mean |b|."""
    previous = previous.float()
    return float((current.float() - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12))


def fit_teacache_polynomial(x: Sequence[float], y: Sequence[float], degree: int = 4) -> list[float]:
    """``np.polyfit(x, y, degree)``: TeaCache's rescaling from input change to output change."""
    if len(x) != len(y) or len(x) <= degree:
        raise CacheConfigError(f"need more than {degree} (x, y) pairs to fit the TeaCache polynomial, got {len(x)}")
    return [float(c) for c in np.polyfit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), degree)]


@dataclass
class _TeaState:
    step: int
    accumulated: float = 0.0
    previous_input: torch.Tensor | None = None
    observed: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    stats: BranchStats = field(default_factory=BranchStats)


class TeaCacheRule(BaseFeatureCache):
    """TeaCache's skip rule; the caller hands it the modulated input with :meth:`observe` first.

    ``warmup`` steps (TeaCache's ``ret_steps``) always compute, as does the first step after
    ``init_step``. With Wan's ``use_ret_steps`` recipe TeaCache does not force the last step; set
    ``compute_last`` to force it. Residual reuse (order 0) on skipped steps, as TeaCache does.
    """

    def __init__(
        self,
        num_inference_steps: int,
        coefficients: Sequence[float],
        thresh: float,
        warmup: int = 5,
        init_step: int = 0,
        compute_last: bool = False,
    ):
        self.num_inference_steps = num_inference_steps
        self.coefficients = [float(c) for c in coefficients]
        self.thresh = float(thresh)
        self.warmup = warmup
        self.init_step = init_step
        self.compute_last = compute_last
        self.reset()

    def reset(self) -> None:
        self._branches = {c: _TeaState(step=self.init_step - 1) for c in (True, False)}

    def observe(self, modulated_input: torch.Tensor, is_cond: bool) -> None:
        """The timestep-modulated input of the step about to be decided."""
        self._branches[bool(is_cond)].observed = modulated_input.detach()

    def should_compute(self, is_cond: bool) -> bool:
        state = self._branches[bool(is_cond)]
        if state.observed is None:
            raise CacheStateError("TeaCacheRule.should_compute() needs observe(modulated_input) first")
        state.step += 1
        local = state.step - self.init_step
        forced = (
            local < self.warmup
            or state.previous_input is None
            or state.residual is None
            or (self.compute_last and state.step == self.num_inference_steps - 1)
        )
        if forced:
            compute = True
            state.accumulated = 0.0
        else:
            distance = relative_l1(state.observed, state.previous_input)
            state.accumulated += float(np.polyval(self.coefficients, distance))
            compute = state.accumulated >= self.thresh
            if compute:
                state.accumulated = 0.0
        state.previous_input = state.observed
        state.observed = None
        (state.stats.computed_steps if compute else state.stats.skipped_steps).append(state.step)
        return compute

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, is_cond: bool) -> None:
        self._branches[bool(is_cond)].residual = output.detach().float() - ori_input.detach().float()

    def approximate(self, input: torch.Tensor, is_cond: bool) -> torch.Tensor:
        state = self._branches[bool(is_cond)]
        state.stats.reuse_approximations += 1
        return (input.float() + state.residual).to(input.dtype)

    def current_step(self, is_cond: bool) -> int:
        return self._branches[bool(is_cond)].step

    def stats(self) -> dict[str, dict]:
        return {branch_name(c): s.stats.as_dict() for c, s in sorted(self._branches.items(), reverse=True)}

    def memory_bytes(self) -> int:
        return sum(s.residual.numel() * 4 for s in self._branches.values() if s.residual is not None)


def cached_stack_forward(adapter, hidden_states, timestep, encoder_hidden_states, *, is_cond: bool, cache, on_state=None):
    """embed -> (cache decides) block stack -> head, through the adapter's public parts only.

    ``on_state(state)`` sees the embedded state before the cache decides (TeaCache observes its
    modulated input there). Same call pattern as ``FamilyAdapter.forward`` on one process.
    """
    state = adapter.embed(hidden_states, timestep, encoder_hidden_states)
    if on_state is not None:
        on_state(state)
    x = state.hidden_states
    if cache is not None and not cache.should_compute(is_cond):
        out = cache.approximate(x, is_cond)
    else:
        out = adapter.run_blocks(state, x)
        if cache is not None:
            cache.update(out, x, is_cond)
    return adapter.head(out, state), state


def teacache_forward(adapter, hidden_states, timestep, encoder_hidden_states, *, is_cond: bool, cache: TeaCacheRule):
    """One adapter forward with TeaCache deciding on Wan's ``timestep_proj`` (TeaCache's ``e0``)."""
    velocity, _ = cached_stack_forward(
        adapter, hidden_states, timestep, encoder_hidden_states, is_cond=is_cond, cache=cache,
        on_state=lambda state: cache.observe(state.block_kwargs["temb"], is_cond),
    )  # fmt: skip
    return velocity


# ---------------------------------------------------------------------------------------------
# diffusers' hooks
# ---------------------------------------------------------------------------------------------

# Block-level identifiers for diffusers' TaylorSeer on Wan: every transformer block's output is
# forecast, so a predicted step runs no block at all (the default patterns hook only the attention
# modules, leaving the feed-forward networks running on every step).
TAYLORSEER_BLOCK_IDENTIFIERS = [r"^blocks\.\d+$"]


def diffusers_magcache_plan(
    ratios: Sequence[float], num_steps: int, threshold: float, max_skip_steps: int, retention_ratio: float
) -> list[int]:
    """The steps diffusers' MagCache hook computes (mirrors ``MagCacheHeadHook``; for de-duplication).

    Differences to ditcache's schedule: skipping may start at ``int(r * N + 0.5)`` (ditcache computes
    through ``int(r * N)``), the comparison is ``<=``, and the last step is not forced.
    """
    retention_step = int(retention_ratio * num_steps + 0.5)
    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    plan, have_residual = [], False
    for step in range(num_steps):
        compute = True
        if step >= retention_step:
            acc_ratio *= ratios[step] if step < len(ratios) else 1.0
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if have_residual and acc_err <= threshold and acc_steps <= max_skip_steps:
                compute = False
            else:
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        if compute:
            plan.append(step)
            have_residual = True
    return plan


def hooked_copy(transformer: torch.nn.Module, config) -> torch.nn.Module:
    """A deep copy of ``transformer`` (same weights) with a diffusers cache config enabled."""
    model = copy.deepcopy(transformer)
    model.enable_cache(config)
    return model


def make_diffusers_config(kind: str, **kw):
    """Build a diffusers cache config: kind in {"fbc", "magcache", "taylorseer"}."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=kw["threshold"])
    if kind == "magcache":
        return MagCacheConfig(
            threshold=kw["threshold"],
            max_skip_steps=kw["max_skip_steps"],
            retention_ratio=kw["retention_ratio"],
            num_inference_steps=kw["num_inference_steps"],
            mag_ratios=torch.tensor(list(kw["mag_ratios"]), dtype=torch.float32),
        )
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=kw["cache_interval"],
            max_order=kw["max_order"],
            disable_cache_before_step=kw.get("disable_cache_before_step", 3),
            taylor_factors_dtype=kw.get("taylor_factors_dtype", torch.float32),
            cache_identifiers=list(kw.get("cache_identifiers", TAYLORSEER_BLOCK_IDENTIFIERS)),
        )
    raise CacheConfigError(f"unknown diffusers cache kind {kind!r}; known: fbc, magcache, taylorseer")


def hooked_block_names(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names that ``patterns`` (re.fullmatch) select: a check that TaylorSeer hooks whole blocks."""
    return [name for name, _ in model.named_modules() if any(re.fullmatch(p, name) for p in patterns)]
