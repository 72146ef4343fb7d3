"""The magnitude-ratio skip schedule (MagCache's rule), as pure functions.

The schedule depends only on the curve and the settings, so every rank computes the same one
without communication; the runtime still checks the decisions (see ``ditcache.parallel.step_sync``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ditcache.errors import CacheConfigError


def validate_schedule_settings(
    num_steps: int, K: int, thresh: float, retention_ratio: float, init_step: int = 0
) -> None:
    """Raise CacheConfigError for settings no schedule can be built from."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise CacheConfigError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
    if isinstance(K, bool) or not isinstance(K, (int, np.integer)) or K < 0:
        raise CacheConfigError(f"K (max consecutive skips) must be an integer >= 0, got {K!r}")
    if not isinstance(thresh, (int, float)) or not math.isfinite(thresh) or thresh < 0:
        raise CacheConfigError(f"thresh must be a finite number >= 0, got {thresh!r}")
    if not isinstance(retention_ratio, (int, float)) or not 0.0 <= retention_ratio < 1.0:
        raise CacheConfigError(f"retention_ratio must be in [0, 1), got {retention_ratio!r}")
    if isinstance(init_step, bool) or not isinstance(init_step, (int, np.integer)) or not 0 <= init_step < num_steps:
        raise CacheConfigError(
            f"init_step must be an integer in [0, num_inference_steps={num_steps}), got {init_step!r}"
        )


def resample_nearest(curve: Sequence[float], num_steps: int) -> list[float]:
    """Map a curve calibrated at ``len(curve)`` steps to ``num_steps`` by nearest index.

    ``idx = round(arange(N) * (N_cal - 1) / (N - 1))``, the rule of the original product. It ignores
    how the run's sigmas differ from the calibration run's (``resample_by_sigma`` does not).
    """
    if num_steps < 1:
        raise CacheConfigError(f"num_inference_steps must be >= 1, got {num_steps}")
    n_cal = len(curve)
    if n_cal == 0:
        raise CacheConfigError("cannot resample an empty magnitude-ratio curve")
    if num_steps == n_cal:
        return [float(v) for v in curve]
    if num_steps == 1:
        return [float(curve[0])]
    idx = np.round(np.arange(num_steps) * (n_cal - 1) / (num_steps - 1)).astype(int)
    return [float(curve[i]) for i in idx]


def compute_skip_schedule(
    ratios: Sequence[float],
    num_steps: int,
    K: int,
    thresh: float,
    retention_ratio: float,
    init_step: int = 0,
) -> list[int]:
    """Return the sorted step indices on which the block stack must run.

    ``ratios[t]`` is the magnitude ratio of step t to step t-1, already resampled to ``num_steps``.
    Warm-up steps (``step <= int(N * retention_ratio)``), the last step and ``init_step`` always
    compute. Elsewhere the product of ratios since the last computed step estimates how far the
    residual drifted; the step is skipped while the summed drift stays under ``thresh`` and at most
    ``K`` steps were skipped in a row.
    """
    validate_schedule_settings(num_steps, K, thresh, retention_ratio, init_step)
    if len(ratios) != num_steps:
        raise CacheConfigError(
            f"magnitude-ratio curve has {len(ratios)} entries but the run has {num_steps} steps; "
            "resample it first (resample_nearest)"
        )
    start = int(num_steps * retention_ratio)
    compute: list[int] = []
    acc_err, acc_steps, acc_ratio = 0.0, 0, 1.0
    for step in range(num_steps):
        if step <= start or step == num_steps - 1 or step == init_step:
            compute.append(step)
            acc_err, acc_steps, acc_ratio = 0.0, 0, 1.0
            continue
        acc_ratio *= ratios[step]
        acc_steps += 1
        acc_err += abs(1.0 - acc_ratio)
        if acc_err < thresh and acc_steps <= K:
            continue
        compute.append(step)
        acc_err, acc_steps, acc_ratio = 0.0, 0, 1.0
    return compute


def resample_by_sigma(
    curve: Sequence[float], calibration_sigmas: Sequence[float], run_sigmas: Sequence[float]
) -> list[float]:
    """Map a curve onto a run's own noise levels instead of its step indices.

    ``curve[i]`` is the ratio of step i to step i-1 of the calibration run, whose step i was at
    noise level ``calibration_sigmas[i]``. The cumulative log-magnitude ``L(sigma) = sum log gamma``
    is a property of the model at each noise level, not of the step count or shift, so it is
    interpolated (piecewise linear in sigma, extended with the edge slopes) at the run's sigmas and
    each run step gets ``exp(L(sigma_k) - L(sigma_{k-1}))``: the product of the calibrated ratios
    over the sigma interval that step covers. A curve measured at 50 steps / shift 3 thus serves
    20 steps / shift 5 by what the model does at those noise levels.
    """
    n_cal = len(curve)
    if len(calibration_sigmas) != n_cal:
        raise CacheConfigError(
            f"the curve has {n_cal} entries but {len(calibration_sigmas)} calibration sigmas; they must match"
        )
    if not run_sigmas:
        raise CacheConfigError("run_sigmas is empty: pass the sigma of every step of the run")
    sig = np.asarray(calibration_sigmas, dtype=np.float64)
    cum = np.cumsum(np.log(np.asarray(curve, dtype=np.float64)))
    cum -= cum[0]
    if n_cal == 1:
        return [1.0] * len(run_sigmas)
    order = np.argsort(sig)  # sigmas fall during a run; np.interp wants them rising
    sig, cum = sig[order], cum[order]
    if np.any(np.diff(sig) <= 0):
        raise CacheConfigError("calibration sigmas must be strictly monotonic")
    run = np.asarray(run_sigmas, dtype=np.float64)
    level = np.interp(run, sig, cum)
    lo_slope = (cum[1] - cum[0]) / (sig[1] - sig[0])
    hi_slope = (cum[-1] - cum[-2]) / (sig[-1] - sig[-2])
    level = np.where(run < sig[0], cum[0] + (run - sig[0]) * lo_slope, level)
    level = np.where(run > sig[-1], cum[-1] + (run - sig[-1]) * hi_slope, level)
    ratios = np.ones(len(run))
    ratios[1:] = np.exp(np.diff(level))
    return [float(r) for r in ratios]
