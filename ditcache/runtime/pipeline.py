"""Text-to-video/image pipelines for Wan2.1 (one transformer) and Wan2.2 A14B (two experts).

Per denoising step the conditional and the unconditional branch are two separate adapter calls, each
with ``is_cond`` set, because a feature cache keeps per-branch state (curve, counter, residuals);
with guidance off the unconditional branch never runs. Every request starts from a reset cache, so
back-to-back requests give the same result as fresh ones. The loop, the caches and the parallel
layout (CFG-parallel, Ulysses SP) are the shared core of ``ditcache.runtime.denoise``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ditcache.cache.base import BaseFeatureCache
from ditcache.errors import ParamsError
from ditcache.parallel import ParallelGroups
from ditcache.runtime.adapters import FamilyAdapter, adapter_for
from ditcache.runtime.denoise import (
    DenoisingPipeline,
    GenerationOutput,
    as_prompt_list,
    params_cache_options,
)
from ditcache.runtime.loading import LoadedModel, ModelSettings, load_model_dir
from ditcache.runtime.scheduler import FlowMatchSchedule, flow_match_schedule
from ditcache.runtime.text_encoders import TextEncoder

__all__ = ["GenerationOutput", "Wan22Pipeline", "WanPipeline", "load_pipeline", "pipeline_for"]

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"


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

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


class WanPipeline(DenoisingPipeline):
    """Wan2.1 text-to-video (or text-to-image with ``num_frames=1``) with a feature cache.

    ``latent_space`` "pixel" (no VAE: the model denoises pixels in [-1, 1]; decoding is a clamp) or
    "vae" (AutoencoderKLWan latents) comes from the model directory's settings. ``parallel`` is this
    rank's process groups (see :class:`~ditcache.runtime.denoise.DenoisingPipeline`); None = one process.
    """

    expert_names: tuple[str, ...] = (HIGH_NOISE,)

    def __init__(
        self,
        transformers: Mapping[str, torch.nn.Module],
        text_encoder: TextEncoder,
        settings: ModelSettings,
        vae: torch.nn.Module | None = None,
        *,
        parallel: ParallelGroups | None = None,
    ) -> None:
        missing = [name for name in self.expert_names if name not in transformers]
        if missing:
            raise ParamsError(f"{type(self).__name__} needs the parts {list(self.expert_names)}; missing {missing}")
        adapters: dict[str, FamilyAdapter] = {name: adapter_for(transformers[name]) for name in self.expert_names}
        for name, adapter in adapters.items():
            if adapter.family != "wan":
                raise ParamsError(f"{type(self).__name__} runs Wan transformers; {name} is a {adapter.family} model")
        if settings.latent_space == "vae" and vae is None:
            raise ParamsError("latent_space 'vae' needs a vae; pass one or use a pixel-space model")
        super().__init__(adapters, parallel)
        self.text_encoder = text_encoder
        self.settings = settings
        self.vae = vae

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *, parallel: ParallelGroups | None = None) -> "WanPipeline":
        extra = sorted(set(loaded.transformers) - set(cls.expert_names))
        if extra:
            raise ParamsError(
                f"{loaded.path} has the experts {extra} that {cls.__name__} would ignore; "
                "use Wan22Pipeline (or load_pipeline, which picks the class)"
            )
        return cls(loaded.transformers, loaded.text_encoder, loaded.settings, loaded.vae, parallel=parallel)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: ParallelGroups | None = None,
    ) -> "WanPipeline":
        """Load a local diffusers-format directory (see ``ditcache.runtime.loading``)."""
        return cls.from_loaded(load_model_dir(model_dir, device=device, dtype=dtype), parallel=parallel)

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

    # -- experts ----------------------------------------------------------------------------------

    def _experts_per_step(self, schedule: FlowMatchSchedule) -> list[str]:
        return [HIGH_NOISE] * schedule.num_steps

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
        prompts = as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        else:
            negatives = as_prompt_list(negative_prompt, "negative_prompt")
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
        ada_taylor = params_cache_options(
            enable_ada_taylor_cache and calibrator is None and feature_cache is None,
            model_type or self.settings.model_type,
            ada_taylor_n_derivatives,
            ada_taylor_taylor_threshold,
        )
        model = self._model
        device, dtype = model.device, model.dtype
        batch = len(request.prompts)
        branch_inputs = {True: {"encoder_hidden_states": self._encode(request.prompts, dtype, device)}}
        if request.do_cfg:
            branch_inputs[False] = {"encoder_hidden_states": self._encode(request.negative_prompts, dtype, device)}
        schedule = request.schedule
        loop = self._new_request(
            schedule,
            request.experts,
            request.guidance_scale,
            branch_inputs,
            feature_cache=feature_cache,
            calibrator=calibrator,
            ada_taylor=ada_taylor,
            model_input=lambda latents, step: latents.to(dtype),
            timestep=lambda step: schedule.timesteps[step].to(device).expand(batch),
        )
        # Noise is drawn on the CPU so a seed gives the same sample on every device (and every rank).
        generator = torch.Generator("cpu").manual_seed(request.seed)
        latents = torch.randn(request.latent_shape, generator=generator, dtype=torch.float32).to(device)
        latents = self._denoise(loop, latents, progress)
        return self._report(loop, self._decode(latents), time.perf_counter() - start)

    def _encode(self, prompts: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(device=device, dtype=dtype)

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
        *,
        parallel: ParallelGroups | None = None,
    ) -> None:
        super().__init__(transformers, text_encoder, settings, vae, parallel=parallel)
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


def pipeline_for(loaded: LoadedModel, *, parallel: ParallelGroups | None = None) -> WanPipeline:
    """The pipeline class a loaded directory calls for: two experts -> Wan22Pipeline."""
    cls = Wan22Pipeline if LOW_NOISE in loaded.transformers else WanPipeline
    return cls.from_loaded(loaded, parallel=parallel)


def load_pipeline(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parallel: ParallelGroups | None = None,
) -> WanPipeline:
    """Load a Wan-family directory and build the pipeline it calls for (``parallel``: this rank's groups)."""
    return pipeline_for(load_model_dir(model_dir, device=device, dtype=dtype), parallel=parallel)
