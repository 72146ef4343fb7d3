"""The methods and their grids: every setting is one public pipeline call with one ``cache=`` argument.

A :class:`MethodRun` is one method at one setting: the pipeline it calls (the workload's own, or a
hooked deep copy for diffusers' hooks, see ``bench/peers.py``) and the cache config it hands over.
Settings that would do the same work are dropped before anything runs, so a denser grid does not
buy a method extra tries: AdaTaylorCache settings by the plan its config builds (per expert, the
builds the pipeline makes), MagCache hook settings by the plan of the hook's rule, and either when
its plan's speedup lies outside the evaluated bands.

Tuning effort is comparable: each method sweeps its own knob(s) over a grid of similar size, and
stage 2 (:func:`refinements`) tries AdaTaylorCache's orders and ``taylor_threshold`` only on the
plans stage 1 found best, its own and MagCache's (whose schedule rule it shares).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ditcache
from ditcache.cache import FirstBlockCacheConfig, FixedIntervalTaylorConfig, TeaCacheConfig, resample_nearest
from ditcache.params import CacheParams, load_params

from bench import peers
from bench.quality.calibration import Calibration
from bench.quality.metrics import BlockCounter, telemetry_block_calls
from bench.quality.workload import WAN_CURVES, Batch, Workload, generate

Plan = tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (expert, cond steps, uncond steps) per expert
TAYLORSEER_WARMUP = 3  # TaylorSeer's and diffusers' default: the first steps always compute


@dataclass
class Grid:
    ours_retention: list[float]
    ours_K: list[int]
    ours_thresh: list[float]
    taylor_thresholds: list[int]
    wan_thresh: list[float]
    wan_K: list[int]
    wan_retention: list[float]
    intervals: list[int]
    fbc_thresh: list[float]
    teacache_thresh: list[float]


FULL_GRID = Grid(
    ours_retention=[0.05, 0.1, 0.2],
    ours_K=[1, 2, 3, 4, 6],
    ours_thresh=[0.02, 0.03, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3, 0.5, 100.0],  # 100: only K and warm-up limit
    taylor_thresholds=[1, 2, 3],
    wan_thresh=[0.05, 0.1, 0.2, 0.4, 100.0],
    wan_K=[2, 4, 6],
    wan_retention=[0.1, 0.2],
    intervals=[2, 3, 4, 5, 6],
    fbc_thresh=[0.02, 0.05, 0.08, 0.12, 0.16, 0.24, 0.32, 0.5],
    teacache_thresh=[0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2],
)
QUICK_GRID = Grid(
    ours_retention=[0.1],
    ours_K=[2, 4],
    ours_thresh=[0.1, 100.0],
    taylor_thresholds=[2],
    wan_thresh=[],
    wan_K=[],
    wan_retention=[],
    intervals=[2, 3],
    fbc_thresh=[0.08, 0.2],
    teacache_thresh=[0.2, 0.6],
)
SMOKE_GRID = Grid(
    ours_retention=[0.2],
    ours_K=[2],
    ours_thresh=[100.0],
    taylor_thresholds=[2],
    wan_thresh=[100.0],
    wan_K=[2],
    wan_retention=[0.2],
    intervals=[2],
    fbc_thresh=[0.1],
    teacache_thresh=[0.3],
)


@dataclass(eq=False)
class MethodRun:
    """One method at one setting: ``pipeline(..., cache=cache)``.

    ``counter`` is set for diffusers' hooks, whose skipped blocks only forward hooks can see; other
    runs take their block executions from the request's telemetry, ``probe_blocks`` being what a
    skipped step still runs. ``schedule`` (AdaTaylorCache params with this run's skip-schedule
    settings) and ``curve`` let stage 2 re-run the plan with other orders.
    """

    method: str
    setting: dict[str, Any]
    pipeline: Any
    cache: Any = None
    probe_blocks: int = 0
    counter: BlockCounter | None = None
    schedule: CacheParams | None = None
    curve: str = ""

    def __call__(self, work: Workload, batch: Batch) -> tuple[ditcache.GenerationOutput, dict[str, int]]:
        """Generate ``batch``; returns the output and the real block executions per branch."""
        if self.counter is not None:
            self.counter.start()
        out = generate(self.pipeline, work, batch, self.cache)
        if self.counter is not None:
            return out, dict(self.counter.counts)
        return out, telemetry_block_calls(out, work.num_layers, self.probe_blocks)


def hooked_run(work: Workload, method: str, setting: dict[str, Any], configs: dict[str, Any]) -> MethodRun:
    """A run of diffusers' hooks (``configs[expert]``) on a deep copy of the workload's pipeline."""
    pipeline = peers.hooked_pipeline(work.pipeline, configs)
    return MethodRun(method, setting, pipeline, counter=BlockCounter(pipeline))


def ada_config(params: CacheParams, order: int, taylor_threshold: int) -> ditcache.AdaTaylorConfig:
    """AdaTaylorCache on ``params``; the curve is resampled by step index, as the MagCache hook takes it."""
    return ditcache.AdaTaylorConfig(
        params=params, n_derivatives=order, taylor_threshold=taylor_threshold, resample="index"
    )


def ada_plan(work: Workload, params: CacheParams) -> Plan:
    """Per expert, the steps each branch computes: the caches the pipeline would build, asked for their plan."""
    config = ada_config(params, 0, 1)
    plan = []
    for expert in work.used_experts():
        own = set(work.expert_steps[expert])
        cache = config.build(work.steps, work.sigmas, work.first_step(expert))
        cond, uncond = (tuple(s for s in cache.planned_compute_steps(c) if s in own) for c in (True, False))
        plan.append((expert, cond, uncond))
    return tuple(plan)


def plan_speedup(work: Workload, plan: Plan) -> float:
    return 2 * work.steps / sum(len(cond) + len(uncond) for _, cond, uncond in plan)


def max_elapsed(plan: Plan) -> int:
    """Longest distance from a skipped step back to its last computed step, over experts and branches."""
    gaps = [b - a - 1 for _, *branches in plan for steps in branches for a, b in zip(steps, steps[1:])]
    return max(gaps, default=0)


class MethodSet:
    """The runs of one model, de-duplicated by what they would actually do."""

    def __init__(self, work: Workload, speedup_range: tuple[float, float]) -> None:
        self.work = work
        self.range = speedup_range
        self.runs: list[MethodRun] = []
        self.seen: set[tuple] = set()

    def add(self, key: tuple, make: Callable[[], MethodRun], ideal: float | None = None) -> MethodRun | None:
        """Add ``make()`` (called at once, only then: a hooked copy costs memory) unless an equivalent
        run exists or its (known) ideal speedup is outside the range."""
        if key in self.seen or (ideal is not None and not self.range[0] <= ideal < self.range[1]):
            return None
        self.seen.add(key)
        run = make()
        self.runs.append(run)
        return run

    def ada(self, params: CacheParams, order: int, taylor_threshold: int, curve: str = "") -> MethodRun | None:
        """AdaTaylorCache of ``order``; a taylor_threshold beyond the plan's longest gap is the same run."""
        plan = ada_plan(self.work, params)
        effective = min(taylor_threshold, max(max_elapsed(plan), 1)) if order else 0
        setting: dict[str, Any] = {"thresh": params.thresh, "K": params.K, "retention_ratio": params.retention_ratio}
        if order:
            setting["taylor_threshold"] = taylor_threshold
        if curve:
            setting["curve"] = params.model_type

        def make() -> MethodRun:
            config = ada_config(params, order, taylor_threshold)
            return MethodRun(f"ditcache-ada_taylor-o{order}{curve}", setting, self.work.pipeline, config,
                             schedule=params, curve=curve)  # fmt: skip

        return self.add(("ours", curve, order, effective, plan), make, plan_speedup(self.work, plan))


def with_settings(params: CacheParams, thresh: float, K: int, retention_ratio: float) -> CacheParams:
    return dataclasses.replace(params, thresh=thresh, K=K, retention_ratio=retention_ratio)


def build_methods(work: Workload, calib: Calibration, grid: Grid, speedup_range: tuple[float, float]) -> MethodSet:
    """Stage 1: every method over its knob (AdaTaylorCache at order 1, taylor_threshold 2)."""
    methods = MethodSet(work, speedup_range)
    methods.add(("uncached",), lambda: MethodRun("uncached", {}, work.pipeline))
    wan_params = load_params(WAN_CURVES[work.name]) if work.name in WAN_CURVES and grid.wan_thresh else None
    schedule_grid = [(r, K, t) for r in grid.ours_retention for K in grid.ours_K for t in grid.ours_thresh]
    wan_grid = [(r, K, t) for r in grid.wan_retention for K in grid.wan_K for t in grid.wan_thresh]
    for retention, K, thresh in schedule_grid:
        methods.ada(with_settings(calib.params, thresh, K, retention), 1, 2)
    if wan_params is not None:
        for retention, K, thresh in wan_grid:
            methods.ada(with_settings(wan_params, thresh, K, retention), 1, 2, "-wancurve")
    add_library_rules(methods, calib, grid)
    add_diffusers_hooks(methods, calib, grid, schedule_grid)
    if wan_params is not None:
        curve = resample_nearest(wan_params.cond_mag_ratios, work.steps)
        add_magcache_hooks(methods, curve, wan_grid, "-wancurve", None)
    return methods


def add_library_rules(methods: MethodSet, calib: Calibration, grid: Grid) -> None:
    """The peers' rules registered in ditcache: TaylorSeer's interval, TeaCache, FirstBlockCache."""
    work = methods.work
    for order in (1, 2):
        for interval in grid.intervals:
            config = FixedIntervalTaylorConfig(interval=interval, order=order, warmup=TAYLORSEER_WARMUP)
            setting = {"interval": interval, "warmup": TAYLORSEER_WARMUP}
            name = f"taylorseer-interval-o{order}"
            methods.add(("ts", order, interval), lambda: MethodRun(name, setting, work.pipeline, config))
    warmup = max(1, work.steps // 10)
    for thresh in grid.teacache_thresh:
        config = TeaCacheConfig(coefficients=tuple(calib.teacache_coefficients), thresh=thresh, warmup=warmup)
        setting = {"thresh": thresh, "warmup": warmup}
        methods.add(("tea", thresh), lambda: MethodRun("teacache", setting, work.pipeline, config))
    for thresh in grid.fbc_thresh:
        config = FirstBlockCacheConfig(threshold=thresh)
        setting = {"threshold": thresh}
        methods.add(("first-block", thresh),
                    lambda: MethodRun("first-block", setting, work.pipeline, config, probe_blocks=1))  # fmt: skip


def add_diffusers_hooks(
    methods: MethodSet, calib: Calibration, grid: Grid, schedule_grid: list[tuple[float, int, float]]
) -> None:
    """diffusers' FirstBlockCache, MagCache (on the curve calibrated here) and TaylorSeer hooks."""
    work = methods.work
    experts = work.used_experts()
    for thresh in grid.fbc_thresh:
        configs = {e: peers.make_diffusers_config("fbc", threshold=thresh) for e in experts}
        methods.add(("fbc", thresh), lambda: hooked_run(work, "diffusers-fbc", {"threshold": thresh}, configs))
    add_magcache_hooks(methods, calib.params.cond_mag_ratios, schedule_grid, "", calib.params)
    for order in (1, 2):
        for interval in grid.intervals:
            options = {"cache_interval": interval, "max_order": order, "disable_cache_before_step": TAYLORSEER_WARMUP}
            configs = {e: peers.make_diffusers_config("taylorseer", **options) for e in experts}
            setting = {"cache_interval": interval, "disable_cache_before_step": TAYLORSEER_WARMUP,
                       "cache_identifiers": "blocks.N"}  # fmt: skip
            name = f"diffusers-taylorseer-o{order}"
            methods.add(("dts", order, interval), lambda: hooked_run(work, name, setting, configs))


def add_magcache_hooks(
    methods: MethodSet,
    curve: list[float] | tuple[float, ...],
    settings: list[tuple[float, int, float]],
    suffix: str,
    params: CacheParams | None,
) -> None:
    """diffusers' MagCache hook on ``curve`` over (retention, K, thresh); with ``params`` (the same
    curve as AdaTaylorCache params) a run also carries its schedule for stage 2."""
    work = methods.work
    for retention, K, thresh in settings:
        configs, plan = {}, []
        for expert in work.used_experts():
            steps = work.expert_steps[expert]
            # Each expert's hook counts its own steps from 0: give it its slice of the curve.
            ratios = [curve[s] for s in steps]
            configs[expert] = peers.make_diffusers_config(
                "magcache", threshold=thresh, max_skip_steps=K, retention_ratio=retention,
                num_inference_steps=len(steps), mag_ratios=ratios,
            )  # fmt: skip
            plan.append(tuple(peers.diffusers_magcache_plan(ratios, len(steps), thresh, K, retention)))
        setting: dict[str, Any] = {"threshold": thresh, "max_skip_steps": K, "retention_ratio": retention}
        if suffix:
            setting["curve"] = WAN_CURVES[work.name]

        def make() -> MethodRun:
            run = hooked_run(work, f"diffusers-magcache{suffix}", setting, configs)
            run.schedule = None if params is None else with_settings(params, thresh, K, retention)
            return run

        methods.add(("mag", suffix, tuple(plan)), make, work.steps / sum(len(p) for p in plan))


def refinements(methods: MethodSet, best: list[MethodRun], taylor_thresholds: list[int]) -> list[MethodRun]:
    """Stage 2: AdaTaylorCache orders 0/1/2 at every taylor_threshold on the best stage-1 plans.

    The best order-1 plans get orders 0, 1, 2 at every taylor_threshold; the best MagCache plans get
    ditcache's order 0 (their analogue) and order 1; the published-curve plans order 1 again.
    """
    variants = {
        "ditcache-ada_taylor-o1": [(0, 1)] + [(order, tt) for order in (1, 2) for tt in taylor_thresholds],
        "diffusers-magcache": [(0, 1), (1, 2)],
        "ditcache-ada_taylor-o1-wancurve": [(1, tt) for tt in taylor_thresholds],
    }
    new = []
    for run in best:
        if run.schedule is None:
            continue
        for order, tt in variants.get(run.method, []):
            added = methods.ada(run.schedule, order, tt, run.curve)
            if added is not None:
                new.append(added)
    return new
