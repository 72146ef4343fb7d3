"""One calibration request on the calibration batch: MagCache curve and TeaCache polynomial together.

The request is the public pipeline call with ``cache=`` a :class:`~ditcache.cache.Calibrator`
(shared by both experts, so the curve spans the switch). The calibrator used here also keeps the
TeaCache signal of the step it is deciding (``teacache_signal``: the same tensor the "teacache"
cache decides on), and a forward hook on each adapter pairs it with that call's model output, so
TeaCache's (input change, output change) points come from the same pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ditcache.cache import Calibrator, StepContext, fit_teacache_polynomial
from ditcache.cache.teacache import relative_l1, teacache_signal
from ditcache.params import CacheParams, params_from_dict

from bench.quality.workload import Batch, Workload, generate


@dataclass
class Calibration:
    params: CacheParams  # the curve measured here, with the default schedule settings
    teacache_coefficients: list[float]
    teacache_points: int
    result: dict
    seconds: float


class SignalCalibrator(Calibrator):
    """A Calibrator that also holds the TeaCache signal of the decision it is making."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.current: tuple[tuple[str, bool], torch.Tensor] | None = None

    def should_compute(self, ctx: StepContext) -> bool:  # a Calibrator is always given the step context
        self.current = (ctx.expert, ctx.is_cond), teacache_signal(ctx).detach().clone()
        return super().should_compute(ctx)


class TeaCachePoints:
    """Relative L1 changes of the signal and of the model output between consecutive steps of one
    expert and branch (no pair across an expert switch)."""

    def __init__(self, calibrator: SignalCalibrator) -> None:
        self.calibrator = calibrator
        self.x: list[float] = []
        self.y: list[float] = []
        self.previous: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}

    def observe(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        """Forward hook of an adapter: ``output`` is this call's prediction."""
        assert self.calibrator.current is not None, "the adapter ran without asking its cache"
        key, signal = self.calibrator.current
        output = output.detach().float()
        if key in self.previous:
            previous_signal, previous_output = self.previous[key]
            self.x.append(relative_l1(signal, previous_signal))
            self.y.append(relative_l1(output, previous_output))
        self.previous[key] = (signal, output)


def calibrate(work: Workload, batch: Batch) -> Calibration:
    """Calibrate on ``batch`` (a seed other than the evaluation's) in one pipeline request."""
    start = time.perf_counter()
    calibrator = SignalCalibrator(work.steps, sigma_shift=work.shift, model_name=work.model_type, sigmas=work.sigmas)
    points = TeaCachePoints(calibrator)
    handles = [adapter.register_forward_hook(points.observe) for adapter in work.pipeline.adapters.values()]
    try:
        generate(work.pipeline, work, batch, calibrator)
    finally:
        for handle in handles:
            handle.remove()
    result = calibrator.result()
    params = params_from_dict(result, source=f"<calibration of {work.model_type}>")
    coefficients = fit_teacache_polynomial(points.x, points.y)
    return Calibration(params, coefficients, len(points.x), result, time.perf_counter() - start)
