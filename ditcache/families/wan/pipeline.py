"""Text-to-video/image and image-to-video pipelines for Wan2.1 (one transformer) and Wan2.2 A14B (two experts).

An image-conditioned checkpoint (transformer ``in_channels`` = ``out_channels`` + VAE temporal scale +
``z_dim``: Wan2.1 I2V/FL2V, Wan2.2 A14B I2V) is driven as diffusers' ``WanImageToVideoPipeline``
does (``expand_timesteps``, Wan2.2 TI2V, is not supported): ``image=`` (and ``last_image=`` for
first-last-frame) become a condition = [mask, normalised VAE latents of the video
[image, zeros..., (last_image)]] concatenated to the noisy latents along channels at every step, the
same for both CFG branches; Wan2.1 (transformer ``image_dim`` set) also gets the frames' CLIP
embeddings (``image_encoder``'s penultimate hidden states) as ``encoder_hidden_states_image``.

Per denoising step the conditional and the unconditional branch are two separate adapter calls, each
with ``is_cond`` set, because a feature cache keeps per-branch state (curve, counter, residuals);
with guidance off the unconditional branch never runs. Every request starts from a reset cache, so
back-to-back requests give the same result as fresh ones. The loop, the caches and the parallel
layout (CFG-parallel, Ulysses SP) are the shared core of ``ditcache.runtime.denoise``.

Sampling is diffusers' own: every request builds a fresh scheduler from the model folder's
``scheduler_config.json`` (default, as the published Wan folders: ``UniPCMultistepScheduler`` with
flow prediction and flow sigmas) with the request's shift as ``flow_shift``, and sets its timesteps
as diffusers' ``WanPipeline`` does, so a request without cache gives diffusers' latents. Wan2.2
switches experts where diffusers does (``t >= boundary_ratio * num_train_timesteps`` on the
scheduler's timesteps), and its low-noise steps take ``guidance_scale_2`` (default: ``guidance_scale``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ditcache.errors import ParamsError
from ditcache.families.registry import adapter_for
from ditcache.parallel import ParallelGroups
from ditcache.runtime.adapter import FamilyAdapter
from ditcache.runtime.denoise import CacheArg, DenoisingPipeline, GenerationOutput, cache_from_arguments
from ditcache.runtime.limits import check_size
from ditcache.runtime.loading import LoadedModel, ModelSettings, load_model_dir
from ditcache.runtime.request import (
    check_guidance,
    check_seed,
    check_output_type,
    conditioning_hash,
    decode_normalised,
    image_to_pixels,
    image_to_unit,
    initial_noise,
    latent_grid,
    latent_mean_std,
    prompt_lists,
    to_unit,
)
from ditcache.runtime.scheduler import Schedule, experts_by_boundary, wan_schedule
from ditcache.runtime.text_encoders import TextEncoder

__all__ = ["Wan22Pipeline", "WanPipeline", "load", "pipeline_for"]

HIGH_NOISE, LOW_NOISE = "transformer", "transformer_2"


@dataclass
class _Request:
    """A validated request: what the denoising loop needs, nothing else."""

    prompts: list[str]
    negative_prompts: list[str]
    schedule: Schedule
    guidance_scale: float
    seed: int
    latent_shape: tuple[int, ...]
    experts: list[str]  # expert name per step
    num_frames: int = 1
    guidance_scale_2: float | None = None  # Wan2.2: the low-noise expert's guidance

    @property
    def do_cfg(self) -> bool:
        return self.guidance_scale > 1.0


class WanPipeline(DenoisingPipeline):
    """Wan2.1 text-to-video (or text-to-image with ``num_frames=1``) with a feature cache.

    ``latent_space`` "pixel" (no VAE: the model denoises pixels in [-1, 1]; decoding is a clamp) or
    "vae" (AutoencoderKLWan latents) comes from the model directory's settings. ``scheduler_config``
    is the folder's ``scheduler_config.json`` (None: UniPC as the published Wan folders). ``parallel``
    is this rank's process groups (see :class:`~ditcache.runtime.denoise.DenoisingPipeline`); None =
    one process.
    """

    expert_names: tuple[str, ...] = (HIGH_NOISE,)

    def __init__(
        self,
        transformers: Mapping[str, torch.nn.Module],
        text_encoder: TextEncoder,
        settings: ModelSettings,
        vae: torch.nn.Module | None = None,
        *,
        image_encoder: torch.nn.Module | None = None,
        image_processor: Any | None = None,
        parallel: ParallelGroups | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
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
        self.image_encoder = image_encoder
        self.image_processor = image_processor
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        self._check_image_parts()

    def _check_image_parts(self) -> None:
        """An image-conditioned checkpoint needs a VAE whose condition fits its channels, and a CLIP
        image encoder + processor when its transformer takes image embeddings (``image_dim``)."""
        config = self._model.config
        for name, adapter in self.adapters.items():
            other = adapter.transformer.config
            if (other.in_channels, other.out_channels) != (config.in_channels, config.out_channels):
                raise ParamsError(f"the experts' channels differ: {name} is {other.in_channels}->{other.out_channels}")
        if not self.image_conditioned:
            return
        if self.vae is None:
            raise ParamsError(
                f"this transformer takes {config.in_channels} input channels but predicts {config.out_channels}: an "
                "image-conditioned (I2V/FL2V) checkpoint, whose image condition needs a vae (latent_space 'vae')"
            )
        condition = int(self.vae.config.scale_factor_temporal) + int(self.vae.config.z_dim)
        if config.in_channels != config.out_channels + condition:
            raise ParamsError(
                f"this transformer takes {config.in_channels} input channels and predicts {config.out_channels}; an "
                f"image-conditioned Wan transformer with this vae takes {config.out_channels} + {condition} "
                "(mask + image latents); other channel layouts are not supported"
            )
        if config.image_dim is not None and (self.image_encoder is None or self.image_processor is None):
            raise ParamsError(
                f"this transformer takes CLIP image embeddings (image_dim={config.image_dim}): pass image_encoder= "
                "(transformers CLIPVisionModel) and image_processor= (CLIPImageProcessor), or load a directory "
                "with image_encoder/ and image_processor/"
            )

    @property
    def image_conditioned(self) -> bool:
        """Whether the checkpoint is I2V/FL2V (it takes a condition besides the noisy latents)."""
        config = self._model.config
        return config.in_channels != config.out_channels

    @property
    def first_last_frame(self) -> bool:
        """Wan2.1 FL2V: the image embedder has a position embedding for two frames' tokens."""
        return self._model.config.pos_embed_seq_len is not None

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, *, parallel: ParallelGroups | None = None) -> "WanPipeline":
        extra = sorted(set(loaded.transformers) - set(cls.expert_names))
        if extra:
            raise ParamsError(
                f"{loaded.path} has the experts {extra} that {cls.__name__} would ignore; "
                "use Wan22Pipeline (or ditcache.load_pipeline, which picks the class)"
            )
        return cls(
            loaded.transformers,
            loaded.text_encoder,
            loaded.settings,
            loaded.vae,
            image_encoder=loaded.image_encoder,
            image_processor=loaded.image_processor,
            parallel=parallel,
            scheduler_config=loaded.scheduler_config,
        )

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
        s_t, s_s = self._scale_factors()
        grid = latent_grid(
            height, width, num_frames, spatial_scale=s_s, temporal_scale=s_t, patch_size=self._model.config.patch_size
        )
        sizes = {"num_frames": num_frames, "height": height, "width": width}
        check_size(self.adapters[self.expert_names[0]], grid, batch, sizes)
        return (batch, self._model.config.out_channels, *grid)

    # -- experts ----------------------------------------------------------------------------------

    def _experts_per_step(self, schedule: Schedule) -> list[str]:
        return [HIGH_NOISE] * schedule.num_steps

    def _guidance_scale_2(self, guidance_scale_2: float | None, guidance_scale: float) -> float | None:
        """Wan2.1 has one expert: a second guidance scale would be ignored, so it is refused (as diffusers)."""
        if guidance_scale_2 is not None:
            raise ParamsError("guidance_scale_2 applies to two-expert models (Wan2.2 A14B); this model has one")
        return None

    # -- the request ------------------------------------------------------------------------------

    def _prepare(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        num_inference_steps: int | None,
        guidance_scale: float | None,
        sigma_shift: float | None,
        seed: int,
        height: int | None,
        width: int | None,
        num_frames: int | None,
        guidance_scale_2: float | None = None,
    ) -> _Request:
        settings = self.settings
        prompts, negatives = prompt_lists(prompt, negative_prompt)
        steps = settings.default_steps if num_inference_steps is None else num_inference_steps
        shift = settings.default_shift if sigma_shift is None else sigma_shift
        guidance = check_guidance(settings.default_guidance_scale if guidance_scale is None else guidance_scale)
        guidance_2 = self._guidance_scale_2(guidance_scale_2, guidance)
        if guidance_2 is not None and guidance_2 > 1.0 and guidance <= 1.0:
            raise ParamsError(
                f"guidance_scale_2={guidance_2} needs guidance_scale > 1: the unconditional branch runs on every "
                f"step or on none, and guidance_scale={guidance} turns it off"
            )
        schedule = wan_schedule(steps, shift, self.scheduler_config)
        frames = settings.num_frames if num_frames is None else num_frames
        shape = self._latent_shape(
            len(prompts),
            settings.height if height is None else height,
            settings.width if width is None else width,
            frames,
        )
        experts = self._experts_per_step(schedule)
        return _Request(
            prompts, negatives, schedule, guidance, check_seed(seed), shape, experts, frames, guidance_2
        )

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sigma_shift: float | None = None,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        image: Any | None = None,
        cache: CacheArg = None,
        *,
        enable_ada_taylor_cache: bool = False,
        ada_taylor_n_derivatives: int | None = None,
        ada_taylor_taylor_threshold: int | None = None,
        model_type: str | None = None,
        output_type: Literal["frames", "latent"] = "frames",
        progress: bool = True,
        last_image: Any | None = None,
        guidance_scale_2: float | None = None,
    ) -> GenerationOutput:
        """Generate one sample per prompt.

        Unset sampling arguments take the model directory's defaults (``settings``). ``cache`` is a
        cache config (``AdaTaylorConfig()`` takes the model's params), a built cache (a
        ``Calibrator`` measures and is shared by all experts), a mapping expert -> cache, or None:
        every step computes. The seed keywords ``enable_ada_taylor_cache=True,
        ada_taylor_n_derivatives=..., model_type=...`` build an ``AdaTaylorConfig``.
        ``guidance_scale <= 1`` runs no unconditional pass. ``guidance_scale_2`` (Wan2.2 only) is
        the low-noise expert's guidance; None: ``guidance_scale``, as diffusers. ``frames`` is ``[B, C, F, H, W]`` in
        [0, 1], or with ``output_type="latent"`` the final latents (no decoding).

        An image-conditioned checkpoint needs ``image`` (the first frame: a PIL image or a ``[3, H, W]``
        tensor in [0, 1], resized bilinearly to ``height`` x ``width`` if needed; one image for every
        prompt); ``last_image`` (same forms) makes it first-last-frame: Wan2.1 FL2V, or Wan2.2 A14B.
        """
        start = time.perf_counter()
        check_output_type(output_type, can_decode=True)
        self._check_image_request(image, last_image)
        request = self._prepare(
            prompt, negative_prompt, num_inference_steps, guidance_scale, sigma_shift, seed, height, width, num_frames,
            guidance_scale_2,
        )
        cache = cache_from_arguments(
            cache, enable_ada_taylor_cache, ada_taylor_n_derivatives, ada_taylor_taylor_threshold, model_type
        )
        model = self._model
        device, dtype = model.device, model.dtype
        batch = len(request.prompts)
        branch_inputs: dict[bool, dict[str, Any]] = {
            True: {"encoder_hidden_states": self._encode(request.prompts, dtype, device)}
        }
        if request.do_cfg:
            branch_inputs[False] = {"encoder_hidden_states": self._encode(request.negative_prompts, dtype, device)}
        schedule = request.schedule
        first = last = None
        if image is None:
            model_input = lambda latents, step: latents.to(dtype)  # noqa: E731
        else:
            _, _, _, height_px, width_px = request.latent_shape
            s_s = self._scale_factors()[1]
            size = (height_px * s_s, width_px * s_s)
            first = image_to_pixels(image, size, "image")
            last = None if last_image is None else image_to_pixels(last_image, size, "last_image")
            if last is not None and request.num_frames < 2:
                raise ParamsError(f"last_image= needs num_frames >= 2, got {request.num_frames}")
            condition = self.image_condition(first, last, batch, request.num_frames).to(device=device, dtype=dtype)
            model_input = lambda latents, step: torch.cat([latents.to(dtype), condition], dim=1)  # noqa: E731
            if self._model.config.image_dim is not None:
                # Both branches see the same image tokens, as in diffusers.
                embeds = self.image_embeds(image, last_image, batch).to(device=device, dtype=dtype)
                for inputs in branch_inputs.values():
                    inputs["encoder_hidden_states_image"] = embeds
        loop = self._new_request(
            schedule,
            request.experts,
            request.guidance_scale,
            branch_inputs,
            cache=cache,
            model_type=model_type or self.settings.model_type,
            seed=request.seed,
            conditioning=conditioning_hash(request.prompts, request.negative_prompts, first, last),
            model_input=model_input,
            timestep=lambda step: schedule.timesteps[step].to(device).expand(batch),
            guidance_scale_2=request.guidance_scale_2,
            guidance_steps_2=frozenset(s for s, e in enumerate(request.experts) if e == LOW_NOISE),
        )
        latents = self._denoise(loop, initial_noise(request.latent_shape, request.seed).to(device), progress)
        frames = latents.cpu() if output_type == "latent" else self._decode(latents)
        return self._report(loop, frames, time.perf_counter() - start)

    # -- image conditioning -----------------------------------------------------------------------

    def _check_image_request(self, image: Any | None, last_image: Any | None) -> None:
        if not self.image_conditioned:
            if image is not None or last_image is not None:
                raise ParamsError(
                    "image=/last_image= given, but this is a text-to-video checkpoint (transformer in_channels == "
                    "out_channels); load an image-to-video (I2V/FL2V) checkpoint to condition on images"
                )
            return
        if image is None:
            raise ParamsError(
                "this is an image-to-video checkpoint (transformer in_channels != out_channels): pass image= "
                "(the first frame, a PIL image or a [C, H, W] tensor in [0, 1])"
            )
        if self._model.config.image_dim is not None:
            if last_image is not None and not self.first_last_frame:
                raise ParamsError(
                    "last_image= needs a first-last-frame (FL2V) checkpoint; this Wan2.1 I2V transformer's image "
                    "embedder has no position embedding for two frames (pos_embed_seq_len is None)"
                )
            if last_image is None and self.first_last_frame:
                raise ParamsError(
                    "this is a first-last-frame (FL2V) checkpoint (pos_embed_seq_len set): pass last_image= too"
                )

    def image_condition(
        self, image: torch.Tensor, last_image: torch.Tensor | None, batch: int, num_frames: int
    ) -> torch.Tensor:
        """``[B, s_t + z_dim, F, h, w]``: the frame mask then the normalised latents of the video
        [image, zeros..., (last_image)] (``image``/``last_image``: ``[1, 3, H, W]`` in [-1, 1]), as
        diffusers' ``WanImageToVideoPipeline.prepare_latents``. The mask has ``s_t`` (temporal scale)
        channels per latent frame, one per pixel frame it covers (the first latent frame covers the
        first pixel frame ``s_t`` times): 1 on the given frames."""
        vae = self.vae
        assert vae is not None
        config = vae.config
        s_t = int(config.scale_factor_temporal)
        gap = num_frames - 1 - (last_image is not None)  # frames between the given ones
        frames = [image.unsqueeze(2), image.new_zeros(1, image.shape[1], gap, *image.shape[2:])]
        if last_image is not None:
            frames.append(last_image.unsqueeze(2))
        video = torch.cat(frames, dim=2).to(device=vae.device, dtype=vae.dtype)
        latents = vae.encode(video).latent_dist.mode().float()
        mean, std = latent_mean_std(vae, latents.device)
        latents = ((latents - mean) * (1.0 / std)).repeat(batch, 1, 1, 1, 1)
        latent_frames, height, width = latents.shape[2:]

        given = torch.zeros(num_frames)
        given[0] = 1.0
        if last_image is not None:
            given[-1] = 1.0
        given = torch.cat([given[:1].repeat(s_t), given[1:]])  # the first latent frame holds frame 0 s_t times
        mask = given.view(latent_frames, s_t).T.to(latents)  # [s_t, F]
        mask = mask[None, :, :, None, None].expand(batch, s_t, latent_frames, height, width)
        return torch.cat([mask, latents], dim=1)

    def image_embeds(self, image: Any, last_image: Any | None, batch: int) -> torch.Tensor:
        """CLIP image tokens (penultimate hidden states of ``image_encoder``), as diffusers: ``[B, S, D]``,
        or for FL2V ``[2B, S, D]`` (first, last per sample; the FL2V image embedder pairs them up)."""
        images = [image] if last_image is None else [image, last_image]
        tensors = [isinstance(i, torch.Tensor) for i in images]
        kwargs = {}
        if any(tensors):
            # Tensors are in [0, 1]: rescaling by 1/255 (for uint8 pixels) must be off.
            images = [image_to_unit(i, what) for i, what in zip(images, ("image", "last_image"))]
            kwargs["do_rescale"] = False
        encoder = self.image_encoder
        assert encoder is not None and self.image_processor is not None
        pixels = self.image_processor(images=images, return_tensors="pt", **kwargs)["pixel_values"]
        hidden = encoder(pixel_values=pixels.to(device=encoder.device, dtype=encoder.dtype), output_hidden_states=True)
        return hidden.hidden_states[-2].repeat(batch, 1, 1)

    def _encode(self, prompts: list[str], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return self.text_encoder.encode(prompts).to(device=device, dtype=dtype)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> frames in [0, 1]; in pixel space the sample already is the image in [-1, 1]."""
        return to_unit(latents) if self.vae is None else decode_normalised(self.vae, latents)


class Wan22Pipeline(WanPipeline):
    """Wan2.2 A14B: a high-noise expert (``transformer``) then a low-noise one (``transformer_2``).

    Step ``i`` uses the high-noise expert while ``timestep_i >= boundary_ratio * num_train_timesteps``
    on the scheduler's timesteps (as diffusers' WanPipeline does); the low-noise steps are guided by
    ``guidance_scale_2`` (default ``guidance_scale``). Each expert has its own cache, built over all N steps from the same params.
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
        image_encoder: torch.nn.Module | None = None,
        image_processor: Any | None = None,
        parallel: ParallelGroups | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            transformers,
            text_encoder,
            settings,
            vae,
            image_encoder=image_encoder,
            image_processor=image_processor,
            parallel=parallel,
            scheduler_config=scheduler_config,
        )
        ratio = settings.boundary_ratio if boundary_ratio is None else boundary_ratio
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
            raise ParamsError(f"Wan2.2 needs boundary_ratio in [0, 1] (model_index.json or argument), got {ratio!r}")
        self.boundary_ratio = float(ratio)

    def _experts_per_step(self, schedule: Schedule) -> list[str]:
        return experts_by_boundary(
            schedule.timesteps, self.boundary_ratio, HIGH_NOISE, LOW_NOISE, schedule.num_train_timesteps
        )

    def _guidance_scale_2(self, guidance_scale_2: float | None, guidance_scale: float) -> float | None:
        return guidance_scale if guidance_scale_2 is None else check_guidance(guidance_scale_2)


def pipeline_for(loaded: LoadedModel, *, parallel: ParallelGroups | None = None) -> WanPipeline:
    """The pipeline class a loaded directory calls for: two experts -> Wan22Pipeline."""
    cls = Wan22Pipeline if LOW_NOISE in loaded.transformers else WanPipeline
    return cls.from_loaded(loaded, parallel=parallel)


def load(
    model_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    parallel: ParallelGroups | None = None,
) -> WanPipeline:
    """Load a Wan-family directory and build the pipeline it calls for (``parallel``: this rank's groups)."""
    return pipeline_for(load_model_dir(model_dir, device=device, dtype=dtype), parallel=parallel)
