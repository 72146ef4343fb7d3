"""The denoising core every family's pipeline runs on: caches, parallel layout, the loop, the report.

Per step the loop picks the step's expert, runs the CFG branches this rank owns (both, only the
conditional one with guidance off, or one per rank under CFG-parallel) as separate cached adapter
calls, checks that the cache counts the global step, combines the branches (all-gathered over the
cfg pair under CFG-parallel, so every rank holds the same guided prediction and the same latents)
and takes the step of the request's diffusers scheduler (``ditcache.runtime.scheduler``: built
afresh per request, so every rank holds the same scheduler state). Under Ulysses SP the adapter shards the tokens after embedding and
gathers them before the head; the cache sits between, so each rank caches its own shard and a
skipped step does no attention communication. With more than one rank every cache is wrapped in a
:class:`~ditcache.parallel.SyncedCache`, which checks each decision across the request's ranks.

A family pipeline subclasses :class:`DenoisingPipeline` and describes its model through a
:class:`DenoiseRequest` (inputs per branch, how latents become the model input, which part of the
prediction moves the latents, its guidance rule); everything else is shared.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from tqdm.auto import tqdm

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.context import branch_name
from ditcache.cache.ada_taylor import AdaTaylorConfig
from ditcache.cache.none import NoCacheConfig
from ditcache.cache.registry import CacheConfig, cache_config
from ditcache.cache.calibrator import Calibrator
from ditcache.errors import CacheConfigError, StepSyncError
from ditcache.parallel import CfgParallel, ParallelGroups, StepSync, SyncedCache, UlyssesContext, apply_ulysses
from ditcache.parallel.cfg import combine_guidance
from ditcache.parallel.fingerprint import (
    RequestFingerprint,
    cache_description,
    cache_params,
    check_request,
    model_identity,
    params_hash,
    sigmas_hash,
)
from ditcache.runtime.adapter import FamilyAdapter
from ditcache.runtime.scheduler import Schedule

GuidanceRule = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
SINGLE_PROCESS = "single process"


@dataclass
class GenerationOutput:
    """Result and telemetry of one request.

    ``frames`` is ``[B, C, F, H, W]`` (float in [0, 1], or latents when a pipeline is asked for them).
    ``cache_stats`` and ``stack_passes`` are keyed by expert ("transformer", and "transformer_2" for
    Wan2.2) and then by branch ("cond", "uncond"), for the whole request (under CFG-parallel the cfg
    pair exchanges them); ``stack_passes`` counts real block-stack runs, ``branch_steps`` the steps
    each branch was asked for. ``cache_memory_bytes`` is what this rank's caches hold (its branch,
    its token shard). ``layout`` names the parallel layout the request ran on; ``cfg_parallel`` says
    whether the two branches ran on different ranks at the same time.
    """

    frames: torch.Tensor
    cache_stats: dict[str, dict[str, dict]]
    stack_passes: dict[str, dict[str, int]]
    branch_steps: dict[str, int]
    expert_steps: dict[str, list[int]]
    cache_memory_bytes: dict[str, int]
    sigmas: list[float]
    timesteps: list[float]
    wall_time_s: float
    layout: str = SINGLE_PROCESS
    stack_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # expert -> branch -> s
    cfg_parallel: bool = False

    def total_stack_passes(self) -> dict[str, int]:
        """Block-stack runs per branch, summed over experts."""
        totals: dict[str, int] = {name: 0 for name in self.branch_steps}
        for per_branch in self.stack_passes.values():
            for name, count in per_branch.items():
                totals[name] = totals.get(name, 0) + count
        return totals

    def telemetry(self) -> dict[str, Any]:
        """What the cache did, per branch (summed over experts), next to what it planned.

        ``predicted_speedup`` is block passes uncached / planned; ``block_pass_speedup`` the same with
        the passes that really ran (counted by the adapters, not taken from the caches);
        ``estimated_wall_speedup`` is (wall time + skipped passes x mean measured pass time) / wall
        time: the uncached wall time estimated from this very run, without running it. Under
        CFG-parallel each branch runs on its own ranks at the same time, so only the slower branch's
        skipped passes would have lengthened the run: per rank, not the sum over both branches.
        """
        passes = self.total_stack_passes()
        branches: dict[str, dict[str, Any]] = {}
        for name, steps in self.branch_steps.items():
            per_expert = [stats[name] for stats in self.cache_stats.values() if name in stats]
            # an expert's cache plans the whole run; only the steps that expert runs are its plan
            planned = sorted(
                {
                    s
                    for expert, stats in self.cache_stats.items()
                    if name in stats
                    for s in stats[name].get("planned_compute_steps", stats[name].get("computed_steps", []))
                    if s in self.expert_steps.get(expert, range(steps))
                }
            )
            computed = sorted({s for st in per_expert for s in st.get("computed_steps", [])})
            branches[name] = {
                "planned_compute_steps": planned,
                "computed_steps": computed,
                "skipped_steps": sorted({s for st in per_expert for s in st.get("skipped_steps", [])}),
                "block_passes": passes[name],
                "block_passes_saved": steps - passes[name],
                "taylor_approximations": sum(st.get("taylor_approximations", 0) for st in per_expert),
                "reuse_approximations": sum(st.get("reuse_approximations", 0) for st in per_expert),
            }
        asked = sum(self.branch_steps.values())
        ran = sum(passes.values())
        planned_passes = sum(len(b["planned_compute_steps"]) or b["block_passes"] for b in branches.values())
        stack_time = sum(t for per_branch in self.stack_seconds.values() for t in per_branch.values())
        per_pass = stack_time / ran if ran else 0.0
        estimated_uncached = self.wall_time_s + max(self._skipped_seconds(lane) for lane in self._lanes())
        return {
            "branches": branches,
            "cache_memory_bytes": sum(self.cache_memory_bytes.values()),
            "predicted_speedup": asked / planned_passes if planned_passes else None,
            "block_pass_speedup": asked / ran if ran else None,
            "estimated_wall_speedup": estimated_uncached / self.wall_time_s if self.wall_time_s > 0 else None,
            "mean_stack_pass_s": per_pass,
            "wall_time_s": self.wall_time_s,
            "layout": self.layout,
        }

    def _lanes(self) -> list[list[str]]:
        """Branches that run one after the other on a rank: each branch alone under CFG-parallel."""
        names = list(self.branch_steps)
        return [[name] for name in names] if self.cfg_parallel else [names]

    def _skipped_seconds(self, lane: list[str]) -> float:
        """The stack time the skipped passes of ``lane`` would have taken, each branch at its mean pass time."""
        passes = self.total_stack_passes()
        total = 0.0
        for name in lane:
            seconds = sum(per_branch.get(name, 0.0) for per_branch in self.stack_seconds.values())
            if passes[name]:
                total += (self.branch_steps[name] - passes[name]) * seconds / passes[name]
        return total

    def summary(self) -> str:
        """One line: steps computed/skipped per branch, block passes saved, speedup, wall time, layout."""
        passes = self.total_stack_passes()
        parts = [
            f"{name}: {passes[name]} computed / {steps - passes[name]} skipped"
            for name, steps in self.branch_steps.items()
        ]
        asked, ran = sum(self.branch_steps.values()), sum(passes.values())
        ratio = f", {asked / ran:.2f}x fewer" if ran else ""
        wall = self.telemetry()["estimated_wall_speedup"]
        estimate = f" (~{wall:.2f}x est. vs uncached)" if wall and ran < asked else ""
        return (
            f"{len(self.timesteps)} steps | {' | '.join(parts)} | block passes {ran}/{asked} "
            f"(saved {asked - ran}{ratio}) | {self.wall_time_s:.2f} s{estimate} | {self.layout}"
        )


def check_step(cache: BaseFeatureCache, expert: str, is_cond: bool, step: int) -> None:
    """A cache that counts steps must count the global step, or its plan is applied off by some."""
    reported = cache.current_step(is_cond)
    if reported not in (-1, step):
        raise StepSyncError(
            f"{expert}'s cache counts {branch_name(is_cond)} step {reported} while the pipeline is at step "
            f"{step}: a cache used from a later step on must start counting there (init_step), and "
            "every step must consult the cache exactly once per branch"
        )


CacheArg = Union[str, CacheConfig, BaseFeatureCache, Mapping[str, BaseFeatureCache], None]


def cache_from_arguments(
    cache: CacheArg,
    enable_ada_taylor_cache: bool,
    ada_taylor_n_derivatives: int | None,
    ada_taylor_taylor_threshold: int | None,
    model_type: str | None,
) -> CacheArg:
    """The request's ``cache=``, or the AdaTaylorConfig the seed keywords describe.

    ``enable_ada_taylor_cache=True, ada_taylor_n_derivatives=..., model_type=...`` is the seed
    document's spelling of ``cache=AdaTaylorConfig(...)``; giving both is ambiguous, so an error.
    """
    if not enable_ada_taylor_cache:
        if model_type is not None and isinstance(cache, AdaTaylorConfig):
            return dataclasses.replace(cache, model_type=model_type)
        return cache
    if cache is not None:
        raise CacheConfigError("pass either cache= or enable_ada_taylor_cache=True (its seed-API alias), not both")
    return AdaTaylorConfig(
        model_type=model_type, n_derivatives=ada_taylor_n_derivatives, taylor_threshold=ada_taylor_taylor_threshold
    )


def _identity(prediction: torch.Tensor) -> torch.Tensor:
    return prediction


@dataclass
class DenoiseRequest:
    """One request as the loop sees it.

    ``branch_inputs[is_cond]`` are the adapter's keyword inputs of a branch (text tokens, masks, ...).
    ``model_input(latents, step)`` is what the transformer gets (e.g. with image latents appended),
    ``timestep(step)`` its time input, ``prediction`` the part of its output that moves the latents,
    ``guidance_rule(cond, uncond, scale)`` the family's CFG, ``integrate(latents, velocity, step)``
    the update (default: the schedule's scheduler step). ``guidance_scale_2`` is the guidance of the
    steps ``guidance_steps_2`` (Wan2.2's low-noise expert; None: ``guidance_scale`` everywhere). ``params_cache`` says the caches came from a
    params file, so a run that skips nothing deserves a warning. ``seed``, ``conditioning`` (a hash
    of the prompts or embeddings and any conditioning image) and ``cache_description`` (the ``cache=``
    argument as given) are what ranks compare before step 0, with the rest of the request.
    """

    schedule: Schedule
    experts: list[str]
    caches: dict[str, BaseFeatureCache]
    guidance_scale: float
    branch_inputs: dict[bool, dict[str, Any]]
    model_input: Callable[[torch.Tensor, int], torch.Tensor]
    timestep: Callable[[int], torch.Tensor]
    prediction: Callable[[torch.Tensor], torch.Tensor] = _identity
    guidance_rule: GuidanceRule = combine_guidance
    integrate: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] | None = None
    params_cache: bool = False
    seed: int = 0
    conditioning: str = ""
    cache_description: str = "none"
    guidance_scale_2: float | None = None
    guidance_steps_2: frozenset[int] = frozenset()

    def guidance_at(self, step: int) -> float:
        """The guidance scale of ``step``."""
        if self.guidance_scale_2 is not None and step in self.guidance_steps_2:
            return self.guidance_scale_2
        return self.guidance_scale

    @property
    def do_cfg(self) -> bool:
        """Whether the unconditional branch runs (it has inputs exactly when guidance is on)."""
        return False in self.branch_inputs

    @property
    def branches(self) -> list[str]:
        return ["cond", "uncond"] if self.do_cfg else ["cond"]


class DenoisingPipeline:
    """Base of the family pipelines: adapters per expert, the parallel layout, caches, loop, report.

    ``parallel`` is this rank's :class:`ParallelGroups` (``init_parallel(cfg_degree, sp_degree)``
    under torchrun), or None for one process without ``torch.distributed``. Ulysses processors are
    installed on every expert's transformer here, sharing one context (Wan2.2's experts run on the
    same tokens).
    """

    def __init__(self, adapters: dict[str, FamilyAdapter], parallel: ParallelGroups | None = None) -> None:
        self.adapters = adapters
        self.parallel = ParallelGroups.single() if parallel is None else parallel
        self.sp = UlyssesContext(self.parallel.sp)
        self._job_checked = False  # the first request is compared across the whole job, later ones per replica
        for adapter in adapters.values():
            apply_ulysses(adapter.transformer, self.sp, adapter.ulysses_processors)

    @property
    def layout(self) -> str:
        return self.parallel.config.layout if self.parallel.is_distributed else SINGLE_PROCESS

    # -- caches -----------------------------------------------------------------------------------

    def _new_request(
        self,
        schedule: Schedule,
        experts: list[str],
        guidance_scale: float,
        branch_inputs: dict[bool, dict[str, Any]],
        *,
        cache: CacheArg,
        model_type: str | None,
        seed: int,
        conditioning: str,
        **drive: Any,
    ) -> DenoiseRequest:
        """A request with its caches ready (one per expert that runs; reset; synced across ranks).

        ``cache`` is a registered cache's name (its default config), a config (built here for this request: one cache per expert, each counting from
        the expert's first step, or one for all experts when the cache measures a whole run), a
        built cache (shared by every expert only if it ``spans_experts``), a mapping expert -> built
        cache, or None (compute every step). ``model_type`` fills a params-driven config that names
        no params. ``seed`` and ``conditioning`` identify the request for the cross-rank check.
        ``drive`` are the remaining :class:`DenoiseRequest` fields.
        """
        described = cache_description(cache)
        if isinstance(cache, str):
            cache = cache_config(cache)
        if isinstance(cache, CacheConfig):
            cache = cache.for_model(model_type)
        caches = self._resolve_caches(experts, schedule, cache)
        return DenoiseRequest(
            schedule=schedule,
            experts=experts,
            caches=self._ready(caches),
            guidance_scale=guidance_scale,
            branch_inputs=branch_inputs,
            params_cache=isinstance(cache, AdaTaylorConfig),
            seed=seed,
            conditioning=conditioning,
            cache_description=described,
            **drive,
        )

    def _ready(self, caches: dict[str, BaseFeatureCache]) -> dict[str, BaseFeatureCache]:
        """Reset every (possibly shared) cache and the stack counters; wrap caches for the step sync."""
        started: dict[int, BaseFeatureCache] = {}  # id of a (possibly shared) cache -> the one to use
        for name, cache in caches.items():
            if id(cache) in started:
                continue
            cache.reset()
            # Every cache, data-dependent ones too: a decision that differs between ranks must
            # fail on all of them at once instead of hanging in the next collective.
            sync = StepSync.for_groups(self.parallel, label=f"{name} cache") if self.parallel.is_distributed else None
            started[id(cache)] = cache if sync is None else SyncedCache(cache, sync)
        for adapter in self.adapters.values():
            adapter.reset_counters()
        return {name: started[id(cache)] for name, cache in caches.items()}

    def _resolve_caches(
        self, experts: list[str], schedule: Schedule, cache: CacheArg
    ) -> dict[str, BaseFeatureCache]:
        num_steps = schedule.num_steps
        used = list(dict.fromkeys(experts))
        # The run's sigmas let a cache resample a curve by noise level rather than by step index.
        sigmas = schedule.sigmas[:-1].tolist()
        config = NoCacheConfig() if cache is None else cache
        if isinstance(config, CacheConfig):
            if config.spans_experts:
                shared = config.build(num_steps, sigmas, 0)
                return {name: shared for name in used}
            return {name: config.build(num_steps, sigmas, experts.index(name)) for name in used}
        if isinstance(config, Mapping):
            return self._expert_caches(config, used)
        if not isinstance(config, BaseFeatureCache):
            raise CacheConfigError(
                f"cache must be a cache config (see ditcache.cache_config), a built cache, a mapping expert -> "
                f"cache, or None; got {type(config).__name__}"
            )
        calibrated_steps = getattr(config, "num_inference_steps", num_steps)
        if calibrated_steps != num_steps:
            raise CacheConfigError(f"the cache was built for {calibrated_steps} steps but the request has {num_steps}")
        if len(used) > 1 and not config.spans_experts:
            raise CacheConfigError(
                f"this request runs the experts {used} and a residual must not cross the switch: pass a cache "
                "config (built once per expert), or a mapping expert -> cache, each counting from its first step"
            )
        if isinstance(config, Calibrator):
            config.observe_sigmas(sigmas)
        return {name: config for name in used}

    def _expert_caches(self, caches: Mapping[str, BaseFeatureCache], used: list[str]) -> dict[str, BaseFeatureCache]:
        """One built cache per expert that runs, each its own object."""
        missing = [name for name in used if name not in caches]
        if missing:
            raise CacheConfigError(f"cache= has no cache for the experts {missing} that this request runs")
        if len({id(caches[name]) for name in used}) != len(used):
            raise CacheConfigError("each expert needs its own cache object in the mapping")
        return {name: caches[name] for name in used}

    # -- the loop ---------------------------------------------------------------------------------

    def _denoise(self, request: DenoiseRequest, latents: torch.Tensor, progress: bool) -> torch.Tensor:
        """Run every step of ``request`` from ``latents``; returns the final latents (same on all ranks)."""
        self._check_request(request, latents)
        cfg = CfgParallel.from_groups(self.parallel, request.do_cfg)
        schedule = request.schedule
        integrate = request.integrate or schedule.step
        show = progress and self.parallel.rank == 0
        # An expert that hands over to another for the rest of the run frees its cache at the switch.
        last_step = {name: step for step, name in enumerate(request.experts)}
        handovers = {
            step: request.caches[name]
            for name, step in last_step.items()
            if step < schedule.num_steps - 1
            and sum(cache is request.caches[name] for cache in request.caches.values()) == 1  # not shared
        }
        for step in tqdm(range(schedule.num_steps), desc="denoising", disable=not show):
            expert = request.experts[step]
            adapter, cache = self.adapters[expert], request.caches[expert]
            model_input, timestep = request.model_input(latents, step), request.timestep(step)
            predictions = {}
            for is_cond in cfg.branches:
                prediction = adapter(
                    model_input,
                    timestep,
                    is_cond=is_cond,
                    cache=cache,
                    sp=self.sp,
                    step=step,
                    sigma=float(schedule.sigmas[step]),
                    expert=expert,
                    **request.branch_inputs[is_cond],
                )
                check_step(cache, expert, is_cond, step)
                predictions[is_cond] = request.prediction(prediction.float())
            velocity = cfg.combine(predictions, request.guidance_at(step), request.guidance_rule)
            latents = integrate(latents, velocity, step)
            if step in handovers:
                handovers[step].release()
        return latents

    def _check_request(self, request: DenoiseRequest, latents: torch.Tensor) -> None:
        """Every rank describes the request it is about to run; any difference fails all of them
        with one error naming the field, before step 0 (a CFG partner with another seed, guidance or
        params file would otherwise give a wrong sample and exit 0)."""
        if not self.parallel.is_distributed:
            return
        schedule = request.schedule
        fingerprint = RequestFingerprint(
            seed=request.seed,
            num_inference_steps=schedule.num_steps,
            sigmas=sigmas_hash(schedule.sigmas.tolist()),
            sigma_shift=float(schedule.shift),
            guidance_scale=float(request.guidance_scale),
            prompt_hash=request.conditioning,
            num_prompts=int(latents.shape[0]),
            latent_shape=tuple(latents.shape),
            layout=self.parallel.config.layout,
            cache=request.cache_description,
            params_hash=params_hash(*(cache_params(cache) for cache in request.caches.values())),
            model=model_identity(*(self.adapters[name].transformer for name in dict.fromkeys(request.experts))),
            guidance_scale_2=None if request.guidance_scale_2 is None else float(request.guidance_scale_2),
        )
        check_request(self.parallel, fingerprint, scope="replica" if self._job_checked else "job")
        self._job_checked = True

    # -- the report -------------------------------------------------------------------------------

    def _report(self, request: DenoiseRequest, frames: torch.Tensor, wall: float) -> GenerationOutput:
        steps = request.schedule.num_steps
        expert_steps = {name: [s for s, e in enumerate(request.experts) if e == name] for name in self.adapters}
        ran = {name: a for name, a in self.adapters.items() if expert_steps[name]}
        cache_stats, stack_passes, stack_seconds = self._whole_request(
            {name: cache.stats() for name, cache in request.caches.items()},
            {name: dict(a.stack_passes) for name, a in ran.items()},
            {name: dict(a.stack_seconds) for name, a in ran.items()},
        )
        output = GenerationOutput(
            frames=frames,
            cache_stats=cache_stats,
            stack_passes=stack_passes,
            branch_steps={name: steps for name in request.branches},
            expert_steps=expert_steps,
            cache_memory_bytes={name: cache.memory_bytes() for name, cache in request.caches.items()},
            sigmas=request.schedule.sigmas.tolist(),
            timesteps=request.schedule.timesteps.tolist(),
            wall_time_s=wall,
            layout=self.layout,
            stack_seconds=stack_seconds,
            cfg_parallel=self.parallel.config.cfg_degree == 2,
        )
        if request.params_cache and output.total_stack_passes() == output.branch_steps:
            warnings.warn(
                "AdaTaylorCache is enabled but skipped no step: the params' thresh/K/retention_ratio allow no "
                f"skip at {steps} steps; check the params file or raise thresh",
                stacklevel=3,
            )
        return output

    def _whole_request(self, *per_expert: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], ...]:
        """Per-branch telemetry of the whole request (each argument: expert -> branch -> value):
        under CFG-parallel each rank knows only its own branch, so the cfg pair exchanges theirs
        (SP ranks took the same decisions, checked)."""
        group = self.parallel.cfg
        if group.size == 1:
            return per_expert
        parts = group.all_gather_object(per_expert, self.parallel.device, op="cfg all_gather (request telemetry)")
        merged: tuple[dict, ...] = tuple({} for _ in per_expert)
        for part in parts:
            for whole, mine in zip(merged, part):
                for expert, per_branch in mine.items():
                    whole.setdefault(expert, {}).update(per_branch)
        return merged
