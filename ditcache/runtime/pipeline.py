"""Text-to-video/image pipelines for Wan2.1 (one transformer) and Wan2.2 A14B (two experts).

Per denoising step the conditional and the unconditional branch are two separate adapter calls, each
with ``is_cond`` set, because a feature cache keeps per-branch state (curve, counter, residuals);
with guidance off the unconditional branch never runs. Every request starts from a reset cache, so
back-to-back requests give the same result as fresh ones.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ditcache.cache.base import BaseFeatureCache, NoCache, branch_name
from ditcache.errors import ParamsError, StepSyncError
from ditcache.runtime.adapters import FamilyAdapter, adapter_for
from ditcache.runtime.loading import LoadedModel, ModelSettings, load_model_dir
from ditcache.runtime.scheduler import FlowMatchSchedule, flow_match_schedule
from ditcache.runtime.text_encoders import TextEncoder

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"


@dataclass
class GenerationOutput:
    """Result and telemetry of one request.

    ``frames`` is ``[B, C, F, H, W]`` float in [0, 1]. ``cache_stats`` and ``stack_passes`` are keyed
    by expert ("transformer", and "transformer_2" for Wan2.2) and then by branch ("cond", "uncond");
    ``stack_passes`` counts real block-stack runs, ``branch_steps`` the steps each branch was asked for.
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

    def total_stack_passes(self) -> dict[str, int]:
        """Block-stack runs per branch, summed over experts."""
        totals: dict[str, int] = {name: 0 for name in self.branch_steps}
        for per_branch in self.stack_passes.values():
            for name, count in per_branch.items():
                totals[name] = totals.get(name, 0) + count
        return totals

    def summary(self) -> str:
        """One line: steps computed/skipped per branch, block passes saved, wall time."""
        passes = self.total_stack_passes()
        parts = [
            f"{name}: {passes[name]} computed / {steps - passes[name]} skipped"
            for name, steps in self.branch_steps.items()
        ]
        asked, ran = sum(self.branch_steps.values()), sum(passes.values())
        ratio = f", {asked / ran:.2f}x fewer" if ran else ""
        return (
            f"{len(self.timesteps)} steps | {' | '.join(parts)} | block passes {ran}/{asked} "
            f"(saved {asked - ran}{ratio}) | {self.wall_time_s:.2f} s"
        )


@dataclass
class _Request:
    """A validated request: what the denoising loop needs, nothing else."""

    prompts: list[str]
    negative_prompts: list[str]
    schedule: FlowMatchSchedule
    guidance_scale: float
    seed: int
    latent_shape: tuple[int, ...]
    experts: list[str]  # expert name per step
    caches: dict[str, BaseFeatureCache | None] = field(default_factory=dict)

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


def _as_prompt_list(prompt: str | list[str], what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ParamsError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


class WanPipeline:
    """Wan2.1 text-to-video (or text-to-image with ``num_frames=1``) with a feature cache.

    ``latent_space`` "pixel" (no VAE: the model denoises pixels in [-1, 1]; decoding is a clamp) or
    "vae" (AutoencoderKLWan latents) comes from the model directory's settings.
    """

    expert_names: tuple[str, ...] = (HIGH_NOISE,)

    def __init__(
        self,
        transformers: Mapping[str, torch.nn.Module],
        text_encoder: TextEncoder,
        settings: ModelSettings,
        vae: torch.nn.Module | None = None,
    ) -> None:
        missing = [name for name in self.expert_names if name not in transformers]
        if missing:
            raise ParamsError(f"{type(self).__name__} needs the parts {list(self.expert_names)}; missing {missing}")
        self.adapters: dict[str, FamilyAdapter] = {name: adapter_for(transformers[name]) for name in self.expert_names}
        for name, adapter in self.adapters.items():
            if adapter.family != "wan":
                raise ParamsError(f"{type(self).__name__} runs Wan transformers; {name} is a {adapter.family} model")
        if settings.latent_space == "vae" and vae is None:
            raise ParamsError("latent_space 'vae' needs a vae; pass one or use a pixel-space model")
        self.text_encoder = text_encoder
        self.settings = settings
        self.vae = vae

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> "WanPipeline":
        extra = sorted(set(loaded.transformers) - set(cls.expert_names))
        if extra:
            raise ParamsError(
                f"{loaded.path} has the experts {extra} that {cls.__name__} would ignore; "
                "use Wan22Pipeline (or load_pipeline, which picks the class)"
            )
        return cls(loaded.transformers, loaded.text_encoder, loaded.settings, loaded.vae)

    @classmethod
    def from_pretrained(
        cls, model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> "WanPipeline":
        """Load a local diffusers-format directory (see ``ditcache.runtime.loading``)."""
        return cls.from_loaded(load_model_dir(model_dir, device=device, dtype=dtype))

    # -- geometry ---------------------------------------------------------------------------------

    @property
    def _model(self) -> torch.nn.Module:
        return self.adapters[self.expert_names[0]].transformer

    def _scale_factors(self) -> tuple[int, int]:
        """(temporal, spatial) downsampling from pixels to the transformer's input grid."""
        if self.vae is None:
            return 1, 1
        return int(self.vae.config.scale_factor_temporal), int(self.vae.config.scale_factor_spatial)

    def _latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        config = self._model.config
        if config.in_channels != config.out_channels:
            raise ParamsError(
                f"this transformer takes {config.in_channels} input channels but predicts {config.out_channels}: "
                "an image-conditioned (I2V/FL2V) checkpoint, which this text-to-video pipeline cannot drive"
            )
        p_t, p_h, p_w = config.patch_size
        s_t, s_s = self._scale_factors()
        for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamsError(f"{name} must be a positive integer, got {value!r}")
        for name, value, multiple in (("height", height, s_s * p_h), ("width", width, s_s * p_w)):
            if value % multiple:
                raise ParamsError(
                    f"{name}={value} is not divisible by {multiple} (spatial scale {s_s} x patch size {multiple // s_s})"
                )
        if (num_frames - 1) % s_t:
            raise ParamsError(f"num_frames - 1 must be divisible by the VAE's temporal scale {s_t}, got {num_frames}")
        latent_frames = (num_frames - 1) // s_t + 1
        if latent_frames % p_t:
            raise ParamsError(f"{latent_frames} latent frames are not divisible by the temporal patch size {p_t}")
        return (batch, config.in_channels, latent_frames, height // s_s, width // s_s)

    # -- experts and caches -----------------------------------------------------------------------

    def _experts_per_step(self, schedule: FlowMatchSchedule) -> list[str]:
        return [HIGH_NOISE] * schedule.num_steps

    def _build_caches(
        self,
        experts: list[str],
        schedule: FlowMatchSchedule,
        feature_cache: BaseFeatureCache | Mapping[str, BaseFeatureCache] | None,
        calibrator: BaseFeatureCache | None,
        ada_taylor: dict[str, Any] | None,
    ) -> dict[str, BaseFeatureCache | None]:
        """One cache per expert that runs; see ``__call__`` for the precedence of the arguments."""
        num_steps = schedule.num_steps
        used = list(dict.fromkeys(experts))
        first_step = {name: experts.index(name) for name in used}
        if calibrator is not None:
            if feature_cache is not None:
                raise ParamsError("pass either feature_cache= or calibrator=, not both")
            calibrated_steps = getattr(calibrator, "num_inference_steps", num_steps)
            if calibrated_steps != num_steps:
                raise ParamsError(
                    f"the calibrator was built for {calibrated_steps} steps but the request has {num_steps}"
                )
            # One object for every expert: its curve spans the expert switch.
            return {name: calibrator for name in used}
        if feature_cache is not None:
            return self._user_caches(feature_cache, used)
        if ada_taylor is None:
            # NoCache has no residual to carry across an expert switch, so one counter spans all experts.
            no_cache = NoCache()
            return {name: no_cache for name in used}
        from ditcache.cache.factory import create_feature_cache

        # The run's sigmas let the cache resample a curve by noise level rather than by step index.
        sigmas = schedule.sigmas[:-1].tolist()
        return {
            name: create_feature_cache(
                "ada_taylor", num_inference_steps=num_steps, init_step=first_step[name], sigmas=sigmas, **ada_taylor
            )
            for name in used
        }

    def _user_caches(
        self, feature_cache: BaseFeatureCache | Mapping[str, BaseFeatureCache], used: list[str]
    ) -> dict[str, BaseFeatureCache]:
        if isinstance(feature_cache, BaseFeatureCache):
            return {name: feature_cache for name in used}
        raise ParamsError(f"feature_cache must be a BaseFeatureCache, got {type(feature_cache).__name__}")

    # -- the request ------------------------------------------------------------------------------

    def _prepare(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        sigma_shift: float | None,
        seed: int,
        height: int | None,
        width: int | None,
        num_frames: int | None,
    ) -> _Request:
        settings = self.settings
        prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise ParamsError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts: pass one negative "
                    "prompt (used for all) or one per prompt"
                )
        steps = settings.default_steps if num_inference_steps is None else num_inference_steps
        shift = settings.default_shift if sigma_shift is None else sigma_shift
        guidance = settings.default_guidance_scale if guidance_scale is None else guidance_scale
        if not isinstance(guidance, (int, float)) or guidance != guidance:
            raise ParamsError(f"guidance_scale must be a number, got {guidance!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ParamsError(f"seed must be an integer, got {seed!r}")
        schedule = flow_match_schedule(steps, shift)
        shape = self._latent_shape(
            len(prompts),
            settings.height if height is None else height,
            settings.width if width is None else width,
            settings.num_frames if num_frames is None else num_frames,
        )
        return _Request(prompts, negatives, schedule, float(guidance), seed, shape, self._experts_per_step(schedule))

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sigma_shift: float | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        enable_ada_taylor_cache: bool = True,
        ada_taylor_n_derivatives: int = 1,
        ada_taylor_taylor_threshold: int = 2,
        model_type: str | None = None,
        feature_cache: BaseFeatureCache | Mapping[str, BaseFeatureCache] | None = None,
        calibrator: BaseFeatureCache | None = None,
        progress: bool = True,
    ) -> GenerationOutput:
        """Generate one sample per prompt.

        Unset sampling arguments take the model directory's defaults. The cache is, in order of
        precedence: ``calibrator`` (measures, never skips; shared by all experts), ``feature_cache``
        (any BaseFeatureCache), an AdaTaylorCache built from ``model_type``'s params when
        ``enable_ada_taylor_cache``, else none. ``guidance_scale <= 1`` runs no unconditional pass.
        """
        start = time.perf_counter()
        request = self._prepare(
            prompt, negative_prompt, num_inference_steps, guidance_scale, sigma_shift, seed, height, width, num_frames
        )
        ada_taylor = None
        if enable_ada_taylor_cache and calibrator is None and feature_cache is None:
            resolved_type = model_type or self.settings.model_type
            if resolved_type is None:
                raise ParamsError(
                    "enable_ada_taylor_cache needs model_type= (no params model_type in the model directory)"
                )
            ada_taylor = dict(
                model_type=resolved_type,
                n_derivatives=ada_taylor_n_derivatives,
                taylor_threshold=ada_taylor_taylor_threshold,
            )
        request.caches = self._build_caches(request.experts, request.schedule, feature_cache, calibrator, ada_taylor)
        for cache in {id(c): c for c in request.caches.values() if c is not None}.values():
            cache.reset()
        for adapter in self.adapters.values():
            adapter.reset_counters()

        latents = self._denoise(request, progress)
        frames = self._decode(latents)
        return self._report(request, frames, time.perf_counter() - start, enabled=ada_taylor is not None)

    def _encode(self, prompts: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(device=device, dtype=dtype)

    def _denoise(self, request: _Request, progress: bool) -> torch.Tensor:
        model = self._model
        device, dtype = model.device, model.dtype
        cond_emb = self._encode(request.prompts, dtype, device)
        uncond_emb = self._encode(request.negative_prompts, dtype, device) if request.do_cfg else None

        # Noise is drawn on the CPU so a seed gives the same sample on every device.
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = torch.randn(request.latent_shape, generator=generator, dtype=torch.float32).to(device)
        batch = latents.shape[0]
        schedule = request.schedule
        for step in tqdm(range(schedule.num_steps), desc="denoising", disable=not progress):
            expert = request.experts[step]
            adapter, cache = self.adapters[expert], request.caches[expert]
            timestep = schedule.timesteps[step].to(device).expand(batch)
            model_input = latents.to(dtype)
            velocity = adapter(model_input, timestep, cond_emb, is_cond=True, cache=cache).float()
            self._check_step(cache, expert, True, step)
            if request.do_cfg:
                uncond = adapter(model_input, timestep, uncond_emb, is_cond=False, cache=cache).float()
                self._check_step(cache, expert, False, step)
                velocity = uncond + request.guidance_scale * (velocity - uncond)
            latents = schedule.step(latents, velocity, step)
        return latents

    @staticmethod
    def _check_step(cache: BaseFeatureCache | None, expert: str, is_cond: bool, step: int) -> None:
        """A cache that counts steps must count the global step, or its plan is applied off by some."""
        reported = -1 if cache is None else cache.current_step(is_cond)
        if reported not in (-1, step):
            raise StepSyncError(
                f"{expert}'s cache counts {branch_name(is_cond)} step {reported} while the pipeline is at step "
                f"{step}: a cache used from a later step on must start counting there (init_step), and "
                "every step must consult the cache exactly once per branch"
            )

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> frames in [0, 1]; in pixel space the sample already is the image in [-1, 1]."""
        if self.vae is None:
            sample = latents
        else:
            config = self.vae.config
            view = (1, config.z_dim, 1, 1, 1)
            mean = torch.tensor(config.latents_mean, device=latents.device).view(view)
            std = torch.tensor(config.latents_std, device=latents.device).view(view)
            sample = self.vae.decode((latents * std + mean).to(self.vae.dtype), return_dict=False)[0]
        return (sample.float() / 2 + 0.5).clamp(0, 1).cpu()

    def _report(self, request: _Request, frames: torch.Tensor, wall: float, enabled: bool) -> GenerationOutput:
        branches = ["cond", "uncond"] if request.do_cfg else ["cond"]
        steps = request.schedule.num_steps
        expert_steps = {name: [s for s, e in enumerate(request.experts) if e == name] for name in self.adapters}
        output = GenerationOutput(
            frames=frames,
            cache_stats={n: c.stats() for n, c in request.caches.items() if c is not None},
            stack_passes={n: dict(a.stack_passes) for n, a in self.adapters.items() if expert_steps[n]},
            branch_steps={name: steps for name in branches},
            expert_steps=expert_steps,
            cache_memory_bytes={n: c.memory_bytes() for n, c in request.caches.items() if c is not None},
            sigmas=request.schedule.sigmas.tolist(),
            timesteps=request.schedule.timesteps.tolist(),
            wall_time_s=wall,
        )
        if enabled and output.total_stack_passes() == output.branch_steps:
            warnings.warn(
                "AdaTaylorCache is enabled but skipped no step: the params' thresh/K/retention_ratio allow no "
                f"skip at {steps} steps; check the params file or raise thresh",
                stacklevel=3,
            )
        return output


class Wan22Pipeline(WanPipeline):
    """Wan2.2 A14B: a high-noise expert (``transformer``) then a low-noise one (``transformer_2``).

    Step ``i`` uses the high-noise expert while ``timestep_i >= boundary_ratio * 1000`` (as diffusers'
    WanPipeline does). Each expert has its own cache, built over all N steps from the same params.
    The caches' step counters equal the global step index: the high-noise expert runs first, from
    step 0, so its counter needs nothing; the low-noise cache is built with ``init_step`` = its first
    step, which makes its counter start there and forces a compute on it, so no residual crosses the
    switch. This relies on caches counting from ``init_step`` rather than on the pipeline advancing
    an idle cache, because advancing would record phantom decisions in the idle cache's telemetry.
    The pipeline checks the counters every step (StepSyncError on a mismatch).
    """

    expert_names = (HIGH_NOISE, LOW_NOISE)

    def __init__(
        self,
        transformers: Mapping[str, torch.nn.Module],
        text_encoder: TextEncoder,
        settings: ModelSettings,
        vae: torch.nn.Module | None = None,
        boundary_ratio: float | None = None,
    ) -> None:
        super().__init__(transformers, text_encoder, settings, vae)
        ratio = settings.boundary_ratio if boundary_ratio is None else boundary_ratio
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ParamsError(f"Wan2.2 needs boundary_ratio in [0, 1] (model_index.json or argument), got {ratio!r}")
        self.boundary_ratio = float(ratio)

    def _experts_per_step(self, schedule: FlowMatchSchedule) -> list[str]:
        boundary = self.boundary_ratio * 1000
        return [HIGH_NOISE if float(t) >= boundary else LOW_NOISE for t in schedule.timesteps]

    def _user_caches(
        self, feature_cache: BaseFeatureCache | Mapping[str, BaseFeatureCache], used: list[str]
    ) -> dict[str, BaseFeatureCache]:
        if not isinstance(feature_cache, Mapping):
            raise ParamsError(
                "Wan2.2 runs two experts and a residual must not cross the switch: pass feature_cache="
                f"{{'{HIGH_NOISE}': cache, '{LOW_NOISE}': cache}} (the low-noise one counting from its first "
                "step), or calibrator= to share one measuring cache"
            )
        missing = [name for name in used if name not in feature_cache]
        if missing:
            raise ParamsError(f"feature_cache has no cache for the experts {missing} that this request runs")
        if len({id(feature_cache[name]) for name in used}) != len(used):
            raise ParamsError("each Wan2.2 expert needs its own cache object")
        return {name: feature_cache[name] for name in used}


def pipeline_for(loaded: LoadedModel) -> WanPipeline:
    """The pipeline class a loaded directory calls for: two experts -> Wan22Pipeline."""
    cls = Wan22Pipeline if LOW_NOISE in loaded.transformers else WanPipeline
    return cls.from_loaded(loaded)


def load_pipeline(
    model_dir: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WanPipeline:
    """Load a Wan-family directory and build the pipeline it calls for."""
    return pipeline_for(load_model_dir(model_dir, device=device, dtype=dtype))
