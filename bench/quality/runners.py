"""The methods and their grids: every setting is a public pipeline call per sample with one ``cache=``.

A :class:`MethodRun` is one method at one setting: the pipeline it calls (the workload's own, or a
hooked deep copy for diffusers' hooks, see ``bench/peers.py``) and the cache config it hands over.
Every run is one request per sample (batch 1, as a user runs a request), so the rules that decide
on a batch statistic (FirstBlockCache, SeaCache, TeaCache) decide per sample.

Peers (each swept over its own knobs; settings whose plan is known in advance are de-duplicated by
that plan and dropped when outside the speedup range, so a denser grid buys no extra tries):

    teacache              TeaCache's rule ("teacache" cache): dense threshold grid x warm-up
    diffusers-fbc         diffusers FirstBlockCacheConfig: threshold
    diffusers-magcache    diffusers MagCacheConfig on the curve calibrated here: threshold x K x retention
    diffusers-taylorseer  diffusers TaylorSeerCacheConfig, block-level: interval x warm-up x order
    diffusers-seacache    diffusers SeaCacheConfig: threshold x residual order x max consecutive reuses
    diffusers-pab         diffusers PyramidAttentionBroadcastConfig: self-/cross-attention skip ranges

Ours, ``ditcache-tuned``: AdaTaylorCache with the plans ``ditcache.cache.tune`` chooses on the
calibration samples: per budget and order, the placement and taylor_threshold of least predicted
error (its candidates include the threshold rule and TaylorSeer's uniform-interval plans); those
candidates are screened like the peers' settings and the better order per budget is evaluated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import ditcache
from ditcache.cache import TeaCacheConfig
from ditcache.cache.tune import FORECAST_GRID
from ditcache.params import params_from_dict

from bench import peers
from bench.quality.calibration import Calibration
from bench.quality.metrics import ComputeCounter
from bench.quality.workload import Samples, Workload, generate_each

PEERS = ["teacache", "diffusers-fbc", "diffusers-magcache", "diffusers-taylorseer", "diffusers-seacache", "diffusers-pab"]
OURS = "ditcache-tuned"
SPEEDUP_RANGE = (1.25, 6.5)  # plans known in advance outside this block-pass speedup range are not run


@dataclass
class Grid:
    teacache_thresh: list[float]
    teacache_warmup_frac: list[float]  # warm-up steps = max(1, round(frac * N))
    fbc_thresh: list[float]
    mag_thresh: list[float]
    mag_K: list[int]
    mag_retention: list[float]
    ts_interval: list[int]
    ts_warmup: list[int]
    ts_order: list[int]
    sea_thresh: list[float]
    sea_order: list[int]
    sea_max_consecutive: list[int]
    pab_spatial: list[int | None]
    pab_cross: list[int | None]
    tune_targets: list[float]  # ideal speedups the tuner is asked for (plus floor/ceil budgets at each band)
    tune_orders: list[tuple[int, int]]  # (n_derivatives, taylor_threshold) the tuner chooses among


FULL_GRID = Grid(
    teacache_thresh=[0.04, 0.06, 0.08, 0.13, 0.2, 0.3, 0.45, 0.7, 1.1],
    teacache_warmup_frac=[0.05, 0.15],
    fbc_thresh=[0.03, 0.04, 0.05, 0.065, 0.08, 0.11, 0.13, 0.15, 0.175, 0.2, 0.26, 0.3, 0.34, 0.45, 0.52, 0.6, 0.8,
                1.0],
    mag_thresh=[0.02, 0.05, 0.1, 0.2, 0.4, 1.0],
    mag_K=[2, 4],
    mag_retention=[0.1, 0.2],
    ts_interval=[2, 3, 4, 5, 6, 8],
    ts_warmup=[1, 4],
    ts_order=[1, 2],
    sea_thresh=[0.05, 0.075, 0.1, 0.15, 0.2, 0.35, 0.6, 1.0, 1.6],
    sea_order=[1],
    sea_max_consecutive=[2, 5],
    pab_spatial=[None, 2, 3, 4, 6],
    pab_cross=[None, 2, 4, 8],
    tune_targets=[1.3, 2.5, 3.5, 4.5],
    tune_orders=list(FORECAST_GRID),  # the forecasts `ditcache calibrate` tunes for
)
QUICK_GRID = Grid(  # 5-9 screened settings per method: within 2x of each other, as in the full grid
    teacache_thresh=[0.1, 0.2, 0.3, 0.45, 0.7, 1.5],
    teacache_warmup_frac=[0.05],
    fbc_thresh=[0.06, 0.1, 0.16, 0.25, 0.4, 0.8],
    mag_thresh=[0.05, 0.2, 1.0],
    mag_K=[2, 4],
    mag_retention=[0.1],
    ts_interval=[2, 3, 4, 5, 6, 8],
    ts_warmup=[1],
    ts_order=[1],
    sea_thresh=[0.05, 0.1, 0.2, 0.35, 0.6, 1.0],
    sea_order=[1],
    sea_max_consecutive=[5],
    pab_spatial=[2, 3, 4],
    pab_cross=[None, 4],
    tune_targets=[1.3, 2.5, 3.5],
    tune_orders=[(1, 2)],
)
SMOKE_GRID = Grid(
    teacache_thresh=[0.3],
    teacache_warmup_frac=[0.1],
    fbc_thresh=[0.1],
    mag_thresh=[0.2],
    mag_K=[2],
    mag_retention=[0.2],
    ts_interval=[2],
    ts_warmup=[3],
    ts_order=[1],
    sea_thresh=[0.3],
    sea_order=[1],
    sea_max_consecutive=[2],
    pab_spatial=[2],
    pab_cross=[None],
    tune_targets=[],
    tune_orders=[(1, 2)],
)


@dataclass(eq=False)
class MethodRun:
    """One method at one setting: ``pipeline(prompt, ..., cache=cache)`` once per sample.

    ``counter`` counts the block compute that really ran (hooks on the block's parts; shared by the
    runs on one pipeline object). ``planned`` is the block-pass speedup known before running (None
    for data-dependent rules)."""

    method: str
    setting: dict[str, Any]
    pipeline: Any
    counter: ComputeCounter
    cache: Any = None
    planned: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None  # ours: the tuned plan the run was built from (to rebuild it for timing)

    def __call__(self, work: Workload, samples: Samples) -> tuple[torch.Tensor, dict[str, float], list]:
        """Generate ``samples``; returns frames, block compute per branch (block units) and the outputs."""
        self.counter.start()
        outs = generate_each(self.pipeline, work, samples, self.cache)
        return torch.cat([o.frames for o in outs]), dict(self.counter.counts), outs


class MethodSet:
    """The runs of one workload, de-duplicated by what they would actually do."""

    def __init__(self, work: Workload, shares: dict[str, float], speedup_range: tuple[float, float] = SPEEDUP_RANGE):
        self.work = work
        self.shares = shares
        self.range = speedup_range
        self.runs: list[MethodRun] = []
        self.seen: set[tuple] = set()
        self.counter = ComputeCounter(work.pipeline, shares)

    def add(self, key: tuple, make: Callable[[], MethodRun], ideal: float | None = None) -> MethodRun | None:
        """Add ``make()`` unless an equivalent run exists or its (known) ideal speedup is outside the range."""
        if key in self.seen or (ideal is not None and not self.range[0] <= ideal <= self.range[1]):
            return None
        self.seen.add(key)
        run = make()
        run.planned = ideal
        self.runs.append(run)
        return run

    def direct(self, method: str, setting: dict, cache: Any) -> MethodRun:
        return MethodRun(method, setting, self.work.pipeline, self.counter, cache)

    def hooked(self, method: str, setting: dict, configs: dict[str, Any]) -> MethodRun:
        pipeline = peers.hooked_pipeline(self.work.pipeline, configs)
        return MethodRun(method, setting, pipeline, ComputeCounter(pipeline, self.shares))

    def count(self, method: str) -> int:
        return sum(run.method == method for run in self.runs)


def uncached_run(methods: MethodSet) -> MethodRun:
    return methods.direct("uncached", {}, None)


def build_peers(methods: MethodSet, calib: Calibration, grid: Grid) -> None:
    """Every peer over its grid (see the module docstring)."""
    work = methods.work
    n, experts = work.steps, work.used_experts()
    for frac in grid.teacache_warmup_frac:
        warmup = max(1, round(frac * n))
        for thresh in grid.teacache_thresh:
            config = TeaCacheConfig(coefficients=tuple(calib.teacache_coefficients), thresh=thresh, warmup=warmup)
            setting = {"thresh": thresh, "warmup": warmup}
            methods.add(("tea", thresh, warmup), lambda: methods.direct("teacache", setting, config))
    for thresh in grid.fbc_thresh:
        configs = {e: peers.make_diffusers_config("fbc", threshold=thresh) for e in experts}
        methods.add(("fbc", thresh), lambda: methods.hooked("diffusers-fbc", {"threshold": thresh}, configs))
    add_magcache(methods, calib, grid)
    for order in grid.ts_order:
        for interval in grid.ts_interval:
            for warmup in grid.ts_warmup:
                plans = []
                for e in experts:  # each expert's hook counts its own steps from 0
                    own = work.expert_steps[e]
                    plans.append(tuple(own[i] for i in peers.diffusers_taylorseer_plan(len(own), interval, warmup)))
                options = {"cache_interval": interval, "max_order": order, "disable_cache_before_step": warmup}
                configs = {e: peers.make_diffusers_config("taylorseer", **options) for e in experts}
                setting = dict(options)
                ideal = n / sum(len(p) for p in plans)
                methods.add(("dts", order, tuple(plans)),
                            lambda: methods.hooked("diffusers-taylorseer", setting, configs), ideal)  # fmt: skip
    for thresh in grid.sea_thresh:
        for order in grid.sea_order:
            for most in grid.sea_max_consecutive:
                options = {"threshold": thresh, "residual_order": order, "max_consecutive_cached": most}
                configs = {e: peers.make_diffusers_config("seacache", **options) for e in experts}
                methods.add(("sea", thresh, order, most),
                            lambda: methods.hooked("diffusers-seacache", dict(options), configs))  # fmt: skip
    for spatial in grid.pab_spatial:
        for cross in grid.pab_cross:
            if spatial is None and cross is None:
                continue
            options = {"spatial_attention_block_skip_range": spatial, "cross_attention_block_skip_range": cross}
            configs = {e: peers.make_diffusers_config("pab", **options) for e in experts}
            methods.add(("pab", spatial, cross), lambda: methods.hooked("diffusers-pab", dict(options), configs))


def add_magcache(methods: MethodSet, calib: Calibration, grid: Grid) -> None:
    """diffusers' MagCache hook on the curve calibrated here (each expert gets its slice of the curve)."""
    work = methods.work
    curve = calib.params.cond_mag_ratios
    for retention in grid.mag_retention:
        for K in grid.mag_K:
            for thresh in grid.mag_thresh:
                configs, plan = {}, []
                for expert in work.used_experts():
                    steps = work.expert_steps[expert]
                    ratios = [curve[s] for s in steps]
                    configs[expert] = peers.make_diffusers_config(
                        "magcache", threshold=thresh, max_skip_steps=K, retention_ratio=retention,
                        num_inference_steps=len(steps), mag_ratios=ratios,
                    )  # fmt: skip
                    plan.append(tuple(peers.diffusers_magcache_plan(ratios, len(steps), thresh, K, retention)))
                setting = {"threshold": thresh, "max_skip_steps": K, "retention_ratio": retention}
                methods.add(("mag", tuple(plan)), lambda: methods.hooked("diffusers-magcache", setting, configs),
                            work.steps / sum(len(p) for p in plan))  # fmt: skip


def add_tuned(methods: MethodSet, tuned: list[dict]) -> None:
    """Ours: one run per tuned plan (``tuned``: rows of :func:`bench.quality.evaluate.tune_plans`)."""
    for plan in tuned:
        params = params_from_dict(plan["params"], source="<tuned on the calibration samples>")
        config = ditcache.AdaTaylorConfig(
            params=params, n_derivatives=plan["order"], taylor_threshold=plan["taylor_threshold"]
        )
        setting = {"budget": plan["budget"], "order": plan["order"], "taylor_threshold": plan["taylor_threshold"],
                   "plan": plan["method"]} | plan["settings"]  # fmt: skip
        key = ("ours", plan["order"], plan["taylor_threshold"], tuple(plan["cond"]), tuple(plan["uncond"]))
        run = methods.add(key, lambda: methods.direct(OURS, setting, config), plan["predicted_speedup"])
        if run is not None:
            run.plan = plan
            run.extra = {"predicted_error": plan["predicted_error"], "compute_steps": {"cond": plan["cond"],
                         "uncond": plan["uncond"]}}  # fmt: skip
