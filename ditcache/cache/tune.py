"""Auto-tuning: choose a skip plan for a target speedup (or an error budget) from recorded residuals.

A calibration run records each step's block-stack residual (``ResidualRecorder``). A candidate plan
is judged offline by replaying it through a real ``AdaTaylorCache``: on its skipped steps the
forecast is compared with the residual the model actually produced. The error of step t enters the
sample through the scheduler's update, to first order the Euler step scaled by the step's sigma
interval (the pipelines run diffusers' schedulers: FlowMatchEuler is exactly that, Wan's UniPC adds
higher-order corrections to it, so the weight stays a fair error weight), and the CFG combine scales
the cond branch by g and the uncond branch by g - 1, so the predicted error of a plan is

    sum_t |sigma_{t+1} - sigma_t| * (g * e_cond(t) + (g - 1) * e_uncond(t)),

e = RMS of forecast - residual. Three families of candidates are searched: the threshold rule over a
grid of (thresh, K, retention_ratio) on the calibrated curve; TaylorSeer's uniform-interval plans
(a warm-up, then one computed step in every ``interval``; :func:`interval_candidates`), so a tuned
plan never predicts a larger error than the best fixed-interval plan of the same budget; and a
direct placement of the computed steps (greedy: drop the step whose loss hurts least, until the
budget is met, then a local search that moves single computed steps), one plan for both branches,
because where the computed steps fall matters more than how many there are.

A replayer judges every plan with one forecast (n_derivatives, taylor_threshold); a tuned result
records it, and so does the params file written from it (``forecast``), because a plan chosen for
one forecast is not the best plan for another. :func:`tune_forecasts` tunes once per forecast of a
grid; which of those plans is best once errors compound over a whole run is for a real run to say
(``ditcache calibrate`` runs them).

A run whose model changes mid-run (a Wan2.2 expert switch) builds a fresh cache at each
``segment_starts`` step: the replay does the same, and every candidate computes those steps.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch

from ditcache.cache.ada_taylor import DEFAULT_FORECAST, DEFAULT_TAYLOR_FORM, AdaTaylorCache
from ditcache.cache.fixed_interval import fixed_interval_plan
from ditcache.cache.schedule import compute_skip_schedule, resample_by_sigma, resample_nearest
from ditcache.errors import CacheConfigError
from ditcache.params import CacheParams

THRESH_GRID = tuple(round(0.005 * 1.25**i, 5) for i in range(30))  # 0.005 .. ~3.2
K_GRID = (1, 2, 3, 4, 5, 6, 8)
RETENTION_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
INTERVAL_GRID = (2, 3, 4, 5, 6, 7, 8, 10, 12)
WARMUP_GRID = (1, 2, 3, 4, 5, 6, 8)


# (n_derivatives, taylor_threshold) a tuned plan may be judged with. A taylor_threshold of 6 lets the
# forecast reach across the long gaps of low budgets (4 computed steps of 20 leave gaps of 4-11).
# Order 0 (reuse the last residual; taylor_threshold plays no part) is there for the tail of such
# plans: after an expert switch only two computed steps far apart are left to extrapolate from.
FORECAST_GRID = ((0, 2), (1, 2), (1, 3), (1, 6), (2, 2), (2, 3), (2, 6))


class TargetUnreachableError(CacheConfigError):
    """No plan meets the requested speedup or error budget; nothing should be written."""


@dataclass
class Candidate:
    """One plan with its predicted cost and error."""

    method: str  # "rule", "interval" or "placement"
    compute_steps: dict[bool, list[int]]
    predicted_error: float
    settings: dict = field(default_factory=dict)

    def passes(self, branches: Sequence[bool]) -> int:
        return sum(len(self.compute_steps[c]) for c in branches)


@dataclass
class TuneResult:
    chosen: Candidate
    predicted_speedup: float
    baseline_error: float  # error scale: the same weights applied to the residuals themselves
    candidates_evaluated: int
    forecast: dict[str, int] | None = None  # {"n_derivatives", "taylor_threshold"} the plan was judged with


def fixed_steps(num_steps: int, segment_starts: Iterable[int] = ()) -> set[int]:
    """Steps every placement computes: the first (nothing to forecast from before it) and each
    segment's first (an expert switch builds a fresh cache). The last step is free: its error enters
    the sample scaled by the last sigma, the smallest interval of the run, so at a low budget its
    compute is often worth more earlier (the replay weighs that like any other step)."""
    return {0, *(s for s in segment_starts if 0 <= s < num_steps)}


class PlanReplayer:
    """Predicts the sample error of a plan from recorded residual trajectories."""

    def __init__(
        self,
        trajectories: dict[bool, list[torch.Tensor]],
        sigmas: Sequence[float],
        guidance_scale: float,
        n_derivatives: int = 1,
        taylor_threshold: int = 2,
        *,
        taylor_form: str = DEFAULT_TAYLOR_FORM,
        segment_starts: Sequence[int] = (),
    ) -> None:
        self.branches = [c for c in (True, False) if trajectories.get(c)]
        if not self.branches:
            raise CacheConfigError("no recorded trajectories: run at least one request through a ResidualRecorder")
        lengths = {t.shape[0] for c in self.branches for t in trajectories[c]}
        if len(lengths) != 1:
            raise CacheConfigError(f"recorded trajectories have different step counts: {sorted(lengths)}")
        self.num_steps = lengths.pop()
        if len(sigmas) != self.num_steps:
            raise CacheConfigError(f"{len(sigmas)} sigmas for {self.num_steps} recorded steps")
        self.trajectories = trajectories
        next_sigmas = [*sigmas[1:], 0.0]
        self.step_weight = [abs(a - b) for a, b in zip(sigmas, next_sigmas)]
        uncond_weight = max(guidance_scale - 1.0, 0.0)
        self.branch_weight = {True: guidance_scale if False in self.branches else 1.0, False: uncond_weight}
        self.n_derivatives = n_derivatives
        self.taylor_threshold = taylor_threshold
        self.taylor_form = taylor_form
        # steps where the run builds a fresh cache (an expert switch); step 0 always is one
        self.segment_starts = sorted({0, *(int(s) for s in segment_starts if 0 <= int(s) < self.num_steps)})
        self.evaluations = 0
        self._memo: dict[tuple, list[float]] = {}

    @property
    def forecast(self) -> dict[str, int]:
        """The forecast every plan is replayed with, as a params file records it."""
        return {"n_derivatives": self.n_derivatives, "taylor_threshold": self.taylor_threshold}

    @property
    def fixed_steps(self) -> set[int]:
        """Steps every placement computes (:func:`fixed_steps`)."""
        return fixed_steps(self.num_steps, self.segment_starts)

    @property
    def least_budget(self) -> int:
        """The fewest computed steps per branch a plan may have: the fixed steps, and at least a
        second step to extrapolate from."""
        return max(2, len(self.fixed_steps))

    def with_plan(self, plan: Sequence[int]) -> list[int]:
        """``plan`` with every segment's first step added (the run computes them whatever the plan)."""
        return sorted({*plan, *self.segment_starts})

    def segment_of(self, step: int) -> tuple[int, int]:
        """(first step, end) of the segment holding ``step``."""
        start = max(s for s in self.segment_starts if s <= step)
        ends = [s for s in self.segment_starts if s > step]
        return start, (ends[0] if ends else self.num_steps)

    def branch_error(self, is_cond: bool, compute_steps: list[int]) -> float:
        """Weighted forecast error of one branch's plan, averaged over the recorded requests.

        A forecast at a skipped step depends only on the step and on the last ``n_derivatives + 1``
        computed steps of its segment (each difference is built from the one before it), so every
        run of skipped steps is replayed once per (request, those computed steps, next compute) and
        remembered: a search that moves one computed step re-replays only the two runs around it.
        The per-step errors are summed in step order, as a whole-run replay would sum them."""
        planned = sorted(set(compute_steps) | set(self.segment_starts))
        runs = []  # (the computed steps a run of skipped steps is forecast from, the next computed step)
        for start in self.segment_starts:
            _, end = self.segment_of(start)
            computed = [s for s in planned if start <= s < end]
            for i, step in enumerate(computed):
                following = computed[i + 1] if i + 1 < len(computed) else end
                if following > step + 1:
                    runs.append((tuple(computed[max(0, i - self.n_derivatives) : i + 1]), following))
        total = 0.0
        for request in range(len(self.trajectories[is_cond])):
            for support, following in runs:
                for value in self._skipped_errors(is_cond, request, support, following):
                    total += value
        self.evaluations += 1
        return total / len(self.trajectories[is_cond])

    def _skipped_errors(self, is_cond: bool, request: int, support: tuple[int, ...], end: int) -> list[float]:
        """The weighted error of each step from ``support[-1] + 1`` to ``end - 1``, forecast by a real
        ``AdaTaylorCache`` that computed the ``support`` steps (remembered per replayer)."""
        key = (is_cond, request, support, end)
        if key not in self._memo:
            traj = self.trajectories[is_cond][request]
            zero = torch.zeros_like(traj[0])
            flat = [1.0] * self.num_steps
            # its own plan is overridden: the replay decides which steps compute
            cache = AdaTaylorCache(
                cond_mag_ratios=flat, uncond_mag_ratios=flat, K=0, thresh=0.0, retention_ratio=0.0,
                num_inference_steps=self.num_steps, n_derivatives=self.n_derivatives,
                taylor_threshold=self.taylor_threshold, taylor_form=self.taylor_form, init_step=support[0],
            )  # fmt: skip
            errors = []
            for step in range(support[0], end):
                cache.should_compute(is_cond)
                if step in support:
                    cache.update(traj[step], zero, is_cond)
                elif step > support[-1]:
                    err = cache.approximate(zero, is_cond) - traj[step]
                    errors.append(self.step_weight[step] * float(err.pow(2).mean().sqrt()))
            self._memo[key] = errors
        return self._memo[key]

    def error(self, plan: dict[bool, list[int]]) -> float:
        return sum(self.branch_weight[c] * self.branch_error(c, plan[c]) for c in self.branches)

    def signal_scale(self) -> float:
        """The same weighting applied to the residuals themselves: what 'skip everything' would cost."""
        return sum(
            self.branch_weight[c]
            * sum(
                sum(w * float(t[s].pow(2).mean().sqrt()) for s, w in enumerate(self.step_weight))
                for t in self.trajectories[c]
            )
            / len(self.trajectories[c])
            for c in self.branches
        )


def rule_candidates(
    replayer: PlanReplayer, params: CacheParams, budget: int, tolerance: float, sigmas: Sequence[float] | None
) -> list[Candidate]:
    """Threshold-rule plans with between ``budget * (1 - tolerance)`` and ``budget`` computes per branch.

    Never more than the budget: a plan that buys its quality with extra computes would miss the
    speedup it was asked for, and would not be comparable with the placement candidate."""
    n = replayer.num_steps
    curves = {}
    for c in (True, False):
        if sigmas is not None and params.sigmas is not None:
            curves[c] = resample_by_sigma(params.curve(c), params.sigmas, sigmas)
        else:
            curves[c] = resample_nearest(params.curve(c), n)
    seen: dict[tuple, Candidate] = {}
    for thresh, K, retention in itertools.product(THRESH_GRID, K_GRID, RETENTION_GRID):
        plan = {c: replayer.with_plan(compute_skip_schedule(curves[c], n, K, thresh, retention)) for c in (True, False)}
        counts = [len(plan[c]) for c in replayer.branches]
        if any(k > budget or k < budget * (1 - tolerance) for k in counts):
            continue
        key = tuple(tuple(plan[c]) for c in (True, False))
        if key not in seen:
            seen[key] = Candidate("rule", plan, math.nan, {"thresh": thresh, "K": K, "retention_ratio": retention})
    for cand in seen.values():
        cand.predicted_error = replayer.error(cand.compute_steps)
    return list(seen.values())


def thresh_for_budget(
    curve: Sequence[float], num_steps: int, budget: int, K: int, retention_ratio: float
) -> float:
    """The hand rule's knob: the thresh whose plan computes closest to ``budget`` steps (the smallest
    such thresh), for a curve already resampled to ``num_steps``."""
    grid = [round(0.005 * 1.1**i, 5) for i in range(80)]  # 0.005 .. ~9.7
    return min(grid, key=lambda t: (abs(len(compute_skip_schedule(curve, num_steps, K, t, retention_ratio)) - budget), t))


def interval_plan(replayer: PlanReplayer, interval: int, warmup: int, last_step: bool = False) -> list[int]:
    """TaylorSeer's uniform-interval plan, restarted (warm-up included) in every segment, as the
    ``taylorseer_interval`` cache does per expert; ``last_step``: with the run's last step added."""
    plan: list[int] = []
    for start in replayer.segment_starts:
        _, end = replayer.segment_of(start)
        plan += [s for s in fixed_interval_plan(end, interval, warmup, start) if s < end]
    if last_step:
        plan.append(replayer.num_steps - 1)
    return sorted(set(plan))


def interval_candidates(replayer: PlanReplayer, budget: int, tolerance: float) -> list[Candidate]:
    """Uniform-interval plans (interval x warm-up grids, each as it is and with the last step added)
    with between ``budget * (1 - tolerance)`` and ``budget`` computes per branch: the plans
    TaylorSeer's fixed schedule can make, and the same plans ending on a computed step."""
    seen: dict[tuple, Candidate] = {}
    for interval, warmup, last in itertools.product(INTERVAL_GRID, WARMUP_GRID, (False, True)):
        steps = interval_plan(replayer, interval, warmup, last)
        if not budget * (1 - tolerance) <= len(steps) <= budget or tuple(steps) in seen:
            continue
        seen[tuple(steps)] = Candidate(
            "interval", {True: steps, False: list(steps)}, math.nan,
            {"interval": interval, "warmup": warmup, "last_step": last},
        )
    for cand in seen.values():
        cand.predicted_error = replayer.error(cand.compute_steps)
    return list(seen.values())


def placement_candidates(replayer: PlanReplayer, budgets: Sequence[int]) -> dict[int, Candidate]:
    """Greedy placement for several budgets in one pass: from computing everything, drop the step whose
    removal costs least; the plan is recorded as it passes each budget, then polished by
    :func:`local_search`.

    One plan serves both branches, judged on their weighted sum: a step where one branch computes and
    the other is forecast mixes a fresh branch with a stale one in the CFG combine (g * cond -
    (g - 1) * uncond amplifies their mismatch), which the per-branch replay cannot see; measured on
    the reference model at 20 steps / 4 computes, such split plans lost 5 to 15 dB PSNR."""
    n = replayer.num_steps
    fixed = replayer.fixed_steps
    wanted = sorted({max(b, len(fixed)) for b in budgets}, reverse=True)
    plans: dict[int, list[int]] = {}

    def joint(plan: list[int]) -> float:
        return replayer.error({c: plan for c in replayer.branches})

    current = list(range(n))
    for budget in wanted:
        while len(current) > budget:
            best_step, best_err = None, math.inf
            for step in current:
                if step in fixed:
                    continue
                err = joint([s for s in current if s != step])
                if err < best_err:
                    best_step, best_err = step, err
            if best_step is None:
                break
            current.remove(best_step)
        plans[budget] = local_search(joint, n, current, fixed)
    out = {}
    for budget in budgets:
        steps = plans[max(budget, len(fixed))]
        plan = {True: list(steps), False: list(steps)}
        out[budget] = Candidate("placement", plan, replayer.error(plan), {})
    return out


def local_search(
    error: Callable[[list[int]], float], num_steps: int, plan: Sequence[int], fixed: set[int],
    reach: int = 2, rounds: int = 8,
) -> list[int]:
    """Polish a greedy placement: move one computed step (not a fixed one) up to ``reach`` steps
    either way while that lowers ``error(plan)``. Greedy removal commits early to steps a later
    removal leaves badly placed; the moves keep the count, so the plan keeps its budget."""
    current = sorted(plan)
    best_err = error(current)
    for _ in range(rounds):
        improved = False
        for step in list(current):
            if step in fixed or step not in current:
                continue
            for delta in (d for r in range(1, reach + 1) for d in (-r, r)):
                moved = step + delta
                if not 0 < moved < num_steps or moved in current:
                    continue
                trial = sorted([s for s in current if s != step] + [moved])
                err = error(trial)
                if err < best_err - 1e-12:
                    current, best_err, improved = trial, err, True
                    break
        if not improved:
            break
    return current


def placement_candidate(replayer: PlanReplayer, budget: int) -> Candidate:
    """Greedy placement: from computing everything, drop the step whose removal costs least."""
    return placement_candidates(replayer, [budget])[budget]


def budget_candidates(
    replayer: PlanReplayer,
    params: CacheParams,
    budget: int,
    tolerance: float,
    sigmas: Sequence[float] | None,
    intervals: bool,
    placement: Candidate | None,
) -> list[Candidate]:
    """Every candidate plan with about ``budget`` computes per branch: the threshold rule's, the
    uniform-interval ones (``intervals``) and a placement (when given)."""
    cands = rule_candidates(replayer, params, budget, tolerance, sigmas)
    if intervals:
        cands += interval_candidates(replayer, budget, tolerance)
    if placement is not None:
        cands.append(placement)
    return cands


def tune(
    replayer: PlanReplayer,
    params: CacheParams,
    *,
    target_speedup: float | None = None,
    max_error: float | None = None,
    tolerance: float = 0.1,
    sigmas: Sequence[float] | None = None,
    place_steps: bool = True,
    intervals: bool = True,
) -> TuneResult:
    """Choose the plan with the least predicted error at the target speedup (or the fastest within
    ``max_error``, a fraction of the signal scale). Raises TargetUnreachableError, never a bad plan."""
    if (target_speedup is None) == (max_error is None):
        raise CacheConfigError("give exactly one of target_speedup or max_error")
    n = replayer.num_steps
    scale = replayer.signal_scale()
    if target_speedup is not None:
        if target_speedup < 1:
            raise CacheConfigError(f"target_speedup must be >= 1, got {target_speedup}")
        budget = max(1, round(n / target_speedup))
        least = replayer.least_budget
        if budget < least and n > 1:
            raise TargetUnreachableError(
                f"a {target_speedup}x speedup of a {n}-step run leaves {budget} computed step(s) per branch; "
                f"a forecast needs at least {least} (the first step, a second to extrapolate from, each "
                f"expert's first), so at most {n / least:.2f}x is possible here (few-step models gain little from caching)"
            )
        budgets = [budget]
    else:
        budgets = list(range(n - 1, 1, -1))
    evaluated = 0
    best_ok: Candidate | None = None
    for budget in budgets:
        placement = placement_candidate(replayer, budget) if place_steps else None
        cands = budget_candidates(replayer, params, budget, tolerance, sigmas, intervals, placement)
        evaluated += len(cands)
        if not cands:
            continue
        best = min(cands, key=lambda c: c.predicted_error)
        if target_speedup is not None:
            best_ok = best
            break
        if best.predicted_error <= max_error * scale:
            best_ok = best
        else:
            break
    if best_ok is None:
        what = f"{target_speedup}x" if target_speedup is not None else f"an error within {max_error} of the signal"
        raise TargetUnreachableError(
            f"no plan reaches {what} for this {n}-step model: caching cannot help at this setting"
        )
    passes = best_ok.passes(replayer.branches)
    return TuneResult(best_ok, n * len(replayer.branches) / passes, scale, evaluated, replayer.forecast)


def forecast_candidates(n_derivatives: int | None, taylor_threshold: int | None) -> list[tuple[int, int]]:
    """The forecasts to tune for: those of :data:`FORECAST_GRID` that match what is given (None: any);
    a given pair outside the grid is the only candidate (an unset half takes the seed's default)."""
    matching = [
        (n, t) for n, t in FORECAST_GRID
        if n_derivatives in (None, n) and taylor_threshold in (None, t)
    ]  # fmt: skip
    given = (n_derivatives, taylor_threshold)
    default = (DEFAULT_FORECAST["n_derivatives"], DEFAULT_FORECAST["taylor_threshold"])
    return matching or [tuple(d if g is None else g for g, d in zip(given, default))]


def tune_forecasts(
    replayer_for: Callable[[int, int], PlanReplayer],
    params: CacheParams,
    forecasts: Sequence[tuple[int, int]],
    **target: Any,
) -> list[TuneResult]:
    """:func:`tune` once per forecast (``replayer_for(n_derivatives, taylor_threshold)``), the forecasts
    that reach the target; TargetUnreachableError only when none does."""
    results, unreachable = [], None
    for n, t in forecasts:
        try:
            results.append(tune(replayer_for(n, t), params, **target))
        except TargetUnreachableError as exc:
            unreachable = exc
    if not results:
        assert unreachable is not None
        raise unreachable
    return results


def tune_budgets(
    replayer: PlanReplayer,
    params: CacheParams,
    budgets: Sequence[int],
    *,
    tolerance: float = 0.1,
    sigmas: Sequence[float] | None = None,
    place_steps: bool = True,
    intervals: bool = True,
) -> dict[int, TuneResult]:
    """:func:`tune` at several budgets (computed steps per branch) at once, sharing one greedy pass.

    Budgets below what the run must compute (the first step and one more, each segment's first) are dropped."""
    n = replayer.num_steps
    budgets = sorted({int(b) for b in budgets if replayer.least_budget <= b < n}, reverse=True)
    placed = placement_candidates(replayer, budgets) if place_steps and budgets else {}
    scale = replayer.signal_scale()
    out = {}
    for budget in budgets:
        cands = budget_candidates(replayer, params, budget, tolerance, sigmas, intervals, placed.get(budget))
        best = min(cands, key=lambda c: c.predicted_error)
        passes = best.passes(replayer.branches)
        out[budget] = TuneResult(best, n * len(replayer.branches) / passes, scale, len(cands), replayer.forecast)
    return out


def tuned_params(params: CacheParams, result: TuneResult, num_steps: int, target: dict) -> dict:
    """A params-file mapping: the calibrated curves plus the chosen settings (and placement)."""
    chosen = result.chosen
    data = {
        "model_type": params.model_type,
        "K": chosen.settings.get("K", params.K),
        "retention_ratio": chosen.settings.get("retention_ratio", params.retention_ratio),
        "thresh": chosen.settings.get("thresh", params.thresh),
        "sigma_shift": params.sigma_shift,
        "num_inference_steps": params.num_inference_steps,
        "default_steps": num_steps,
        "cond_mag_ratios": list(params.cond_mag_ratios),
        "uncond_mag_ratios": list(params.uncond_mag_ratios),
    }
    if params.sigmas is not None:
        data["sigmas"] = list(params.sigmas)
    if result.forecast is not None:  # a cache on these params forecasts as the plan was judged
        data["forecast"] = dict(result.forecast)
    # the steps the tuner replayed, run as they are at this step count (a rule winner's settings
    # above serve other step counts)
    data["compute_steps"] = {
        "num_inference_steps": num_steps,
        "cond": chosen.compute_steps[True],
        "uncond": chosen.compute_steps[False],
    }
    data["provenance"] = {
        **params.provenance,
        "tuned": {
            **target,
            "method": chosen.method,
            "predicted_speedup": round(result.predicted_speedup, 4),
            "predicted_error": chosen.predicted_error,
            "error_scale": result.baseline_error,
            "candidates_evaluated": result.candidates_evaluated,
            "num_inference_steps": num_steps,
        },
    }
    return data
