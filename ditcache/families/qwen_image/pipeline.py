"""Qwen-Image text-to-image and Qwen-Image-Edit-Plus with a feature cache around the block stack.

Per step the conditional and unconditional branches are separate adapter calls (the cache keeps
per-branch state); ``guidance_scale <= 1`` runs no unconditional pass. Guidance is Qwen-Image's
norm-preserving CFG: the combined prediction is rescaled, per token, to the conditional one's norm.

Edit-Plus appends the reference images' packed latents to the noisy latents along the sequence; the
block stack and the cache see the whole sequence, and only the noisy part of the prediction is used.

Sampling is diffusers' own, as its QwenImagePipeline does it: a fresh
``FlowMatchEulerDiscreteScheduler`` per request (the folder's scheduler config; default the
published Qwen-Image one) with ``sigmas = linspace(1, 1/N, N)`` and, the scheduler shifting
"dynamically", ``mu`` linear in the image's token count; the model gets ``timestep / 1000``. A
request's ``sigma_shift`` replaces the dynamic shift by that static one (the same map as ``mu =
log(shift)``); ``sigma_shift=None`` keeps diffusers' behaviour. So a request without cache gives
diffusers' latents.

The prompt encoder (Qwen2.5-VL 7B) is large: requests can bring :class:`QwenPromptEmbeds`;
:class:`QwenPromptEncoder` loads the real one from a local model directory when it is there.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

from ditcache.errors import ParamsError
from ditcache.families.qwen_image.adapter import QwenImageAdapter
from ditcache.parallel import ParallelGroups
from ditcache.runtime.denoise import CacheArg, DenoisingPipeline, GenerationOutput, cache_from_arguments
from ditcache.runtime.limits import check_size
from ditcache.runtime.loading import ModelSettings, load_transformer_and_vae, part_spec, scheduler_config
from ditcache.runtime.request import (
    check_guidance,
    check_output_type,
    conditioning,
    conditioning_hash,
    decode_normalised,
    image_to_pil,
    initial_noise,
    is_image,
    latent_grid,
    latent_mean_std,
)
from ditcache.runtime.scheduler import qwen_image_schedule

EXPERT = "transformer"

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
# Tokens of the system part of each template, dropped from the embeddings (as diffusers does).
T2I_TEMPLATE_DROP, EDIT_TEMPLATE_DROP = 34, 64
EDIT_IMAGE_SLOT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
# Edit-Plus sizes: reference images reach the VAE at ~1024^2 pixels and the prompt encoder at ~384^2.
VAE_IMAGE_AREA, CONDITION_IMAGE_AREA = 1024 * 1024, 384 * 384
# The released requests: text-to-image, and Edit-Plus (with reference images). The shift is None
# because Qwen-Image's depends on the resolution (the scheduler's dynamic shifting).
T2I_SETTINGS = ModelSettings(
    latent_space="vae",
    height=1024,
    width=1024,
    num_frames=1,
    default_steps=50,
    default_shift=None,
    default_guidance_scale=4.0,
    model_type="Qwen-Image",
    boundary_ratio=None,
)
EDIT_SETTINGS = replace(T2I_SETTINGS, default_steps=40, model_type="Qwen-Image-Edit-Plus")


@dataclass
class QwenPromptEmbeds:
    """One branch's text conditioning: tokens ``[B, L, D]`` and their mask ``[B, L]`` (None = all valid)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mask is not None and self.mask.shape != self.embeds.shape[:2]:
            raise ParamsError(
                f"QwenPromptEmbeds: mask {tuple(self.mask.shape)} does not match embeds {tuple(self.embeds.shape)}"
            )

    def to(self, device: torch.device, dtype: torch.dtype) -> "QwenPromptEmbeds":
        return QwenPromptEmbeds(self.embeds.to(device, dtype), None if self.mask is None else self.mask.to(device))


def qwen_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Qwen-Image's CFG: the usual combine, rescaled per token to the conditional prediction's norm."""
    combined = uncond + guidance_scale * (cond - uncond)
    return combined * (cond.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))


def image_size_for_area(area: int, aspect: float) -> tuple[int, int]:
    """(width, height) with about ``area`` pixels at ``aspect`` = width / height, multiples of 32."""
    width = math.sqrt(area * aspect)
    return round(width / 32) * 32, round(width / aspect / 32) * 32


class QwenPromptEncoder(torch.nn.Module):
    """Qwen2.5-VL's last hidden layer, encoding as diffusers' Qwen-Image (and Edit-Plus) pipelines do."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, processor: Any = None, max_length: int = 1024) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_length = max_length

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> "QwenPromptEncoder":
        """Load ``text_encoder``/``tokenizer`` (and ``processor`` for Edit-Plus if present); never downloads."""
        from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        root = Path(model_dir)
        local = {"local_files_only": True}
        processor = None
        if (root / "processor").is_dir():
            processor = AutoProcessor.from_pretrained(str(root / "processor"), **local)
        return cls(
            Qwen2_5_VLForConditionalGeneration.from_pretrained(str(root / "text_encoder"), dtype=dtype, **local).eval(),
            AutoTokenizer.from_pretrained(str(root / "tokenizer"), **local),
            processor,
        )

    @torch.no_grad()
    def encode(self, prompts: list[str], images: Sequence[Any] | None = None) -> QwenPromptEmbeds:
        """Embed ``prompts``; with ``images`` (PIL, condition size) use the Edit-Plus template and vision input."""
        device = next(self.model.parameters()).device
        if images:
            if self.processor is None:
                raise ParamsError("encoding a prompt with reference images needs the processor/ folder (Edit-Plus)")
            slots = "".join(EDIT_IMAGE_SLOT.format(i + 1) for i in range(len(images)))
            inputs = self.processor(
                text=[EDIT_TEMPLATE.format(slots + p) for p in prompts],
                images=list(images),
                padding=True,
                return_tensors="pt",
            ).to(device)
            drop = EDIT_TEMPLATE_DROP
        else:
            inputs = self.tokenizer(
                [T2I_TEMPLATE.format(p) for p in prompts],
                max_length=self.max_length + T2I_TEMPLATE_DROP,
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            drop = T2I_TEMPLATE_DROP
        hidden = self.model(**inputs, output_hidden_states=True).hidden_states[-1]
        # Keep each prompt's valid tokens after the template's system part, then right-pad again.
        rows = [h[m.bool()][drop:][: self.max_length] for h, m in zip(hidden, inputs["attention_mask"])]
        length = max(r.shape[0] for r in rows)
        embeds = hidden.new_zeros(len(rows), length, hidden.shape[-1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            embeds[i, : row.shape[0]] = row
            mask[i, : row.shape[0]] = 1
        return QwenPromptEmbeds(embeds, None if bool(mask.all()) else mask)


class QwenImagePipeline(DenoisingPipeline):
    """Qwen-Image T2I, and Edit-Plus when reference images are given, with a feature cache.

    ``vae`` (AutoencoderKLQwenImage) decodes images and encodes reference images; without one,
    requests return latents (``output_type="latent"``) and Edit-Plus takes ``reference_latents``.
    ``settings`` are the defaults of a text-to-image request, ``edit_settings`` those of a request
    with reference images. ``scheduler_config`` is the folder's ``scheduler_config.json`` (None: the
    published Qwen-Image scheduler). ``parallel`` is this rank's process groups; None = one process.
    """

    settings = T2I_SETTINGS
    edit_settings = EDIT_SETTINGS

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module | None = None,
        prompt_encoder: QwenPromptEncoder | None = None,
        *,
        scheduler_config: dict[str, Any] | None = None,
        parallel: ParallelGroups | None = None,
    ) -> None:
        self.adapter = QwenImageAdapter(transformer)
        super().__init__({EXPERT: self.adapter}, parallel)
        self.vae = vae
        self.prompt_encoder = prompt_encoder
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        parallel: ParallelGroups | None = None,
    ) -> "QwenImagePipeline":
        """Load a local diffusers-format Qwen-Image (or Edit-Plus) directory; the encoder only if present."""
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        root = Path(model_dir)
        index, transformer, vae = load_transformer_and_vae(
            root, QwenImageTransformer2DModel, AutoencoderKLQwenImage, dtype, device
        )
        encoder = None
        if part_spec(index, "text_encoder") is not None:
            encoder = QwenPromptEncoder.from_pretrained(root, dtype=dtype).to(device)
        config = scheduler_config(root, index) or None
        return cls(transformer, vae, encoder, scheduler_config=config, parallel=parallel)

    # -- geometry and latents ----------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (Qwen-Image's VAE: 8); packing adds the patch size on top."""
        return 8 if self.vae is None else 2 ** len(self.vae.temperal_downsample)

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, (h/p)(w/p), C*p*p]`` tokens, patch-major as the model expects."""
        b, c, h, w = latents.shape
        p = self.adapter.patch_size[0]
        x = latents.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Inverse of :meth:`_pack`, with the VAE's frame axis: ``[B, C, 1, h, w]``."""
        b, _, cpp = tokens.shape
        p = self.adapter.patch_size[0]
        x = tokens.view(b, h // p, w // p, cpp // (p * p), p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, cpp // (p * p), 1, h, w)

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        p = self.adapter.patch_size[0]
        _, h, w = latent_grid(
            height, width, 1, spatial_scale=self.vae_scale_factor, temporal_scale=1, patch_size=(1, p, p)
        )
        return h, w

    def _encode_references(self, images: Sequence[Any]) -> tuple[list[Any], list[torch.Tensor]]:
        """PIL reference images -> (condition-size images for the prompt encoder, normalised latents)."""
        if self.vae is None:
            raise ParamsError("encoding reference images (image=) needs a vae; pass reference_latents= instead")
        from diffusers.image_processor import VaeImageProcessor

        processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)
        condition_images, latents = [], []
        for image in images:
            aspect = image.size[0] / image.size[1]
            width, height = image_size_for_area(CONDITION_IMAGE_AREA, aspect)
            condition_images.append(processor.resize(image, height, width))
            width, height = image_size_for_area(VAE_IMAGE_AREA, aspect)
            pixels = processor.preprocess(image, height, width).unsqueeze(2)
            dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
            mean, std = latent_mean_std(self.vae, self.vae.device)
            latents.append((dist.mode().float() - mean) / std)
        return condition_images, latents

    @staticmethod
    def _check_references(latents: Sequence[torch.Tensor], batch: int) -> list[torch.Tensor]:
        """Each reference as ``[B, C, h, w]``, broadcast over the batch."""
        out = []
        for ref in latents:
            ref = ref[:, :, 0] if ref.ndim == 5 else ref
            if ref.ndim != 4 or ref.shape[0] not in (1, batch):
                raise ParamsError(
                    f"reference_latents entries must be [B or 1, C, (1,) h, w] for {batch} prompts, got "
                    f"{tuple(ref.shape)}"
                )
            out.append(ref.float().expand(batch, -1, -1, -1))
        return out

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
        image: Any | Sequence[Any] | None = None,
        cache: CacheArg = None,
        *,
        enable_ada_taylor_cache: bool = False,
        ada_taylor_n_derivatives: int | None = None,
        ada_taylor_taylor_threshold: int | None = None,
        model_type: str | None = None,
        output_type: Literal["frames", "latent"] = "frames",
        progress: bool = True,
        prompt_embeds: QwenPromptEmbeds | None = None,
        negative_prompt_embeds: QwenPromptEmbeds | None = None,
        reference_latents: Sequence[torch.Tensor] | None = None,
    ) -> GenerationOutput:
        """Generate one image per prompt (Edit-Plus: edit the reference images as the prompt says).

        Unset sampling arguments take ``settings``, or ``edit_settings`` with reference images (the
        released 50 and 40 steps). ``image`` is Edit-Plus's reference image or list of them (PIL or
        ``[3, H, W]`` tensors in [0, 1]); ``reference_latents`` gives them already encoded.
        ``guidance_scale <= 1`` runs no unconditional pass; otherwise the negative prompt defaults
        to " ". ``sigma_shift=None`` uses the resolution-dependent shift. ``height``/``width``
        default to ~1024^2 at the last reference image's aspect (Edit-Plus) or 1024 x 1024.
        ``num_frames`` is 1 or None: Qwen-Image makes images. ``cache`` is a cache config, a built
        cache or None (every step computes); a params-driven config without params takes
        ``model_type`` (default Qwen-Image / Qwen-Image-Edit-Plus). ``frames`` is ``[B, 3, 1, H, W]``
        in [0, 1], or with ``output_type="latent"`` the latents ``[B, C, 1, h, w]``.
        """
        start = time.perf_counter()
        check_output_type(output_type, can_decode=self.vae is not None)
        if num_frames not in (None, 1):
            raise ParamsError(f"Qwen-Image makes images: num_frames must be 1 or None, got {num_frames!r}")
        reference_images = None if image is None else [image] if is_image(image) else list(image)
        if reference_images and reference_latents:
            raise ParamsError("pass image= (reference images) or reference_latents=, not both")
        settings = self.edit_settings if reference_images or reference_latents else self.settings
        guidance_scale = check_guidance(settings.default_guidance_scale if guidance_scale is None else guidance_scale)
        condition_images: list[Any] = []
        if reference_images:
            reference_images = [image_to_pil(ref, "image") for ref in reference_images]
            condition_images, reference_latents = self._encode_references(reference_images)
            if height is None and width is None:
                last = reference_images[-1]
                width, height = image_size_for_area(VAE_IMAGE_AREA, last.size[0] / last.size[1])
                multiple = self.vae_scale_factor * self.adapter.patch_size[0]
                width, height = width // multiple * multiple, height // multiple * multiple
        model = self.adapter.transformer
        cond = conditioning(self.prompt_encoder, prompt, prompt_embeds, "prompt", model, 1, condition_images)
        batch = cond.embeds.shape[0]
        do_cfg = guidance_scale > 1.0
        uncond = None
        if do_cfg:
            if negative_prompt is None and negative_prompt_embeds is None:
                negative_prompt = " "
            uncond = conditioning(
                self.prompt_encoder, negative_prompt, negative_prompt_embeds, "negative_prompt", model, batch,
                condition_images,
            )
            if uncond.embeds.shape[0] != batch:
                raise ParamsError(f"{uncond.embeds.shape[0]} negative conditionings for {batch} prompts")

        device, dtype = model.device, model.dtype
        height = settings.height if height is None else height
        width = settings.width if width is None else width
        h, w = self._latent_size(height, width)
        check_size(self.adapter, (h, w), batch, {"height": height, "width": width})
        references = self._check_references(reference_latents or [], batch)
        p = self.adapter.patch_size[0]
        shapes = [(1, h // p, w // p)] + [(1, r.shape[2] // p, r.shape[3] // p) for r in references]
        img_shapes = [shapes] * batch
        reference_tokens = [self._pack(r).to(device) for r in references]

        latents = self._pack(initial_noise((batch, model.config.in_channels // (p * p), h, w), seed)).to(device)
        n_noisy = latents.shape[1]
        schedule = qwen_image_schedule(
            settings.default_steps if num_inference_steps is None else num_inference_steps,
            n_noisy,
            sigma_shift,
            self.scheduler_config,
        )
        cache = cache_from_arguments(
            cache, enable_ada_taylor_cache, ada_taylor_n_derivatives, ada_taylor_taylor_threshold, model_type
        )

        def text_inputs(text: QwenPromptEmbeds) -> dict[str, Any]:
            return dict(encoder_hidden_states=text.embeds, encoder_hidden_states_mask=text.mask, img_shapes=img_shapes)

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
                reference_latents if reference_images is None else reference_images,
            ),
            model_input=lambda x, step: torch.cat([x, *reference_tokens], dim=1).to(dtype),
            # The model takes timestep / 1000 (the sigma), computed as diffusers does.
            timestep=lambda step: schedule.timesteps[step].to(device).expand(batch).to(dtype) / 1000,
            # Only the noisy latents are integrated; the reference tokens' predictions are dropped.
            prediction=lambda velocity: velocity[:, :n_noisy],
            guidance_rule=qwen_guidance,
        )
        latents = self._denoise(request, latents, progress)

        result = self._unpack(latents, h, w)
        if output_type == "frames":
            result = self._decode(result)
        return self._report(request, result, time.perf_counter() - start)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``[B, C, 1, h, w]`` -> images ``[B, 3, 1, H, W]`` in [0, 1]."""
        return decode_normalised(self.vae, latents)
