"""Calibrator: a cache that always computes and measures the magnitude-ratio curve.

gamma_t = mean over batch and tokens of ||r_t|| / ||r_{t-1}|| (norms over channels), gamma_0 = 1.
The mean is kept as a float64 sum and an integer count per (branch, step), so statistics from
sequence shards, prompts, data-parallel replicas and nodes merge exactly: add sums, add counts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from ditcache import __version__
from ditcache.cache.base import BaseFeatureCache, BranchStats, tensor_bytes
from ditcache.cache.context import StepArg, branch_name, branch_of
from ditcache.cache.registry import CacheConfig, register_cache
from ditcache.errors import CacheConfigError, CacheStateError
from ditcache.params.loader import sanitize_model_name
from ditcache.params.userdir import default_user_params_dir
from ditcache.params.writer import write_params

BRANCHES = (True, False)  # cond, uncond: the row order of the packed statistics


def default_K(num_steps: int) -> int:
    """Starting K for a fresh calibration: about one skip run per tenth of the schedule, at most 4."""
    return min(4, max(1, num_steps // 10))


@dataclass
class CalibrationStats:
    """Sums and counts of per-token magnitude ratios, per branch and step (mergeable exactly)."""

    num_steps: int
    sums: np.ndarray | None = None  # [2, N] float64, rows cond/uncond
    counts: np.ndarray | None = None  # [2, N] int64
    requests: np.ndarray | None = None  # [2] int64: completed requests per branch

    def __post_init__(self) -> None:
        if self.sums is None:
            self.sums = np.zeros((2, self.num_steps), dtype=np.float64)
        if self.counts is None:
            self.counts = np.zeros((2, self.num_steps), dtype=np.int64)
        if self.requests is None:
            self.requests = np.zeros(2, dtype=np.int64)

    def merge(self, other: "CalibrationStats") -> "CalibrationStats":
        if other.num_steps != self.num_steps:
            raise CacheConfigError(
                f"cannot merge calibration statistics of {self.num_steps} and {other.num_steps} steps"
            )
        return CalibrationStats(
            self.num_steps, self.sums + other.sums, self.counts + other.counts, self.requests + other.requests
        )

    def to_tensor(self) -> torch.Tensor:
        """Pack into one float64 tensor [2, 2N+1] for a single all-reduce (counts stay exact below 2**53)."""
        return torch.from_numpy(
            np.concatenate([self.sums, self.counts.astype(np.float64), self.requests[:, None].astype(np.float64)], 1)
        )

    @classmethod
    def from_tensor(cls, packed: torch.Tensor, num_steps: int) -> "CalibrationStats":
        arr = packed.detach().cpu().to(torch.float64).numpy()
        return cls(
            num_steps,
            arr[:, :num_steps].copy(),
            np.rint(arr[:, num_steps : 2 * num_steps]).astype(np.int64),
            np.rint(arr[:, 2 * num_steps]).astype(np.int64),
        )

    def has_branch(self, is_cond: bool) -> bool:
        return bool(self.counts[BRANCHES.index(is_cond), 1:].any()) or (
            self.num_steps == 1 and bool(self.requests[BRANCHES.index(is_cond)])
        )

    def curve(self, is_cond: bool) -> list[float]:
        """gamma per step for one branch; raises if some step was never measured."""
        row = BRANCHES.index(is_cond)
        counts = self.counts[row]
        missing = [t for t in range(1, self.num_steps) if counts[t] == 0]
        if missing:
            raise CacheStateError(
                f"calibration of the {branch_name(is_cond)} branch has no data for steps {missing[:8]}"
                f"{'...' if len(missing) > 8 else ''}: run every step of at least one request"
            )
        ratios = np.ones(self.num_steps, dtype=np.float64)
        ratios[1:] = self.sums[row, 1:] / counts[1:]
        return [float(v) for v in ratios]


class Calibrator(BaseFeatureCache):
    """Measures the magnitude-ratio curve of a model; never skips.

    ``reset()`` starts a new request (step counters and the previous residual) but keeps the
    accumulated statistics, so one calibrator averages over several prompts; ``clear()`` drops them.
    Sequence-parallel ranks each see a shard of the tokens: merge their ``stats_tensor()`` with a sum
    all-reduce (see ``ditcache.parallel``) before ``write()``.
    """

    uses_step_context = True
    spans_experts = True  # it measures a whole run, across an expert switch

    def __init__(
        self,
        num_inference_steps: int,
        sigma_shift: float | None = None,
        model_name: str = "custom",
        output_path: str | os.PathLike | None = None,
        *,
        K: int | None = None,
        thresh: float = 0.12,
        retention_ratio: float = 0.2,
        sigmas: Sequence[float] | None = None,
        params_dir: str | os.PathLike | None = None,
    ) -> None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise CacheConfigError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if sigma_shift is not None and not (isinstance(sigma_shift, (int, float)) and sigma_shift > 0):
            raise CacheConfigError(f"sigma_shift must be a positive number, got {sigma_shift!r}")
        self.num_inference_steps = num_inference_steps
        self.sigma_shift = sigma_shift
        self.model_name = model_name
        self.output_path = Path(output_path) if output_path else None
        self.params_dir = Path(params_dir) if params_dir else default_user_params_dir()
        self.K = default_K(num_inference_steps) if K is None else K
        self.thresh = thresh
        self.retention_ratio = retention_ratio
        self.sigmas = None if sigmas is None else [float(s) for s in sigmas]
        self.statistics = CalibrationStats(num_inference_steps)
        self._step: dict[bool, int] = {}
        self._prev: dict[bool, torch.Tensor] = {}
        self._stats: dict[bool, BranchStats] = {}

    # -- the contract -----------------------------------------------------------------------------

    def should_compute(self, ctx: StepArg) -> bool:
        is_cond = branch_of(ctx)
        step = self._step.get(is_cond, -1) + 1
        if step >= self.num_inference_steps:
            raise CacheStateError(
                f"Calibrator ({branch_name(is_cond)} branch) asked about step {step} of a "
                f"{self.num_inference_steps}-step run; call reset() between requests"
            )
        self._step[is_cond] = step
        self._stats.setdefault(is_cond, BranchStats()).computed_steps.append(step)
        return True

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        is_cond = branch_of(ctx)
        step = self._step.get(is_cond, -1)
        if step < 0:
            raise CacheStateError("Calibrator.update() called before should_compute() for this request")
        residual = output.detach().float() - ori_input.detach().float()
        prev = self._prev.get(is_cond)
        if prev is not None:
            ratio = residual.norm(dim=-1) / prev.norm(dim=-1)
            row = BRANCHES.index(is_cond)
            self.statistics.sums[row, step] += float(ratio.double().sum())
            self.statistics.counts[row, step] += ratio.numel()
        self._prev[is_cond] = residual
        if step == self.num_inference_steps - 1:
            self.statistics.requests[BRANCHES.index(is_cond)] += 1

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        raise CacheStateError("the Calibrator computes every step; approximate() must not be called")

    def reset(self) -> None:
        self._step.clear()
        self._prev.clear()
        self._stats.clear()

    def clear(self) -> None:
        """Drop the accumulated statistics too."""
        self.reset()
        self.statistics = CalibrationStats(self.num_inference_steps)

    def current_step(self, is_cond: StepArg) -> int:
        return self._step.get(branch_of(is_cond), -1)

    def stats(self) -> dict[str, dict]:
        return {branch_name(c): s.as_dict() for c, s in sorted(self._stats.items(), reverse=True)}

    def memory_bytes(self) -> int:
        return tensor_bytes(self._prev.values())

    def observe_sigmas(self, sigmas: Sequence[float]) -> None:
        """Record the run's noise level per step (the pipeline calls this), so the written curve can
        be resampled by sigma; every request pooled into one curve must share them."""
        values = [float(s) for s in sigmas]
        if len(values) != self.num_inference_steps:
            raise CacheConfigError(f"{len(values)} sigmas for a {self.num_inference_steps}-step calibration")
        if self.sigmas is None:
            self.sigmas = values
        elif max(abs(a - b) for a, b in zip(self.sigmas, values)) > 1e-6:
            raise CacheConfigError(
                "this calibration pools requests with different sigma schedules (another shift?); "
                "one curve must come from one schedule: use a new Calibrator per shift"
            )

    # -- merging and output -----------------------------------------------------------------------

    def merge(self, other: "Calibrator") -> None:
        """Add another calibrator's statistics (another shard, prompt set, replica or node)."""
        self.statistics = self.statistics.merge(other.statistics)

    def stats_tensor(self) -> torch.Tensor:
        return self.statistics.to_tensor()

    def load_stats_tensor(self, packed: torch.Tensor) -> None:
        self.statistics = CalibrationStats.from_tensor(packed, self.num_inference_steps)

    def result(self) -> dict[str, Any]:
        """The params-file content for the statistics gathered so far."""
        has = {c: self.statistics.has_branch(c) for c in BRANCHES}
        if not any(has.values()):
            raise CacheStateError("the Calibrator has no data: run at least one full request through it")
        provenance: dict[str, Any] = {
            "source": "ditcache Calibrator",
            "ditcache_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "requests": {branch_name(c): int(self.statistics.requests[BRANCHES.index(c)]) for c in BRANCHES},
            "tokens_per_step": {branch_name(c): int(self.statistics.counts[BRANCHES.index(c), -1]) for c in BRANCHES},
            "proxy": False,
        }
        curves = {c: self.statistics.curve(c) for c in BRANCHES if has[c]}
        for c in BRANCHES:
            if not has[c]:
                other = not c
                curves[c] = curves[other]
                provenance[f"{branch_name(c)}_from"] = (
                    f"{branch_name(other)} curve: no {branch_name(c)} pass ran during calibration (guidance off)"
                )
        data: dict[str, Any] = {
            "model_type": self.model_name,
            "K": self.K,
            "retention_ratio": self.retention_ratio,
            "thresh": self.thresh,
            "sigma_shift": self.sigma_shift,
            "num_inference_steps": self.num_inference_steps,
            "default_steps": self.num_inference_steps,
            "cond_mag_ratios": curves[True],
            "uncond_mag_ratios": curves[False],
        }
        if self.sigmas is not None:
            data["sigmas"] = self.sigmas
        data["provenance"] = provenance
        return data

    def default_output_path(self) -> Path:
        return self.params_dir / f"{sanitize_model_name(self.model_name)}.json"

    def write(self, path: str | os.PathLike | None = None, *, overwrite_shipped: bool = False) -> Path:
        """Write the params file atomically (see ``write_params``) and return its path."""
        target = Path(path) if path else (self.output_path or self.default_output_path())
        return write_params(self.result(), target, overwrite_shipped=overwrite_shipped)


@register_cache
@dataclass(frozen=True)
class CalibratorConfig(CacheConfig):
    """The calibrator's settings ("calibrator"); see :class:`Calibrator`. To pool several requests
    into one curve, build it once and pass the built :class:`Calibrator` to each request."""

    name: ClassVar[str] = "calibrator"
    cache_class: ClassVar[type[BaseFeatureCache]] = Calibrator

    sigma_shift: float | None = None
    model_name: str = "custom"
    output_path: str | None = None
    K: int | None = None
    thresh: float = 0.12
    retention_ratio: float = 0.2
    params_dir: str | None = None
