"""Quality/speed benchmark: ditcache's AdaTaylorCache against its peers, on the same model and sampler.

Every method runs on the bundled reference model (and its two-expert Wan2.2-style variant) with the
same weights, prompts, seeds, initial noise, flow-matching Euler schedule (ditcache's), CFG and
decoding; the uncached output of the same process is the reference. Each method is swept over its
own knob, so it draws a curve, not a point:

    ditcache-ada_taylor-o{0,1,2}      AdaTaylorCache, curve calibrated here; thresh x K x retention
                                      (x taylor_threshold 1..3 for orders 1 and 2)
    ditcache-ada_taylor-o1-wancurve   the same rule with the published Wan curve (resampled)
    taylorseer-interval-o{1,2}        TaylorSeer's fixed-interval rule at the block-stack level
    teacache                          TeaCache's rule, its polynomial fitted on the calibration run
    diffusers-fbc                     diffusers FirstBlockCache hook (threshold)
    diffusers-magcache[-wancurve]     diffusers MagCache hook (same curve; threshold x K x retention)
    diffusers-taylorseer-o{1,2}       diffusers TaylorSeer hook, block-level identifiers (interval)

ditcache's caches and the re-implemented rules run through ditcache's Wan adapter; diffusers' hooks
through the diffusers forward of the same ``WanTransformer3DModel``, one call per CFG branch inside
``cache_context("cond"|"uncond")``. All of them go through one sampling loop (:func:`sample`), which
takes a "predict velocity for this branch" callable.

Metrics per run: block-stack passes (counted by forward hooks on every block's feed-forward network,
which only runs when the block really runs), wall-clock speedup against the uncached run (methods
interleaved, ``--reps`` repeats, minimum quoted), PSNR pooled over all samples and mean per image,
SSIM (torchmetrics) against the uncached samples, and class accuracy by a small CNN trained on the
same MNIST digits. Calibration (MagCache curve, TeaCache polynomial) uses seeds disjoint from the
evaluation seeds.

    python bench/quality.py --update-doc    # full run (100 samples per model), writes bench/results/ and
                                            # the table block of docs/benchmarks.md
    python bench/quality.py --efficiency-check   # then: order 1 at its matched settings vs uncached, 100 samples
    python bench/quality.py --quick         # reduced grid, 20 samples, reference model only (~2 min)
    python bench/quality.py --smoke --out-json /tmp/q.json --no-plot   # tiny end-to-end check (~15 s)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ditcache.cache import AdaTaylorCache, Calibrator  # noqa: E402
from ditcache.cache.base import BaseFeatureCache  # noqa: E402
from ditcache.params import load_params, params_from_dict  # noqa: E402
from ditcache.runtime.loading import load_model_dir  # noqa: E402
from ditcache.runtime.pipeline import pipeline_for  # noqa: E402
from ditcache.cache.schedule import resample_nearest  # noqa: E402
from ditcache.runtime.scheduler import flow_match_schedule  # noqa: E402

import peers  # noqa: E402

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
PSNR_CAP_DB = 100.0  # identical images (the uncached row) report this instead of +inf (strict JSON)
EVAL_SEED_BASE = 1_000_000  # sample i uses seed EVAL_SEED_BASE + i, class i % 10
CALIB_SEED_BASE = 2_000_000  # calibration sample j uses seed CALIB_SEED_BASE + j: disjoint by construction
# The published curve the schedule rules also run with (resampled to the run's steps).
WAN_CURVES = {"reference-digits": "Wan2.1-T2V-1.3B"}
TABLE_BEGIN, TABLE_END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


# =============================================================================================
# Workload: model, schedule, prompts, noise
# =============================================================================================


@dataclass
class Workload:
    """One model with its sampler: everything but the prompts and the noise."""

    name: str
    model_dir: Path
    pipeline: Any
    transformers: dict[str, torch.nn.Module]
    text_encoder: Any
    schedule: Any
    experts: list[str]  # expert per step
    guidance: float
    latent_shape: tuple[int, ...]  # one sample, without the batch dim
    num_layers: int

    @property
    def steps(self) -> int:
        return self.schedule.num_steps

    def first_step(self, expert: str) -> int:
        return self.experts.index(expert)

    def used_experts(self) -> list[str]:
        return list(dict.fromkeys(self.experts))


@dataclass
class Batch:
    """Prompts (class labels) and initial noise of a set of samples, one seed per sample."""

    labels: list[int]
    seeds: list[int]
    cond: torch.Tensor
    uncond: torch.Tensor
    noise: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def draw_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """One sample per seed, drawn exactly as ``WanPipeline`` draws a batch of one with that seed."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(s)) for s in seeds])


def make_workload(model_dir: Path, name: str, steps: int, shift: float, guidance: float) -> Workload:
    loaded = load_model_dir(model_dir)
    pipeline = pipeline_for(loaded)
    schedule = flow_match_schedule(steps, shift)
    experts = pipeline._experts_per_step(schedule)  # the pipeline's own expert switch (Wan2.2 boundary)
    settings = loaded.settings
    shape = pipeline._latent_shape(1, settings.height, settings.width, settings.num_frames)[1:]
    num_layers = len(loaded.transformers["transformer"].blocks)
    return Workload(name, model_dir, pipeline, dict(loaded.transformers), loaded.text_encoder, schedule, experts,
                    guidance, tuple(shape), num_layers)  # fmt: skip


def make_batch(work: Workload, labels: list[int], seeds: list[int]) -> Batch:
    from ditcache.runtime.reference import prompt_for_label

    with torch.inference_mode():
        cond = work.text_encoder.encode([prompt_for_label(k) for k in labels]).float()
        uncond = work.text_encoder.encode([""] * len(labels)).float()
    return Batch(list(labels), list(seeds), cond, uncond, draw_noise(seeds, work.latent_shape))


def sub_batch(batch: Batch, n: int) -> Batch:
    return Batch(batch.labels[:n], batch.seeds[:n], batch.cond[:n], batch.uncond[:n], batch.noise[:n])


# =============================================================================================
# Counting real block executions
# =============================================================================================


class BlockCounter:
    """Counts real block executions with forward hooks on each block's feed-forward network.

    A hook on the block module itself would also fire when a diffusers cache hook replaces the
    block's forward and returns a cached value; the FFN inside runs only when the block really does.
    """

    def __init__(self) -> None:
        self.count = 0
        self._handles: dict[int, Any] = {}

    def attach(self, transformer: torch.nn.Module) -> None:
        if id(transformer) in self._handles:
            return
        handles = [block.ffn.register_forward_hook(self._hook) for block in transformer.blocks]
        self._handles[id(transformer)] = handles

    def _hook(self, module, args, output) -> None:
        self.count += 1


# =============================================================================================
# One sampling loop for every method
# =============================================================================================

Predict = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, bool, int], torch.Tensor]


def sample(work: Workload, batch: Batch, predict: Predict, counter: BlockCounter) -> tuple[torch.Tensor, dict[str, int]]:
    """Euler + CFG over ``work.schedule``; ``predict(expert, x, t, emb, is_cond, step)`` gives a velocity.

    Mirrors ``WanPipeline._denoise`` (fp32 latents, model input in the model dtype, fp32 velocities,
    ``v_u + g (v_c - v_u)``, ``schedule.step``). Returns the decoded frames and block calls per branch.
    """
    latents = batch.noise.clone()
    size = latents.shape[0]
    calls = {"cond": 0, "uncond": 0}
    for step in range(work.steps):
        expert = work.experts[step]
        t = work.schedule.timesteps[step].expand(size)
        model_input = latents.to(work.transformers[expert].dtype)
        before = counter.count
        velocity = predict(expert, model_input, t, batch.cond, True, step).float()
        calls["cond"] += counter.count - before
        if work.guidance > 1.0:
            before = counter.count
            uncond = predict(expert, model_input, t, batch.uncond, False, step).float()
            calls["uncond"] += counter.count - before
            velocity = uncond + work.guidance * (velocity - uncond)
        latents = work.schedule.step(latents, velocity, step)
    return work.pipeline._decode(latents), calls


class Runner:
    """One method at one setting: ``reset()`` before a request, ``predict`` per branch and step."""

    method: str
    setting: dict

    def reset(self) -> None:
        pass

    def predict(self, expert, x, t, emb, is_cond, step):  # pragma: no cover - interface
        raise NotImplementedError

    def telemetry(self) -> dict:
        return {}


class AdapterRunner(Runner):
    """ditcache's adapter with a per-expert cache (None = uncached) and an optional custom forward."""

    def __init__(self, work: Workload, method: str, setting: dict, caches: dict[str, BaseFeatureCache | None], forward=None):
        self.work, self.method, self.setting, self.caches = work, method, setting, caches
        self.adapters = work.pipeline.adapters
        self.forward = forward

    def reset(self) -> None:
        for cache in {id(c): c for c in self.caches.values() if c is not None}.values():
            cache.reset()

    def predict(self, expert, x, t, emb, is_cond, step):
        adapter, cache = self.adapters[expert], self.caches.get(expert)
        if self.forward is not None:
            return self.forward(adapter, x, t, emb, is_cond=is_cond, cache=cache)
        return adapter(x, t, emb, is_cond=is_cond, cache=cache)

    def telemetry(self) -> dict:
        out = {}
        for expert, cache in self.caches.items():
            if cache is None:
                continue
            stats = cache.stats()
            out[expert] = {
                branch: {k: v for k, v in s.items() if k in ("num_computed", "num_skipped", "computed_steps")}
                for branch, s in stats.items()
            }
        return out


class DiffusersRunner(Runner):
    """The diffusers forward of (hooked copies of) the transformers, one ``cache_context`` per branch."""

    def __init__(self, work: Workload, method: str, setting: dict, models: dict[str, torch.nn.Module], hooked: bool):
        self.work, self.method, self.setting, self.models, self.hooked = work, method, setting, models, hooked

    def reset(self) -> None:
        if self.hooked:
            for model in self.models.values():
                model._reset_stateful_cache()

    def predict(self, expert, x, t, emb, is_cond, step):
        model = self.models[expert]
        if not self.hooked:
            return model(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        context = dict(step_index=step, num_inference_steps=self.work.steps, sigma=float(self.work.schedule.sigmas[step]))
        with model.cache_context("cond" if is_cond else "uncond", **context):
            return model(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]


# =============================================================================================
# Calibration (disjoint seeds): MagCache curve + TeaCache polynomial
# =============================================================================================


@dataclass
class Calibration:
    params: Any  # CacheParams measured here
    teacache_coefficients: list[float]
    teacache_points: int
    result: dict
    seconds: float


def calibrate(work: Workload, batch: Batch, model_name: str) -> Calibration:
    """One calibration pass: ditcache's Calibrator (shared by both experts, SPEC 1.2) for the curve, and
    TeaCache's (input change, output change) pairs per branch for its polynomial."""
    start = time.perf_counter()
    calibrator = Calibrator(work.steps, sigma_shift=work.schedule.shift, model_name=model_name,
                            sigmas=work.schedule.sigmas[:-1].tolist())  # fmt: skip
    calibrator.reset()
    prev: dict[tuple[str, bool], tuple[torch.Tensor, torch.Tensor]] = {}
    xs, ys = [], []
    adapters = work.pipeline.adapters

    def predict(expert, x, t, emb, is_cond, step):
        velocity, state = peers.cached_stack_forward(adapters[expert], x, t, emb, is_cond=is_cond, cache=calibrator)
        temb = state.block_kwargs["temb"]
        key = (expert, is_cond)
        if key in prev:  # consecutive steps of the same expert only (no pair across the switch)
            xs.append(peers.relative_l1(temb, prev[key][0]))
            ys.append(peers.relative_l1(velocity, prev[key][1]))
        prev[key] = (temb, velocity)
        return velocity

    with torch.inference_mode():
        sample(work, batch, predict, BlockCounter())
    result = calibrator.result()
    params = params_from_dict(result, source=f"<calibration of {model_name}>")
    coefficients = peers.fit_teacache_polynomial(xs, ys)
    return Calibration(params, coefficients, len(xs), result, time.perf_counter() - start)


# =============================================================================================
# Method grids
# =============================================================================================


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


def _plan_of(work: Workload, caches: dict[str, BaseFeatureCache]) -> tuple:
    """Per expert and branch, the planned compute steps among the steps that expert runs."""
    plan = []
    for e, c in caches.items():
        own = {s for s, x in enumerate(work.experts) if x == e}
        plan.append((e, tuple(s for s in c.planned_compute_steps(True) if s in own),
                     tuple(s for s in c.planned_compute_steps(False) if s in own)))  # fmt: skip
    return tuple(plan)


def _plan_speedup(work: Workload, plan: tuple) -> float:
    passes = sum(len(cond) + len(uncond) for _, cond, uncond in plan)
    return 2 * work.steps / passes


def _max_elapsed(plan: tuple) -> int:
    """Longest distance from a skipped step back to its last computed step, over experts and branches."""
    worst = 0
    for _, *branches in plan:
        for computed in branches:
            computed = sorted(computed)
            for a, b in zip(computed, computed[1:]):
                worst = max(worst, b - a - 1)
    return worst


def ada_caches(work: Workload, params, n_derivatives: int, taylor_threshold: int) -> dict[str, AdaTaylorCache]:
    """One AdaTaylorCache per expert (the low-noise one counting from its first step), as Wan22Pipeline builds them."""
    return {
        e: AdaTaylorCache(params=params, num_inference_steps=work.steps, n_derivatives=n_derivatives,
                          taylor_threshold=taylor_threshold, init_step=work.first_step(e))  # fmt: skip
        for e in work.used_experts()
    }


def with_settings(params, **changes):
    from dataclasses import replace

    return replace(params, **changes)


class RunnerSet:
    """The runners of one model, de-duplicated by what they would actually do."""

    def __init__(self, work: Workload, speedup_range: tuple[float, float]) -> None:
        self.work = work
        self.range = speedup_range
        self.runners: list[Runner] = []
        self.seen: set = set()

    def add(self, runner: Runner, key, ideal: float | None = None) -> Runner | None:
        """Add unless an equivalent run exists or its (known) ideal speedup is outside the range."""
        if key in self.seen:
            return None
        if ideal is not None and not self.range[0] <= ideal < self.range[1]:
            return None
        self.seen.add(key)
        runner.key = key
        self.runners.append(runner)
        return runner

    def ada(self, params, order: int, tt: int, suffix: str = "") -> Runner | None:
        work = self.work
        plan = _plan_of(work, ada_caches(work, params, 0, 1))
        effective_tt = min(tt, max(_max_elapsed(plan), 1)) if order else 0
        setting = {"thresh": params.thresh, "K": params.K, "retention_ratio": params.retention_ratio}
        if order:
            setting["taylor_threshold"] = tt
        if suffix:
            setting["curve"] = params.model_type
        key = ("ours", suffix, order, effective_tt, plan)
        if key in self.seen:
            return None
        runner = AdapterRunner(work, f"ditcache-ada_taylor-o{order}{suffix}", setting, ada_caches(work, params, order, tt))
        runner.params, runner.order, runner.suffix = params, order, suffix
        return self.add(runner, key, _plan_speedup(work, plan))


def build_runners(work: Workload, calib: Calibration, grid: Grid, speedup_range: tuple[float, float]) -> RunnerSet:
    """Stage-1 grid: every method over its knob (ours and the Taylor rules at taylor_threshold 2)."""
    rs = RunnerSet(work, speedup_range)
    rs.add(AdapterRunner(work, "uncached", {}, {e: None for e in work.used_experts()}), ("uncached",))
    rs.add(DiffusersRunner(work, "diffusers-uncached", {}, work.transformers, hooked=False), ("diffusers-uncached",))

    # ditcache AdaTaylorCache order 1 on the curve calibrated here (order 0, order 2 and the other
    # taylor_thresholds run in stage 2 on the best plans), and order 1 on the published Wan curve.
    wan_params = load_params(WAN_CURVES[work.name]) if work.name in WAN_CURVES else None
    for retention in grid.ours_retention:
        for K in grid.ours_K:
            for thresh in grid.ours_thresh:
                rs.ada(with_settings(calib.params, K=K, thresh=thresh, retention_ratio=retention), 1, 2)
    if wan_params is not None and grid.wan_thresh:
        for retention in grid.wan_retention:
            for K in grid.wan_K:
                for thresh in grid.wan_thresh:
                    rs.ada(with_settings(wan_params, K=K, thresh=thresh, retention_ratio=retention), 1, 2, "-wancurve")

    # TaylorSeer's fixed-interval rule at the block-stack level.
    for order in (1, 2):
        for interval in grid.intervals:
            caches = {
                e: peers.FixedIntervalTaylorCache(work.steps, interval, order, warmup=3, init_step=work.first_step(e))
                for e in work.used_experts()
            }
            rs.add(AdapterRunner(work, f"taylorseer-interval-o{order}", {"interval": interval, "warmup": 3}, caches),
                   ("ts", order, interval))  # fmt: skip

    # TeaCache's rule with its polynomial fitted on the calibration run.
    warmup = max(1, work.steps // 10)
    for thresh in grid.teacache_thresh:
        caches = {
            e: peers.TeaCacheRule(work.steps, calib.teacache_coefficients, thresh, warmup=warmup, init_step=work.first_step(e))
            for e in work.used_experts()
        }
        rs.add(AdapterRunner(work, "teacache", {"thresh": thresh, "warmup": warmup}, caches,
                             forward=peers.teacache_forward), ("tea", thresh))  # fmt: skip

    # diffusers' hooks on (copies of) the same transformers.
    for thresh in grid.fbc_thresh:
        models = {e: peers.hooked_copy(work.transformers[e], peers.make_diffusers_config("fbc", threshold=thresh))
                  for e in work.used_experts()}  # fmt: skip
        rs.add(DiffusersRunner(work, "diffusers-fbc", {"threshold": thresh}, models, hooked=True), ("fbc", thresh))
    mag_curves = [("", calib.params.cond_mag_ratios, grid.ours_thresh, grid.ours_K, grid.ours_retention)]
    if wan_params is not None and grid.wan_thresh:
        mag_curves.append(("-wancurve", resample_nearest(wan_params.cond_mag_ratios, work.steps), grid.wan_thresh,
                           grid.wan_K, grid.wan_retention))  # fmt: skip
    for suffix, curve, thresholds, Ks, retentions in mag_curves:
        for retention in retentions:
            for K in Ks:
                for thresh in thresholds:
                    configs, plan = {}, []
                    for e in work.used_experts():
                        steps_e = [s for s, x in enumerate(work.experts) if x == e]
                        # Each expert's hook counts its own steps from 0: give it its slice of the curve.
                        ratios = [curve[s] for s in steps_e]
                        configs[e] = dict(threshold=thresh, max_skip_steps=K, retention_ratio=retention,
                                          num_inference_steps=len(steps_e), mag_ratios=ratios)  # fmt: skip
                        plan.append(tuple(peers.diffusers_magcache_plan(ratios, len(steps_e), thresh, K, retention)))
                    key = ("mag", suffix, tuple(plan))
                    ideal = work.steps / sum(len(p) for p in plan)
                    if key in rs.seen or not rs.range[0] <= ideal < rs.range[1]:
                        continue
                    models = {e: peers.hooked_copy(work.transformers[e], peers.make_diffusers_config("magcache", **kw))
                              for e, kw in configs.items()}  # fmt: skip
                    setting = {"threshold": thresh, "max_skip_steps": K, "retention_ratio": retention}
                    if suffix:
                        setting["curve"] = WAN_CURVES[work.name]
                    runner = DiffusersRunner(work, f"diffusers-magcache{suffix}", setting, models, hooked=True)
                    runner.schedule_settings = {"thresh": thresh, "K": K, "retention_ratio": retention}
                    rs.add(runner, key)
    for order in (1, 2):
        for interval in grid.intervals:
            cfg = dict(cache_interval=interval, max_order=order, disable_cache_before_step=3)
            models = {e: peers.hooked_copy(work.transformers[e], peers.make_diffusers_config("taylorseer", **cfg))
                      for e in work.used_experts()}  # fmt: skip
            setting = {"cache_interval": interval, "disable_cache_before_step": 3, "cache_identifiers": "blocks.N"}
            rs.add(DiffusersRunner(work, f"diffusers-taylorseer-o{order}", setting, models, hooked=True),
                   ("dts", order, interval))  # fmt: skip
    return rs


# =============================================================================================
# Metrics
# =============================================================================================


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-30)), torch.full_like(mse, PSNR_CAP_DB)).clamp(max=PSNR_CAP_DB)


def quality_metrics(images: torch.Tensor, reference: torch.Tensor, classifier, labels: torch.Tensor) -> dict:
    """PSNR pooled / mean per image, SSIM, accuracy; images [B, 1, H, W] in [0, 1]."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    err = (images.double() - reference.double()).pow(2)
    pooled = psnr_from_mse(err.mean())
    per_image = psnr_from_mse(err.flatten(1).mean(1))
    identical = bool(torch.equal(images, reference))
    ssim = 1.0 if identical else float(structural_similarity_index_measure(images.float(), reference.float(), data_range=1.0))
    predicted = classifier.predict(images * 2 - 1)
    return {
        "psnr": round(float(pooled), 4),
        "psnr_mean_per_image": round(float(per_image.mean()), 4),
        "psnr_min_image": round(float(per_image.min()), 4),
        "ssim": round(ssim, 6),
        "accuracy": round(float((predicted == labels).float().mean()), 4),
        "max_abs_err": round(float((images - reference).abs().max()), 6),
    }


def to_images(frames: torch.Tensor) -> torch.Tensor:
    """[B, C, F, H, W] -> [B*F, C, H, W]."""
    b, c, f, h, w = frames.shape
    return frames.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


# =============================================================================================
# The benchmark
# =============================================================================================


@dataclass
class RunRecord:
    runner: Runner
    times: list[float] = field(default_factory=list)  # timing-batch repeats, wall clock
    cpu_times: list[float] = field(default_factory=list)  # the same repeats, process CPU time
    full_batch_s: float | None = None  # the quality run's own wall time (one run)
    frames: torch.Tensor | None = None
    calls: dict | None = None
    telemetry: dict | None = None


def attach_counter(work: Workload, runners: list[Runner]) -> BlockCounter:
    counter = BlockCounter()
    for model in work.transformers.values():
        counter.attach(model)
    for r in runners:
        if isinstance(r, DiffusersRunner):
            for m in r.models.values():
                counter.attach(m)
    return counter


def quality_pass(work: Workload, batch: Batch, records: list[RunRecord], counter: BlockCounter, log, what: str) -> None:
    """Every run once on ``batch``; keeps frames, block calls, telemetry and the wall time."""
    t_all = time.perf_counter()
    with torch.inference_mode():
        for n, rec in enumerate(records):
            rec.runner.reset()
            t0 = time.perf_counter()
            rec.frames, rec.calls = sample(work, batch, rec.runner.predict, counter)
            rec.full_batch_s = time.perf_counter() - t0
            rec.telemetry = rec.runner.telemetry()
            if (n + 1) % 20 == 0:
                log(f"  {what}: {n + 1}/{len(records)} runs, {time.perf_counter() - t_all:.0f} s")
    log(f"  {what}: {len(records)} runs on {len(batch)} samples in {time.perf_counter() - t_all:.1f} s")


def timing_pass(work: Workload, batch: Batch, records: list[RunRecord], counter: BlockCounter, reps: int, log) -> None:
    """``reps`` repeats over every run, interleaved in a fresh shuffled order each repeat."""
    rng = random.Random(12345)
    with torch.inference_mode():
        for rep in range(reps):
            order = list(range(len(records)))
            rng.shuffle(order)
            t_rep = time.perf_counter()
            for i in order:
                rec = records[i]
                rec.runner.reset()
                c0, t0 = time.process_time(), time.perf_counter()
                sample(work, batch, rec.runner.predict, counter)
                rec.times.append(time.perf_counter() - t0)
                rec.cpu_times.append(time.process_time() - c0)
            log(f"  timing rep {rep + 1}/{reps} ({len(batch)} samples): {time.perf_counter() - t_rep:.1f} s")


def rows_of(work: Workload, batch: Batch, records: list[RunRecord], classifier) -> list[dict]:
    base = records[0]
    assert base.runner.method == "uncached"
    reference = to_images(base.frames)
    labels = torch.tensor(batch.labels)
    base_calls = sum(base.calls.values())
    base_time = min(base.times) if base.times else None
    rows = []
    for rec in records:
        calls = sum(rec.calls.values())
        cf = calls / base_calls
        row = {
            "model": work.name,
            "method": rec.runner.method,
            "setting": rec.runner.setting,
            "compute_fraction": round(cf, 5),
            "ideal_speedup": round(1 / cf, 4) if cf else None,
        }
        if base_time is not None:
            speedup = base_time / min(rec.times)
            speedup_cpu = min(base.cpu_times) / min(rec.cpu_times)
            row |= {
                "speedup": round(speedup, 4),
                "speedup_efficiency": round(speedup * cf, 4),
                "speedup_cpu_time": round(speedup_cpu, 4),
                "speedup_efficiency_cpu_time": round(speedup_cpu * cf, 4),
            }
        row |= quality_metrics(to_images(rec.frames), reference, classifier, labels)
        row |= {
            "block_calls": calls,
            "block_calls_per_branch": rec.calls,
            "stack_passes": round(calls / work.num_layers, 3),
        }
        if rec.times:
            row |= {
                "wall_s_min": round(min(rec.times), 4),
                "wall_s_all": [round(t, 4) for t in rec.times],
                "cpu_s_min": round(min(rec.cpu_times), 4),
                "wall_s_quality_run": round(rec.full_batch_s, 3),
            }
        if rec.telemetry:
            row["plan"] = rec.telemetry
        rows.append(row)
    return rows


def band_of(ideal: float, bands: list[float]) -> int | None:
    return next((i for i in range(len(bands) - 1) if bands[i] <= ideal < bands[i + 1]), None)


def best_per_band(screen_rows: list[dict], runners: list[Runner], bands: list[float]) -> dict:
    """{(method, band): (psnr, runner)}: per method and band of ideal speedup, the best screening PSNR."""
    chosen: dict = {}
    for row, runner in zip(screen_rows, runners):
        if runner.method in ("uncached", "diffusers-uncached"):
            chosen[("base", runner.method)] = (math.inf, runner)
            continue
        band = band_of(row["ideal_speedup"] or 0, bands)
        if band is None:
            continue
        slot = (runner.method, band)
        if slot not in chosen or row["psnr"] > chosen[slot][0]:
            chosen[slot] = (row["psnr"], runner)
    return chosen


def run_model(work: Workload, calib: Calibration, screen_batch: Batch, eval_batch: Batch, grid: Grid,
              bands: list[float], classifier, reps: int, timing_samples: int, log) -> tuple[list[dict], list[dict]]:
    """Screen the grid on calibration seeds (stage 1: order 1 at taylor_threshold 2 over the plans;
    stage 2: orders 0, 1, 2 at every taylor_threshold on each band's best order-1 and MagCache
    plans), then evaluate per method and band the best screened setting on the
    evaluation seeds: quality on the whole batch, timing on its first ``timing_samples`` samples.
    Evaluation seeds play no part in choosing what is evaluated."""
    rs = build_runners(work, calib, grid, (bands[0], bands[-1]))
    counter = attach_counter(work, rs.runners)
    log(f"[{work.name}] stage-1 screening: {len(rs.runners)} settings on {len(screen_batch)} calibration-seed samples")
    screen_records = [RunRecord(r) for r in rs.runners]
    quality_pass(work, screen_batch, screen_records, counter, log, "screening")
    # Stage 2: AdaTaylorCache orders 0/1/2 (every taylor_threshold) on each band's best order-1 and MagCache plans.
    stage1_rows = rows_of(work, screen_batch, screen_records, classifier)
    extra = []
    for (method, _), (_, runner) in best_per_band(stage1_rows, rs.runners, bands).items():
        if method == "ditcache-ada_taylor-o1":  # the best order-1 plans: orders 0, 1, 2 at every taylor_threshold
            variants = [(0, 1)] + [(order, tt) for order in (1, 2) for tt in grid.taylor_thresholds]
            params = runner.params
        elif method == "diffusers-magcache":  # the best MagCache plans: ditcache's order 0 (its analogue) and 1
            variants = [(0, 1), (1, 2)]
            params = with_settings(calib.params, **runner.schedule_settings)
        elif method == "ditcache-ada_taylor-o1-wancurve":
            variants = [(1, tt) for tt in grid.taylor_thresholds]
            params = runner.params
        else:
            continue
        for order, tt in variants:
            new = rs.ada(params, order, tt, getattr(runner, "suffix", ""))
            if new is not None:
                extra.append(new)
    if extra:
        log(f"[{work.name}] stage-2 screening: {len(extra)} AdaTaylorCache variants (orders 0-2, taylor_threshold {grid.taylor_thresholds}) on the best plans")
        records2 = [RunRecord(r) for r in extra]
        quality_pass(work, screen_batch, records2, counter, log, "screening-2")
        screen_records += records2
    screen_rows = rows_of(work, screen_batch, screen_records, classifier)
    for rec in screen_records:
        rec.frames = None
    picked = {id(r) for _, r in best_per_band(screen_rows, rs.runners, bands).values()}
    chosen = [r for r in rs.runners if id(r) in picked]
    log(f"[{work.name}] evaluating {len(chosen)} settings on {len(eval_batch)} samples, timing x{reps} on {timing_samples}")
    records = [RunRecord(r) for r in chosen]
    quality_pass(work, eval_batch, records, counter, log, "evaluation")
    timing_pass(work, sub_batch(eval_batch, timing_samples), records, counter, reps, log)
    rows = rows_of(work, eval_batch, records, classifier)
    screening = [
        {k: r[k] for k in ("model", "method", "setting", "compute_fraction", "psnr", "psnr_mean_per_image", "ssim")}
        | {"evaluated": id(runner) in picked}
        for r, runner in zip(screen_rows, rs.runners)
    ]
    return rows, screening


def train_classifier(seed: int = 0, epochs: int = 4):
    from ditcache.runtime.reference import load_digits, train_digit_classifier

    images, labels = load_digits(16)
    return train_digit_classifier(images, labels, epochs=epochs, seed=seed)


# =============================================================================================
# Reporting: Pareto fronts, matched-compute table, plot
# =============================================================================================

CACHED_METHODS_ORDER = [
    "ditcache-ada_taylor-o0", "ditcache-ada_taylor-o1", "ditcache-ada_taylor-o2", "ditcache-ada_taylor-o1-wancurve",
    "taylorseer-interval-o1", "taylorseer-interval-o2", "teacache", "diffusers-fbc", "diffusers-magcache",
    "diffusers-magcache-wancurve", "diffusers-taylorseer-o1", "diffusers-taylorseer-o2",
]  # fmt: skip
MATCHED = {"2x": 2.0, "3x": 3.0}
MATCH_TOLERANCE = 0.95  # "about 2x": at least 0.95 * 2 = 1.9x fewer block passes


def is_ours(method: str) -> bool:
    return method.startswith("ditcache-")


def best_at(rows: list[dict], model: str, method: str, target: float, key: str = "ideal_speedup") -> dict | None:
    """The run of ``method`` with the best pooled PSNR among those at least ~target x faster by ``key``."""
    pool = [r for r in rows if r["model"] == model and r["method"] == method and (r[key] or 0) >= MATCH_TOLERANCE * target]
    return max(pool, key=lambda r: r["psnr"], default=None)


def matched_table(rows: list[dict], key: str = "ideal_speedup") -> dict:
    """{model: {label: {method: run}}} plus margins of ours over the best peer."""
    table: dict = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        methods = [m for m in CACHED_METHODS_ORDER if any(r["model"] == model and r["method"] == m for r in rows)]
        table[model] = {}
        for label, target in MATCHED.items():
            best = {m: best_at(rows, model, m, target, key) for m in methods}
            ours = best.get("ditcache-ada_taylor-o1")
            peer_runs = [(m, r) for m, r in best.items() if r is not None and not is_ours(m)]
            best_peer = max(peer_runs, key=lambda mr: mr[1]["psnr"], default=(None, None))
            all_runs = [(m, r) for m, r in best.items() if r is not None]
            winner = max(all_runs, key=lambda mr: mr[1]["psnr"], default=(None, None))
            table[model][label] = {
                "best": best,
                "best_peer": best_peer[0],
                "margin_db_o1_vs_best_peer": (
                    round(ours["psnr"] - best_peer[1]["psnr"], 3) if ours and best_peer[1] else None
                ),
                "winner": winner[0],
            }
    return table


def fmt_setting(setting: dict) -> str:
    short = {"retention_ratio": "r", "taylor_threshold": "tt", "thresh": "th", "threshold": "th",
             "max_skip_steps": "K", "cache_interval": "int", "interval": "int"}  # fmt: skip
    skip = {"curve", "warmup", "disable_cache_before_step", "cache_identifiers"}
    return " ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
                    for k, v in setting.items() if k not in skip)  # fmt: skip


def markdown_tables(rows: list[dict], key: str = "ideal_speedup") -> str:
    table = matched_table(rows, key)
    out = []
    basis = "block passes (ideal speedup)" if key == "ideal_speedup" else "measured wall-clock speedup"
    for model, per_label in table.items():
        out.append(f"**{model}**: best pooled PSNR of each method at >= {MATCH_TOLERANCE:g} x target by {basis}\n")
        out.append("| method | ~2x: PSNR (per-image) dB | SSIM | acc | passes | speedup | setting | ~3x: PSNR (per-image) dB | SSIM | acc | passes | speedup | setting |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for method in CACHED_METHODS_ORDER:
            if method not in per_label["2x"]["best"]:
                continue
            cells = [method]
            for label in MATCHED:
                r = per_label[label]["best"].get(method)
                if r is None:
                    cells += ["n/a (cannot reach)", "", "", "", "", ""]
                else:
                    cells += [f"{r['psnr']:.2f} ({r['psnr_mean_per_image']:.2f})", f"{r['ssim']:.4f}", f"{r['accuracy']:.2f}",
                              f"{1 / r['compute_fraction']:.2f}x", f"{r['speedup']:.2f}x", fmt_setting(r["setting"])]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        margins = []
        for label in MATCHED:
            m = per_label[label]
            margin = m["margin_db_o1_vs_best_peer"]
            margins.append(
                f"~{label}: winner {m['winner']}; ditcache o1 vs best peer ({m['best_peer']}): "
                + (f"{margin:+.2f} dB" if margin is not None else "n/a")
            )
        out.append("\n" + "; ".join(margins) + "\n")
    return "\n".join(out)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (higher x, higher y), sorted by x."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


METHOD_COLORS = {
    "ditcache-ada_taylor-o0": "#1f77b4", "ditcache-ada_taylor-o1": "#d62728", "ditcache-ada_taylor-o2": "#ff7f0e",
    "ditcache-ada_taylor-o1-wancurve": "#9467bd", "taylorseer-interval-o1": "#2ca02c", "taylorseer-interval-o2": "#98df8a",
    "teacache": "#8c564b", "diffusers-fbc": "#e377c2", "diffusers-magcache": "#7f7f7f",
    "diffusers-magcache-wancurve": "#bcbd22", "diffusers-taylorseer-o1": "#17becf", "diffusers-taylorseer-o2": "#9edae5",
}  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    """PSNR vs measured speedup (top) and vs block-pass speedup (bottom), one line per method (its Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(7.5 * len(models), 11), squeeze=False)
    for col, model in enumerate(models):
        for row_i, (key, label) in enumerate([("speedup", "measured wall-clock speedup vs uncached (x)"),
                                              ("ideal_speedup", "block-pass speedup = 1 / compute fraction (x)")]):  # fmt: skip
            ax = axes[row_i][col]
            for method in CACHED_METHODS_ORDER:
                pts = [(r[key], r["psnr"]) for r in rows if r["model"] == model and r["method"] == method]
                if not pts:
                    continue
                ours = is_ours(method)
                color = METHOD_COLORS.get(method, "black")
                ax.scatter(*zip(*pts), s=10, color=color, alpha=0.4)
                front = pareto_front(pts)
                ax.plot(*zip(*front), "-" if ours else "--", marker="o" if ours else "s", ms=4,
                        lw=2.6 if method == "ditcache-ada_taylor-o1" else 1.4, color=color, label=method)  # fmt: skip
            for target in MATCHED.values():
                ax.axvline(MATCH_TOLERANCE * target, color="k", lw=0.6, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel("PSNR vs uncached, pooled over samples (dB)")
            ax.set_title(f"{model}: PSNR vs {'measured' if key == 'speedup' else 'block-pass'} speedup")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Pareto front per method (lines); dots: every evaluated setting; dotted: 1.9x and 2.85x", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_doc(doc: Path, rows: list[dict]) -> None:
    """Replace the table between the markers in docs/benchmarks.md (written from the JSON)."""
    text = doc.read_text() if doc.exists() else ""
    tables = (
        "#### Matched by block passes (compute fraction)\n\n" + markdown_tables(rows, "ideal_speedup")
        + "\n#### Matched by measured wall-clock speedup\n\n" + markdown_tables(rows, "speedup")
    )  # fmt: skip
    block = f"{TABLE_BEGIN}\n{tables}\n{TABLE_END}"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text + "\n" + block + "\n"
    doc.write_text(text)


# =============================================================================================
# main
# =============================================================================================


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def efficiency_check(json_path: Path, reps: int, log) -> dict:
    """Time the uncached run and ditcache order 1 at its matched ~2x / ~3x settings (from a finished
    run's JSON) on the whole evaluation batch, interleaved, ``reps`` repeats; store the result in the
    JSON under "efficiency_full_batch". The curve is re-measured on the same calibration seeds
    (deterministic), and each run's block calls are checked against the JSON."""
    from ditcache.models import MODELS_DIR

    data = json.loads(json_path.read_text())
    env = data["env"]
    samples, steps = env["samples_per_model"], env["steps"]
    out: dict = {}
    for model, per_label in data["matched"]["by_block_passes"].items():
        work = make_workload(MODELS_DIR / model, model, steps, env["shift"], env["guidance_scale"])
        calib_env = env["calibration"][model]
        n_cal = calib_env["samples"]
        calib_batch = make_batch(work, [j % 10 for j in range(n_cal)], [CALIB_SEED_BASE + j for j in range(n_cal)])
        calib = calibrate(work, calib_batch, calib_env["model_type"])
        batch = make_batch(work, [i % 10 for i in range(samples)], [EVAL_SEED_BASE + i for i in range(samples)])
        runners: list[Runner] = [AdapterRunner(work, "uncached", {}, {e: None for e in work.used_experts()})]
        expected = {}
        for label, m in per_label.items():
            best = m["best"].get("ditcache-ada_taylor-o1")
            if best is None:
                continue
            st = best["setting"]
            params = with_settings(calib.params, K=st["K"], thresh=st["thresh"], retention_ratio=st["retention_ratio"])
            runner = AdapterRunner(work, "ditcache-ada_taylor-o1", st | {"matched": label},
                                   ada_caches(work, params, 1, st["taylor_threshold"]))  # fmt: skip
            runners.append(runner)
            expected[id(runner)] = best["compute_fraction"]
        records = [RunRecord(r) for r in runners]
        counter = attach_counter(work, runners)
        with torch.inference_mode():
            calls = {}
            for rec in records:
                rec.runner.reset()
                _, c = sample(work, batch, rec.runner.predict, counter)
                calls[id(rec.runner)] = sum(c.values())
        base_calls = calls[id(runners[0])]
        for r in runners[1:]:
            cf = calls[id(r)] / base_calls
            assert abs(cf - expected[id(r)]) < 1e-4, f"{model}: compute fraction {cf} != {expected[id(r)]} in the JSON"
        timing_pass(work, batch, records, counter, reps, log)
        base = records[0]
        out[model] = []
        for rec in records[1:]:
            cf = calls[id(rec.runner)] / base_calls
            sp, sp_cpu = min(base.times) / min(rec.times), min(base.cpu_times) / min(rec.cpu_times)
            out[model].append({
                "method": rec.runner.method, "setting": rec.runner.setting, "compute_fraction": round(cf, 5),
                "ideal_speedup": round(1 / cf, 4), "speedup": round(sp, 4), "speedup_efficiency": round(sp * cf, 4),
                "speedup_cpu_time": round(sp_cpu, 4), "speedup_efficiency_cpu_time": round(sp_cpu * cf, 4),
                "uncached_wall_s_min": round(min(base.times), 3), "wall_s_min": round(min(rec.times), 3),
            })  # fmt: skip
            log(f"[{model}] o1 {rec.runner.setting['matched']}: {1 / cf:.2f}x fewer passes, {sp:.3f}x measured, "
                f"efficiency {sp * cf:.3f} (cpu time {sp_cpu * cf:.3f})")  # fmt: skip
    data["efficiency_full_batch"] = {
        "what": f"uncached vs ditcache order 1 at its matched settings on all {samples} evaluation samples, "
        f"{reps} interleaved repeats, minimum",
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "models": out,
    }
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    return out


MOE_EVAL_BANDS = [1.9, 2.85, 3.3, 5.0]  # the two-expert variant: around the matched ~2x / ~3x points only
EVAL_BANDS = {
    # ideal-speedup bands: each method's best screening setting per band is evaluated
    "full": [1.5, 1.9, 2.4, 2.85, 3.3, 5.0],
    "quick": [1.9, 2.85, 5.0],
    "smoke": [1.0, 100.0],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid, 20 samples, one model")
    parser.add_argument("--smoke", action="store_true", help="tiny end-to-end check (4 samples, 10 steps, 1 rep)")
    parser.add_argument("--samples", type=int, default=None, help="evaluation samples per model (sample i is class i %% 10)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration/screening samples (other seeds)")
    parser.add_argument("--screen-samples", type=int, default=None, help="screening samples (first calibration ones)")
    parser.add_argument("--timing-samples", type=int, default=None, help="samples of the timing batch (first of the eval batch)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 50; 10 with --smoke)")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--reps", type=int, default=None, help="timing repeats, interleaved (minimum is quoted)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two OpenMP threads stall each other)")
    parser.add_argument("--models", nargs="+", default=None, help="folders under ditcache/models, or paths")
    parser.add_argument("--out-json", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--out-png", type=Path, default=RESULTS / "quality_pareto.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--update-doc", action="store_true", help=f"rewrite the table block in {DOC.relative_to(REPO)}")
    parser.add_argument("--efficiency-check", action="store_true",
                        help="only: time uncached vs ditcache order 1 at the matched settings of --out-json on the "
                        "whole evaluation batch and add the result to that JSON")  # fmt: skip
    args = parser.parse_args(argv)
    if args.efficiency_check:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        efficiency_check(args.out_json, args.reps or 3, lambda m: print(f"[{time.perf_counter() - t0:7.1f}s] {m}", flush=True))
        return 0

    from ditcache.models import MODELS_DIR

    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    grid = {"smoke": SMOKE_GRID, "quick": QUICK_GRID, "full": FULL_GRID}[mode]
    samples = args.samples or {"smoke": 4, "quick": 20, "full": 100}[mode]
    calib_n = args.calib_samples or {"smoke": 4, "quick": 10, "full": 20}[mode]
    screen_n = min(calib_n, args.screen_samples or {"smoke": 4, "quick": 10, "full": 5}[mode])
    timing_n = min(samples, args.timing_samples or {"smoke": 4, "quick": 5, "full": 10}[mode])
    reps = args.reps or {"smoke": 1, "quick": 3, "full": 5}[mode]
    steps = args.steps or (10 if args.smoke else 50)
    default_models = ["reference-digits"] if mode != "full" else ["reference-digits", "reference-digits-moe"]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {msg}", flush=True)

    model_dirs = []
    for n in args.models or default_models:
        path = MODELS_DIR / n if (MODELS_DIR / n).is_dir() or not Path(n).is_dir() else Path(n)
        model_dirs.append((path.name, path))
    labels = [i % 10 for i in range(samples)]
    eval_seeds = [EVAL_SEED_BASE + i for i in range(samples)]
    calib_labels = [j % 10 for j in range(calib_n)]
    calib_seeds = [CALIB_SEED_BASE + j for j in range(calib_n)]
    assert not set(eval_seeds) & set(calib_seeds), "calibration and evaluation seeds must be disjoint"

    classifier = train_classifier(epochs=1 if args.smoke else 4)
    log("classifier trained")
    rows: list[dict] = []
    screening: list[dict] = []
    calibrations: dict = {}
    for name, model_dir in model_dirs:
        if not (model_dir / "model_index.json").is_file():
            log(f"skipping {name}: {model_dir} has no model_index.json")
            continue
        work = make_workload(model_dir, name, steps, args.shift, args.guidance)
        calib_batch = make_batch(work, calib_labels, calib_seeds)
        model_type = work.pipeline.settings.model_type or name
        calib = calibrate(work, calib_batch, model_type)
        calibrations[name] = {
            "model_type": model_type,
            "seeds": [calib_seeds[0], calib_seeds[-1]],
            "samples": calib_n,
            "seconds": round(calib.seconds, 2),
            "cond_mag_ratios": [round(v, 5) for v in calib.params.cond_mag_ratios],
            "uncond_mag_ratios": [round(v, 5) for v in calib.params.uncond_mag_ratios],
            "teacache_coefficients": calib.teacache_coefficients,
            "teacache_points": calib.teacache_points,
        }
        log(f"[{name}] calibrated on seeds {calib_seeds[0]}..{calib_seeds[-1]} in {calib.seconds:.1f} s")
        eval_batch = make_batch(work, labels, eval_seeds)
        model_rows, model_screen = run_model(
            work, calib, sub_batch(calib_batch, screen_n), eval_batch, grid,
            MOE_EVAL_BANDS if mode == "full" and len(work.used_experts()) > 1 else EVAL_BANDS[mode],
            classifier, reps, timing_n, log,
        )
        rows += model_rows
        screening += model_screen

    wall = time.perf_counter() - started
    result = {
        "runs": rows,
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "diffusers": __import__("diffusers").__version__,
            "torchmetrics": __import__("torchmetrics").__version__,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "git_commit": git_commit(),
            "mode": mode,
            "models": [name for name, _ in model_dirs],
            "samples_per_model": samples,
            "eval_seeds": [eval_seeds[0], eval_seeds[-1]],
            "labels": "sample i is class i % 10; prompt 'a handwritten <i % 10>', negative ''",
            "steps": steps,
            "shift": args.shift,
            "guidance_scale": args.guidance,
            "timing_reps": reps,
            "timing_samples": timing_n,
            "screening_samples": screen_n,
            "timing": "wall time of the sampling loop on the first timing_samples evaluation samples; methods "
            "interleaved in a fresh shuffled order per repeat; minimum over repeats. speedup = uncached min / run min. "
            "speedup_cpu_time: the same with process CPU time (insensitive to other processes on a shared machine)",
            "selection": "every grid setting is screened on the calibration seeds; per method and per band of "
            "ideal speedup the best screening PSNR is evaluated on the evaluation seeds",
            "eval_bands_ideal_speedup": EVAL_BANDS[mode],
            "eval_bands_ideal_speedup_two_expert": MOE_EVAL_BANDS if mode == "full" else EVAL_BANDS[mode],
            "psnr_cap_db": PSNR_CAP_DB,
            "psnr": "pooled = 10 log10(1 / MSE over all samples and pixels); per image = mean of per-image PSNRs "
            "(each capped); images in [0, 1]",
            "compute_fraction": "real block executions (forward hooks on every block's FFN) / those of the uncached run",
            "calibration": calibrations,
            "wall_time_s": round(wall, 1),
        },
        "screening": screening,
    }
    if rows:
        result["matched"] = {
            "by_block_passes": _compact(matched_table(rows, "ideal_speedup")),
            "by_wall_clock": _compact(matched_table(rows, "speedup")),
        }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out_json}")
    if rows and not args.no_plot:
        plot(rows, args.out_png)
        log(f"wrote {args.out_png}")
    if rows and args.update_doc:
        update_doc(DOC, rows)
        log(f"updated {DOC}")
    if rows:
        print(markdown_tables(rows))
    log(f"done in {wall:.1f} s")
    return 0


def _compact(table: dict) -> dict:
    out: dict = {}
    for model, per_label in table.items():
        out[model] = {}
        for label, m in per_label.items():
            out[model][label] = {
                "winner": m["winner"],
                "best_peer": m["best_peer"],
                "margin_db_o1_vs_best_peer": m["margin_db_o1_vs_best_peer"],
                "best": {
                    method: None if r is None else {k: r[k] for k in ("setting", "psnr", "psnr_mean_per_image", "ssim",
                                                                        "accuracy", "compute_fraction", "speedup")}
                    for method, r in m["best"].items()
                },  # fmt: skip
            }
    return out


if __name__ == "__main__":
    raise SystemExit(main())
