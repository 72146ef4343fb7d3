"""AdaTaylorCache: MagCache's magnitude-ratio skip schedule with TaylorSeer's forecast.

On a computed step the cache stores the block-stack residual R = output - input and its finite
differences over the last computed steps. On a skipped step it forecasts the residual from them,
or, when the last computed step is further back than ``taylor_threshold``, reuses the last
residual as is (a stale derivative extrapolated far does more harm than plain reuse).

Two forecasts, equal for orders 0 and 1 (``taylor_form``):

- ``"newton"``: the Newton form of the polynomial through the computed steps (divided differences
  over each span). Exact for polynomials of degree <= n at any spacing of the computed steps.
- ``"taylor"``: TaylorSeer's and the original product's ``sum D_i e^i / i!`` with
  ``D_{i+1} = (D_i - D_i') / window`` (window: the last gap between computed steps). For order 2
  at equal spacing its quadratic term is ``e / (e + window)`` times Newton's. A model's residuals
  are not polynomials, so which form forecasts better is measured, not derived: the default is
  ``"taylor"`` because it forecast better on both reference models at 20, 30 and 50 steps
  (``python -m bench.taylor_form``, identical plans: 21 of 24 settings, mean 0.15 dB and 0.91 dB
  over Newton on the one- and two-expert models; one step count within 0.05 dB).

Storage (``cache_dtype``): fp32 by default whatever the model dtype, because bf16 differences of
nearly equal tensors lose most of their bits; ``"model"`` stores in the model's dtype (half the
memory under bf16) while every difference and forecast is still computed in fp32. ``offload="cpu"``
keeps the stored tensors in host memory (pinned when CUDA is present) while the block stack runs and
copies them back to the model's device, asynchronously, when a skipped step is decided: the device
holds them only during skipped steps, when no block activations compete for memory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

import torch

from ditcache.cache.base import BaseFeatureCache, BranchStats, stats_by_branch, tensor_bytes
from ditcache.cache.context import StepArg, branch_name, branch_of
from ditcache.cache.registry import CacheConfig, register_cache
from ditcache.cache.schedule import (
    compute_skip_schedule,
    resample_by_sigma,
    resample_nearest,
    validate_schedule_settings,
)
from ditcache.errors import CacheConfigError, CacheStateError
from ditcache.params import CacheParams, load_params, params_from_dict


DEFAULT_FORECAST = {"n_derivatives": 1, "taylor_threshold": 2}  # the seed's defaults
TAYLOR_FORMS = ("newton", "taylor")
DEFAULT_TAYLOR_FORM = "taylor"  # measured better on both reference models (module docstring)
CACHE_DTYPES = ("float32", "model")
OFFLOADS = (None, "cpu")


def resolve_forecast(params: CacheParams, n_derivatives: int | None, taylor_threshold: int | None) -> tuple[int, int]:
    """(n_derivatives, taylor_threshold) of a cache: each as given, else as the params' tuned forecast
    records it (the one the tuner chose the plan with), else the seed's default."""
    recorded = params.forecast or DEFAULT_FORECAST
    return (
        recorded["n_derivatives"] if n_derivatives is None else n_derivatives,
        recorded["taylor_threshold"] if taylor_threshold is None else taylor_threshold,
    )


def _check_storage(cache_dtype: str, offload: str | None) -> None:
    if cache_dtype not in CACHE_DTYPES:
        raise CacheConfigError(f"cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
    if offload not in OFFLOADS:
        raise CacheConfigError(f"offload must be None or 'cpu', got {offload!r}")


def _check_order(n_derivatives: int | None, taylor_threshold: int | None, taylor_form: str) -> None:
    """None (unset: the params' forecast, else the default) passes."""
    if n_derivatives is not None and (
        isinstance(n_derivatives, bool) or not isinstance(n_derivatives, int) or n_derivatives < 0
    ):
        raise CacheConfigError(f"n_derivatives must be an integer >= 0, got {n_derivatives!r}")
    if taylor_threshold is not None and (
        isinstance(taylor_threshold, bool) or not isinstance(taylor_threshold, int) or taylor_threshold < 1
    ):
        raise CacheConfigError(f"taylor_threshold must be an integer >= 1, got {taylor_threshold!r}")
    if taylor_form not in TAYLOR_FORMS:
        raise CacheConfigError(f"taylor_form must be one of {TAYLOR_FORMS}, got {taylor_form!r}")


@dataclass
class _BranchState:
    """Everything one branch (cond or uncond) owns: its plan, counter and residual cache."""

    compute_steps: frozenset[int]
    step: int
    differences: list[torch.Tensor] = field(default_factory=list)  # f[t0], f[t0,t1], f[t0,t1,t2] ...
    support: list[int] = field(default_factory=list)  # t0 > t1 > ...: the computed steps they span
    stats: BranchStats = field(default_factory=BranchStats)
    # with offload: the model's device, and the differences copied back there for skipped steps
    device: torch.device | None = None
    resident: list[torch.Tensor] | None = None


class AdaTaylorCache(BaseFeatureCache):
    """Adaptive skip schedule + Taylor forecast + residual-reuse fallback.

    The plan (which steps compute) is fixed at construction from the params, so every rank builds
    the same one without communication. Params with a tuned ``compute_steps`` placement for the
    run's step count use it instead of the threshold rule (``plan_source`` says which).

    Args:
        model_type: name of a shipped (or user) params file; alternatively pass ``params`` or the
            explicit curve/settings keywords below.
        num_inference_steps: steps of the run; the curves are resampled to it. Defaults to the
            params' ``default_steps`` (or the calibrated step count).
        n_derivatives: Taylor order; 0 is plain residual reuse (MagCache). Unset: the params'
            ``forecast`` (written by the auto-tuner with its plan), else 1.
        taylor_threshold: largest distance (in steps) from the last computed step at which the
            Taylor forecast is used; further away the last residual is reused. Unset: the params'
            ``forecast``, else 2.
        taylor_form: "taylor" (default) or "newton", the order >= 2 forecast (see the module docstring).
        cache_dtype: "float32" or "model": the dtype the residuals are stored in.
        offload: None or "cpu": keep the residuals in host memory between skipped steps.
        init_step: first step this cache is asked about. Steps before it belong to another model
            (Wan2.2's high-noise expert), so the step counter starts there, and that step always
            computes: no residual is carried across an expert switch.
        params_dir: user directory searched before the shipped params.
        sigmas: the run's noise level at each step. With params that record their calibration
            sigmas, the curves are mapped by noise level (``resample_by_sigma``), so a curve
            measured at one step count and shift serves another.
        resample: "auto" (sigma rule when both sides have sigmas, else index rule), "index" (the
            original product's nearest-index rule) or "sigma" (required; an error if sigmas are missing).
        params: an already loaded ``CacheParams``.
        cond_mag_ratios, uncond_mag_ratios, K, thresh, retention_ratio: explicit params, used
            instead of a params file (all five are needed).
    """

    uses_step_context = True

    def __init__(
        self,
        model_type: str | None = None,
        num_inference_steps: int | None = None,
        n_derivatives: int | None = None,
        taylor_threshold: int | None = None,
        init_step: int = 0,
        params_dir: str | None = None,
        *,
        taylor_form: str = DEFAULT_TAYLOR_FORM,
        cache_dtype: str = "float32",
        offload: str | None = None,
        sigmas: Sequence[float] | None = None,
        resample: str = "auto",
        params: CacheParams | None = None,
        cond_mag_ratios: Sequence[float] | None = None,
        uncond_mag_ratios: Sequence[float] | None = None,
        K: int | None = None,
        thresh: float | None = None,
        retention_ratio: float | None = None,
    ) -> None:
        self.params = self._resolve_params(
            model_type, params_dir, params, cond_mag_ratios, uncond_mag_ratios, K, thresh, retention_ratio
        )
        if num_inference_steps is None:
            num_inference_steps = self.params.default_steps or self.params.num_inference_steps
        _check_order(n_derivatives, taylor_threshold, taylor_form)
        n_derivatives, taylor_threshold = resolve_forecast(self.params, n_derivatives, taylor_threshold)
        _check_storage(cache_dtype, offload)
        self.taylor_form = taylor_form
        self.cache_dtype = cache_dtype
        self.offload = offload
        self.num_inference_steps = num_inference_steps
        self.n_derivatives = n_derivatives
        self.taylor_threshold = taylor_threshold
        self.init_step = init_step
        validate_schedule_settings(
            num_inference_steps, self.params.K, self.params.thresh, self.params.retention_ratio, init_step
        )
        self.resample_rule = self._choose_resample_rule(resample, sigmas, num_inference_steps)
        self._ratios = {
            c: resample_by_sigma(self.params.curve(c), self.params.sigmas, sigmas)
            if self.resample_rule == "sigma"
            else resample_nearest(self.params.curve(c), num_inference_steps)
            for c in (True, False)
        }
        explicit = self.params.compute_steps
        # a tuned placement is only valid for the step count it was tuned at
        self.plan_source = "explicit" if explicit and explicit["num_inference_steps"] == num_inference_steps else "rule"
        self._plans = {
            c: sorted({*explicit[branch_name(c)], init_step})
            if self.plan_source == "explicit"
            else compute_skip_schedule(
                self._ratios[c],
                num_inference_steps,
                self.params.K,
                self.params.thresh,
                self.params.retention_ratio,
                init_step,
            )
            for c in (True, False)
        }
        self._branches: dict[bool, _BranchState] = {}
        self.reset()

    def _choose_resample_rule(self, rule: str, sigmas: Sequence[float] | None, num_steps: int) -> str:
        if rule not in ("auto", "index", "sigma"):
            raise CacheConfigError(f"resample must be 'auto', 'index' or 'sigma', got {rule!r}")
        if sigmas is not None and len(sigmas) != num_steps:
            raise CacheConfigError(
                f"sigmas has {len(sigmas)} entries but the run has num_inference_steps={num_steps}"
            )
        available = sigmas is not None and self.params.sigmas is not None
        if rule == "sigma" and not available:
            missing = "the run's sigmas (sigmas=...)" if sigmas is None else f"calibration sigmas in {self.params.path or 'the params'}"
            raise CacheConfigError(f"resample='sigma' needs {missing}; re-calibrate with a recent ditcache or use 'index'")
        if rule == "auto":
            return "sigma" if available else "index"
        return rule

    @staticmethod
    def _resolve_params(model_type, params_dir, params, cond, uncond, K, thresh, retention) -> CacheParams:
        explicit = {
            "cond_mag_ratios": cond,
            "uncond_mag_ratios": uncond,
            "K": K,
            "thresh": thresh,
            "retention_ratio": retention,
        }
        given = {k: v for k, v in explicit.items() if v is not None}
        sources = sum([model_type is not None, params is not None, bool(given)])
        if sources != 1:
            raise CacheConfigError(
                "AdaTaylorCache needs exactly one source of params: model_type=..., params=CacheParams, "
                f"or the explicit keywords {sorted(explicit)}"
            )
        if params is not None:
            return params
        if model_type is not None:
            return load_params(model_type, params_dir)
        missing = sorted(set(explicit) - set(given))
        if missing:
            raise CacheConfigError(f"explicit AdaTaylorCache params are missing {missing}")
        return params_from_dict(
            {k: list(v) if k.endswith("ratios") else v for k, v in given.items()},
            source="<explicit AdaTaylorCache params>",
        )

    # -- the plan ---------------------------------------------------------------------------------

    def planned_compute_steps(self, is_cond: bool) -> list[int]:
        """Steps (from ``init_step`` on) on which this branch will run the block stack."""
        return [s for s in self._plans[is_cond] if s >= self.init_step]

    def planned_skip_steps(self, is_cond: bool) -> list[int]:
        computed = set(self._plans[is_cond])
        return [s for s in range(self.init_step, self.num_inference_steps) if s not in computed]

    # -- the contract -----------------------------------------------------------------------------

    def reset(self) -> None:
        self._branches = {
            is_cond: _BranchState(
                compute_steps=frozenset(self._plans[is_cond]),
                step=self.init_step - 1,
            )
            for is_cond in (True, False)
        }

    def should_compute(self, ctx: StepArg) -> bool:
        is_cond = branch_of(ctx)
        state = self._branches[bool(is_cond)]
        if state.step + 1 >= self.num_inference_steps:
            raise CacheStateError(
                f"AdaTaylorCache ({branch_name(is_cond)} branch) was asked about step {state.step + 1} but the run "
                f"has {self.num_inference_steps} steps; build the cache with the run's num_inference_steps and "
                "call reset() between requests"
            )
        state.step += 1
        compute = state.step in state.compute_steps
        (state.stats.computed_steps if compute else state.stats.skipped_steps).append(state.step)
        if self.offload is not None:
            self._stage(state, resident=not compute)
        return compute

    def _stage(self, state: _BranchState, resident: bool) -> None:
        """Offload: copy the differences back to the device for a skipped step, drop them for a computed one."""
        if not resident:
            state.resident = None
        elif state.resident is None and state.device is not None:
            state.resident = [d.to(state.device, non_blocking=True) for d in state.differences]

    def _store(self, tensor: torch.Tensor, model_dtype: torch.dtype) -> torch.Tensor:
        """``tensor`` (fp32, on the model's device) as kept between steps: storage dtype, then place."""
        stored = tensor if self.cache_dtype == "float32" else tensor.to(model_dtype)
        if self.offload is None:
            return stored
        host = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=torch.cuda.is_available())
        return host.copy_(stored, non_blocking=True)

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        is_cond = branch_of(ctx)
        state = self._branches[bool(is_cond)]
        if state.step < self.init_step:
            raise CacheStateError("update() called before should_compute() for this request")
        residual = output.detach().float() - ori_input.detach().float()
        differences = [residual]
        newton = self.taylor_form == "newton"
        for i in range(min(self.n_derivatives, len(state.differences))):
            span = state.step - state.support[i if newton else 0]
            previous = state.differences[i].to(residual.device, torch.float32, non_blocking=True)
            differences.append((differences[i] - previous) / span)
        state.differences = [self._store(d, output.dtype) for d in differences]
        state.support = [state.step, *state.support][: self.n_derivatives + 1]
        state.device, state.resident = residual.device, None

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        is_cond = branch_of(ctx)
        state = self._branches[bool(is_cond)]
        if not state.support:
            raise CacheStateError(
                f"approximate() on the {branch_name(is_cond)} branch at step {state.step} with nothing cached: "
                "the first step of a branch must be computed"
            )
        differences = state.differences if state.resident is None else state.resident
        elapsed = state.step - state.support[0]
        if elapsed > self.taylor_threshold or len(differences) == 1:
            state.stats.reuse_approximations += 1
            forecast = differences[0].to(input.device, torch.float32)
        else:
            state.stats.taylor_approximations += 1
            forecast = differences[0].to(input.device, torch.float32, copy=True)
            weight = 1.0
            for order in range(1, len(differences)):
                # Newton: prod_{j<order} (step - t_j); Taylor: elapsed^order / order!
                gap = state.step - state.support[order - 1] if self.taylor_form == "newton" else elapsed / order
                weight *= gap
                forecast.add_(differences[order].to(input.device, torch.float32), alpha=weight)
        return (input.float() + forecast).to(input.dtype)

    # -- telemetry --------------------------------------------------------------------------------

    def current_step(self, is_cond: StepArg) -> int:
        return self._branches[branch_of(is_cond)].step

    def stats(self) -> dict[str, dict]:
        """Per branch that ran: what it did, next to what was planned (they differ only on misuse)."""
        return stats_by_branch(
            self._branches,
            lambda c, s: {
                "planned_compute_steps": self.planned_compute_steps(c),
                "plan_source": self.plan_source,
                "resample_rule": self.resample_rule,
                "device_bytes": self.branch_device_bytes(c),
                "stored_bytes": tensor_bytes(s.differences),
            },
        )

    def release(self) -> None:
        for state in self._branches.values():
            state.differences, state.resident = [], None

    def memory_bytes(self) -> int:
        """Bytes this cache holds on the model's device now (host copies under offload not counted)."""
        return sum(self.branch_device_bytes(c) for c in self._branches)

    def branch_device_bytes(self, is_cond: bool) -> int:
        state = self._branches[is_cond]
        on_device = state.differences if self.offload is None else (state.resident or [])
        return tensor_bytes(on_device)


@register_cache
@dataclass(frozen=True)
class AdaTaylorConfig(CacheConfig):
    """AdaTaylorCache's settings ("ada_taylor"); see :class:`AdaTaylorCache` for each field.

    The params come from ``model_type`` (a shipped or user params file), ``params``, or the five
    explicit curve/settings fields. With none of them, a pipeline fills in its model's
    ``model_type`` (:meth:`for_model`).
    """

    name: ClassVar[str] = "ada_taylor"
    cache_class: ClassVar[type[BaseFeatureCache]] = AdaTaylorCache

    model_type: str | None = None
    n_derivatives: int | None = None  # None: the params' tuned forecast, else 1
    taylor_threshold: int | None = None  # None: the params' tuned forecast, else 2
    taylor_form: str = DEFAULT_TAYLOR_FORM
    cache_dtype: str = "float32"
    offload: str | None = None
    params_dir: str | None = None
    resample: str = "auto"
    params: CacheParams | None = None
    cond_mag_ratios: tuple[float, ...] | None = None
    uncond_mag_ratios: tuple[float, ...] | None = None
    K: int | None = None
    thresh: float | None = None
    retention_ratio: float | None = None

    def __post_init__(self) -> None:
        _check_order(self.n_derivatives, self.taylor_threshold, self.taylor_form)
        _check_storage(self.cache_dtype, self.offload)
        for name in ("cond_mag_ratios", "uncond_mag_ratios"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    def has_params_source(self) -> bool:
        explicit = (self.cond_mag_ratios, self.uncond_mag_ratios, self.K, self.thresh, self.retention_ratio)
        return self.model_type is not None or self.params is not None or any(v is not None for v in explicit)

    def for_model(self, model_type: str | None) -> AdaTaylorConfig:
        if self.has_params_source():
            return self
        if model_type is None:
            raise CacheConfigError(
                "ada_taylor needs model_type= (a params file, see `ditcache list`) or explicit params; "
                "this model directory names no model_type"
            )
        return dataclasses.replace(self, model_type=model_type)
