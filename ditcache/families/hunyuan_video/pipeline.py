"""HunyuanVideo text-to-video and image-to-video with a feature cache around the block stack.

Guidance comes in two kinds. The released checkpoints are guidance-distilled: the scale enters the
model as an input (``embedded_guidance_scale``), one forward per step, conditional branch only. Real
classifier-free guidance (a second, unconditional forward per step) runs when a negative prompt (or
its embeddings) is given and ``guidance_scale > 1``; the two branches are separate adapter calls
because the cache keeps per-branch state.

The prompt encoders (a Llama-3 8B LLM and CLIP-L) are large, so a request can bring its own
embeddings (:class:`HunyuanPromptEmbeds`) instead; :class:`HunyuanPromptEncoder` loads the real
ones from a local model directory when they are there. Sampling is diffusers' own, as its
HunyuanVideoPipeline does it: a fresh ``FlowMatchEulerDiscreteScheduler`` per request (from the
folder's scheduler config, the request's shift as its ``shift``) with ``sigmas = linspace(1, 0, N +
1)[:-1]``, so a request without cache gives diffusers' latents.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ditcache.errors import ParamsError
from ditcache.families.hunyuan_video.adapter import HunyuanVideoAdapter
from ditcache.parallel import ParallelGroups
from ditcache.runtime.denoise import CacheArg, DenoisingPipeline, GenerationOutput, cache_from_arguments
from ditcache.runtime.limits import check_size
from ditcache.runtime.loading import ModelSettings, load_transformer_and_vae, part_spec, scheduler_config
from ditcache.runtime.request import (
    check_guidance,
    check_output_type,
    conditioning,
    conditioning_hash,
    image_to_pixels,
    initial_noise,
    latent_grid,
    to_unit,
    vae_decode,
)
from ditcache.runtime.scheduler import config_shift, hunyuan_video_schedule

EXPERT = "transformer"

# diffusers' HunyuanVideo prompt template; the first 95 tokens (the system prompt) are cropped off.
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
PROMPT_TEMPLATE_CROP = 95


@dataclass
class HunyuanPromptEmbeds:
    """One branch's text conditioning: Llama tokens ``[B, L, D]``, their mask ``[B, L]``, CLIP ``[B, P]``."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        batch, length = self.embeds.shape[:2]
        if self.mask.shape != (batch, length) or self.pooled.shape[0] != batch:
            raise ParamsError(
                f"HunyuanPromptEmbeds: embeds {tuple(self.embeds.shape)}, mask {tuple(self.mask.shape)} and "
                f"pooled {tuple(self.pooled.shape)} disagree; expected mask (B, L) and pooled (B, P)"
            )

    def to(self, device: torch.device, dtype: torch.dtype) -> "HunyuanPromptEmbeds":
        return HunyuanPromptEmbeds(
            self.embeds.to(device, dtype), self.mask.to(device), self.pooled.to(device, dtype)
        )


class HunyuanPromptEncoder(torch.nn.Module):
    """Llama (token embeddings, third-to-last hidden layer) + CLIP (pooled), encoding as diffusers does."""

    def __init__(
        self,
        llama: torch.nn.Module,
        tokenizer: Any,
        clip: torch.nn.Module,
        clip_tokenizer: Any,
        max_sequence_length: int = 256,
        template: str = PROMPT_TEMPLATE,
        template_crop: int = PROMPT_TEMPLATE_CROP,
    ) -> None:
        super().__init__()
        self.llama = llama
        self.tokenizer = tokenizer
        self.clip = clip
        self.clip_tokenizer = clip_tokenizer
        self.max_sequence_length = max_sequence_length
        self.template = template
        self.template_crop = template_crop

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> "HunyuanPromptEncoder":
        """Load ``text_encoder``/``tokenizer`` (Llama), ``text_encoder_2``/``tokenizer_2`` (CLIP); no downloads."""
        from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

        root = Path(model_dir)
        for part in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if not (root / part).is_dir():
                raise ParamsError(f"model directory {root} has no {part}/ folder (HunyuanVideo's prompt encoders)")
        local = {"local_files_only": True}
        return cls(
            LlamaModel.from_pretrained(str(root / "text_encoder"), dtype=dtype, **local).eval(),
            AutoTokenizer.from_pretrained(str(root / "tokenizer"), **local),
            CLIPTextModel.from_pretrained(str(root / "text_encoder_2"), dtype=dtype, **local).eval(),
            AutoTokenizer.from_pretrained(str(root / "tokenizer_2"), **local),
        )

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> HunyuanPromptEmbeds:
        device = next(self.llama.parameters()).device
        tokens = self.tokenizer(
            [self.template.format(p) for p in prompts],
            max_length=self.max_sequence_length + self.template_crop,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).to(device)
        hidden = self.llama(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-3]
        clip_ids = self.clip_tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        crop = self.template_crop
        return HunyuanPromptEmbeds(hidden[:, crop:], tokens.attention_mask[:, crop:], pooled)


class HunyuanVideoPipeline(DenoisingPipeline):
    """HunyuanVideo T2V / I2V (``latent_concat`` or ``token_replace`` checkpoints) with a feature cache.

    ``vae`` (AutoencoderKLHunyuanVideo) is needed to decode frames and to encode an I2V ``image``;
    without one, requests return latents (``output_type="latent"``) and I2V takes ``image_latents``.
    ``default_shift`` is the sigma shift of a request that names none (the scheduler config's);
    ``scheduler_config`` the folder's ``scheduler_config.json`` (None: FlowMatchEuler, as published).
    ``parallel`` is this rank's process groups (CFG-parallel needs real CFG, i.e. a negative prompt);
    None = one process.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module | None = None,
        prompt_encoder: HunyuanPromptEncoder | None = None,
        *,
        default_shift: float = 7.0,
        parallel: ParallelGroups | None = None,
        scheduler_config: dict[str, Any] | None = None,
    ) -> None:
        self.adapter = HunyuanVideoAdapter(transformer)
        super().__init__({EXPERT: self.adapter}, parallel)
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        # The released request: 720p, 129 frames, 50 steps, guidance distilled (real CFG off).
        self.settings = ModelSettings(
            latent_space="vae",
            height=720,
            width=1280,
            num_frames=129,
            default_steps=50,
            default_shift=default_shift,
            default_guidance_scale=1.0,
            model_type="HunyuanVideo-I2V" if self.image_condition_type else "HunyuanVideo-T2V",
            boundary_ratio=None,
        )

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: ParallelGroups | None = None,
    ) -> "HunyuanVideoPipeline":
        """Load a local diffusers-format HunyuanVideo directory; the prompt encoders only if present."""
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

        root = Path(model_dir)
        index, transformer, vae = load_transformer_and_vae(
            root, HunyuanVideoTransformer3DModel, AutoencoderKLHunyuanVideo, dtype, device
        )
        encoder = None
        # I2V checkpoints encode the prompt with LLaVA and the image; only the T2V Llama encoder is
        # loaded here, I2V requests bring prompt_embeds.
        if part_spec(index, "text_encoder") == ("transformers", "LlamaModel"):
            encoder = HunyuanPromptEncoder.from_pretrained(root, dtype=dtype).to(device)
        config = scheduler_config(root, index) or None
        shift = (config_shift(config) if config else None) or 7.0
        return cls(transformer, vae, encoder, default_shift=shift, parallel=parallel, scheduler_config=config)

    @property
    def image_condition_type(self) -> str | None:
        return self.adapter.transformer.config.image_condition_type

    @property
    def default_shift(self) -> float:
        """The sigma shift of a request that names none."""
        return self.settings.default_shift

    # -- inputs ------------------------------------------------------------------------------------

    def _scale_factors(self) -> tuple[int, int]:
        """(temporal, spatial) compression of the VAE; HunyuanVideo's (4, 8) when there is none."""
        if self.vae is None:
            return 4, 8
        return int(self.vae.config.temporal_compression_ratio), int(self.vae.config.spatial_compression_ratio)

    def _latent_grid(self, height: int, width: int, num_frames: int) -> tuple[int, int, int]:
        s_t, s_s = self._scale_factors()
        return latent_grid(
            height, width, num_frames, spatial_scale=s_s, temporal_scale=s_t, patch_size=self.adapter.patch_size
        )

    def _image_latents(
        self, image: Any | None, image_latents: torch.Tensor | None, batch: int, size: tuple[int, int]
    ) -> torch.Tensor:
        """The first frame's latents ``[B, C, 1, h, w]``, scaled as the transformer sees them; ``image``
        (PIL or ``[3, H, W]`` in [0, 1]) is resized to ``size`` (pixels) and encoded."""
        if image_latents is None:
            if image is None:
                raise ParamsError(
                    f"this checkpoint is image-to-video ({self.image_condition_type}): pass image= "
                    "(a PIL image or a [3, H, W] tensor in [0, 1], needs a vae) or image_latents= ([B, C, 1, h, w], scaled)"
                )
            if self.vae is None:
                raise ParamsError("encoding image= needs a vae; pass image_latents= instead")
            pixels = image_to_pixels(image, size, "image").unsqueeze(2)
            dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
            image_latents = dist.mode() * self.vae.config.scaling_factor
        if image_latents.ndim != 5 or image_latents.shape[2] != 1 or image_latents.shape[0] not in (1, batch):
            raise ParamsError(
                f"image_latents must be [B or 1, C, 1, h, w] for {batch} prompts, got {tuple(image_latents.shape)}"
            )
        return image_latents.float().expand(batch, -1, -1, -1, -1)

    # -- the request -------------------------------------------------------------------------------

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
        embedded_guidance_scale: float = 6.0,
        prompt_embeds: HunyuanPromptEmbeds | None = None,
        negative_prompt_embeds: HunyuanPromptEmbeds | None = None,
        image_latents: torch.Tensor | None = None,
    ) -> GenerationOutput:
        """Generate one video per prompt.

        Unset sampling arguments take ``settings`` (the released request). ``guidance_scale`` is
        real CFG: it runs the unconditional branch only with a negative prompt (or
        ``negative_prompt_embeds``) and a scale > 1. ``embedded_guidance_scale`` feeds the guidance
        embedding of distilled checkpoints (ignored by others). ``cache`` is a cache config, a built
        cache or None (every step computes); a params-driven config without params takes
        ``model_type`` (default HunyuanVideo-T2V / -I2V). An I2V checkpoint takes ``image`` (the
        first frame: PIL or ``[3, H, W]`` in [0, 1], one for every prompt) or ``image_latents``.
        ``output_type="latent"`` returns the latents in ``frames`` (no VAE needed).
        """
        start = time.perf_counter()
        check_output_type(output_type, can_decode=self.vae is not None)
        settings = self.settings
        guidance_scale = check_guidance(settings.default_guidance_scale if guidance_scale is None else guidance_scale)
        model = self.adapter.transformer
        cond = conditioning(self.prompt_encoder, prompt, prompt_embeds, "prompt", model)
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_cfg = guidance_scale > 1.0 and has_negative
        if guidance_scale > 1.0 and not has_negative:
            warnings.warn(
                f"guidance_scale={guidance_scale} but no negative prompt: real CFG is off (HunyuanVideo is "
                "guidance-distilled; embedded_guidance_scale steers it)",
                stacklevel=2,
            )
        batch = cond.embeds.shape[0]
        uncond = None
        if do_cfg:
            uncond = conditioning(
                self.prompt_encoder, negative_prompt, negative_prompt_embeds, "negative_prompt", model, batch
            )
            if uncond.embeds.shape[0] != batch:
                raise ParamsError(f"{uncond.embeds.shape[0]} negative conditionings for {batch} prompts")

        schedule = hunyuan_video_schedule(
            settings.default_steps if num_inference_steps is None else num_inference_steps,
            settings.default_shift if sigma_shift is None else sigma_shift,
            self.scheduler_config,
        )
        cache = cache_from_arguments(
            cache, enable_ada_taylor_cache, ada_taylor_n_derivatives, ada_taylor_taylor_threshold, model_type
        )

        device, dtype = model.device, model.dtype
        height = settings.height if height is None else height
        width = settings.width if width is None else width
        num_frames = settings.num_frames if num_frames is None else num_frames
        frames, h, w = self._latent_grid(height, width, num_frames)
        check_size(self.adapter, (frames, h, w), batch, {"num_frames": num_frames, "height": height, "width": width})
        kind = self.image_condition_type
        channels = model.config.in_channels if kind != "latent_concat" else (model.config.in_channels - 1) // 2
        latents = initial_noise((batch, channels, frames, h, w), seed).to(device)
        first_frame = concat_tail = None
        if kind is not None:
            first_frame = self._image_latents(image, image_latents, batch, (height, width)).to(device)
            # diffusers' I2V starts from noise with a trace (0.1%) of the image in every frame.
            latents = latents * 0.999 + first_frame * 0.001
            if kind == "latent_concat":
                # Channels appended to the latents: the image in frame 0 (zeros after) and a frame-0 mask.
                image_part = torch.zeros_like(latents)
                image_part[:, :, :1] = first_frame
                mask = torch.zeros_like(latents[:, :1])
                mask[:, :, :1] = 1
                concat_tail = torch.cat([image_part, mask], dim=1)

        guidance = None
        if self.adapter.uses_embedded_guidance:
            guidance = torch.full((batch,), embedded_guidance_scale * 1000.0, device=device, dtype=dtype)

        def model_input(x: torch.Tensor, step: int) -> torch.Tensor:
            if kind == "latent_concat":
                x = torch.cat([x, concat_tail], dim=1)
            elif kind == "token_replace":
                x = torch.cat([first_frame, x[:, :, 1:]], dim=2)
            return x.to(dtype)

        def integrate(x: torch.Tensor, velocity: torch.Tensor, step: int) -> torch.Tensor:
            if kind != "token_replace":
                return schedule.step(x, velocity, step)
            # The first frame is the given image, not a sample: only the rest is integrated.
            return torch.cat([first_frame, schedule.step(x[:, :, 1:], velocity[:, :, 1:], step)], dim=2)

        def text_inputs(text: HunyuanPromptEmbeds) -> dict[str, Any]:
            return dict(
                encoder_hidden_states=text.embeds,
                encoder_attention_mask=text.mask,
                pooled_projections=text.pooled,
                guidance=guidance,
            )

        texts = {True: cond} if uncond is None else {True: cond, False: uncond}
        request = self._new_request(
            schedule,
            [EXPERT] * schedule.num_steps,
            guidance_scale,
            {is_cond: text_inputs(text) for is_cond, text in texts.items()},
            cache=cache,
            model_type=model_type or settings.model_type,
            seed=seed,
            conditioning=conditioning_hash(
                prompt if prompt_embeds is None else prompt_embeds,
                negative_prompt if negative_prompt_embeds is None else negative_prompt_embeds,
                image if image_latents is None else image_latents,
            ),
            model_input=model_input,
            timestep=lambda step: schedule.timesteps[step].to(device).expand(batch),
            integrate=integrate,
        )
        latents = self._denoise(request, latents, progress)

        if output_type == "latent":
            result = latents[:, :, 1:] if kind == "latent_concat" else latents
        else:
            result = self._decode(latents, drop_first_frames=kind == "latent_concat")
        return self._report(request, result, time.perf_counter() - start)

    def _decode(self, latents: torch.Tensor, drop_first_frames: bool) -> torch.Tensor:
        """Latents -> frames ``[B, 3, F, H, W]`` in [0, 1]."""
        video = vae_decode(self.vae, latents / self.vae.config.scaling_factor)
        if drop_first_frames:
            # latent_concat checkpoints spend the first latent frame (4 video frames) on the image.
            video = video[:, :, self._scale_factors()[0] :]
        return to_unit(video)
