"""What every family pipeline does to a request before and after denoising, written once.

Prompts become lists (one negative prompt serves every prompt), seeds become CPU noise (so a seed
gives the same sample on every device and every rank), sizes are checked against the VAE scale and
the patch size, images given as PIL or as ``[3, H, W]`` tensors in [0, 1] become what a family
encodes, and latents are normalised for the transformer and decoded back to frames in [0, 1]. The
families differ in what they do with these, not in how they check them, so the errors read the same
whichever model a request runs on.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import torch
import torch.nn.functional as F

from ditcache.errors import ParamsError

OUTPUT_TYPES = ("frames", "latent")


# -- prompts and seeds ---------------------------------------------------------------------------


def as_prompt_list(prompt: str | Sequence[str], what: str) -> list[str]:
    """``prompt`` as a non-empty list of strings (``what`` names the argument in the error)."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ParamsError(f"{what} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def prompt_lists(
    prompt: str | Sequence[str] | None, negative_prompt: str | Sequence[str] | None, default_negative: str = ""
) -> tuple[list[str], list[str]]:
    """(prompts, one negative prompt per prompt): a single negative prompt serves every prompt."""
    if prompt is None:
        raise ParamsError("pass prompt= (a string or a list of strings)")
    prompts = as_prompt_list(prompt, "prompt")
    if negative_prompt is None:
        return prompts, [default_negative] * len(prompts)
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return prompts, negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ParamsError(
            f"got {len(negatives)} negative prompts for {len(prompts)} prompts: pass one negative "
            "prompt (used for all) or one per prompt"
        )
    return prompts, negatives


class _Embeds(Protocol):
    def to(self, device: torch.device, dtype: torch.dtype) -> Any: ...


E = TypeVar("E", bound=_Embeds)


def conditioning(
    encoder: Any,
    prompt: str | Sequence[str] | None,
    embeds: E | None,
    what: str,
    model: torch.nn.Module,
    batch: int = 1,
    *encode_args: Any,
) -> E:
    """``embeds``, or ``encoder.encode(prompts, *encode_args)`` (one prompt repeated ``batch`` times),
    on the model's device and dtype; ``what`` names the argument ("prompt", "negative_prompt")."""
    if embeds is None:
        if prompt is None:
            raise ParamsError(f"pass {what} (a string or list) or {what}_embeds")
        if encoder is None:
            raise ParamsError(
                f"this pipeline has no prompt encoder (no text_encoder/ in the model directory): pass "
                f"{what}_embeds instead of {what}"
            )
        prompts = as_prompt_list(prompt, what)
        embeds = encoder.encode(prompts * batch if len(prompts) == 1 else prompts, *encode_args)
    return embeds.to(model.device, model.dtype)


def conditioning_hash(*parts: Any) -> str:
    """A short hash of what conditions a request: prompt strings, or the embeddings and images given
    instead (tensors by dtype, shape and bytes; dataclasses by their fields; None as absent), so
    ranks can check they sample the same thing without exchanging the tensors."""
    digest = hashlib.sha256()

    def feed(part: Any) -> None:
        if isinstance(part, torch.Tensor):
            data = part.detach().to("cpu").contiguous()
            digest.update(f"tensor{data.dtype}{tuple(data.shape)}".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif dataclasses.is_dataclass(part) and not isinstance(part, type):
            for field in dataclasses.fields(part):
                feed(getattr(part, field.name))
        elif isinstance(part, (list, tuple)):
            digest.update(f"seq{len(part)}".encode())
            for item in part:
                feed(item)
        elif is_image(part):  # a PIL image
            feed(pil_to_unit(part))
        elif part is None or isinstance(part, (str, int, float, bool)):
            digest.update(repr(part).encode())
        else:
            raise TypeError(f"cannot hash a {type(part).__name__} for the request check")

    for part in parts:
        feed(part)
    return digest.hexdigest()[:16]


def check_seed(seed: Any) -> int:
    """``seed`` if it is an integer (a float or a bool would seed a different generator state)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamsError(f"seed must be an integer, got {seed!r}")
    return seed


def check_guidance(guidance_scale: Any) -> float:
    """``guidance_scale`` as a float, refusing what is not a number (NaN included)."""
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or guidance_scale != guidance_scale:
        raise ParamsError(f"guidance_scale must be a number, got {guidance_scale!r}")
    return float(guidance_scale)


def check_output_type(output_type: str, can_decode: bool) -> None:
    """Reject an unknown ``output_type``, and decoding frames without a VAE to decode them with."""
    if output_type not in OUTPUT_TYPES:
        raise ParamsError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "frames" and not can_decode:
        raise ParamsError("decoding frames needs a vae; pass output_type='latent' or build the pipeline with one")


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal latents drawn on the CPU in fp32, so a seed gives one sample everywhere."""
    generator = torch.Generator("cpu").manual_seed(check_seed(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


# -- geometry ------------------------------------------------------------------------------------


def check_positive(name: str, value: Any) -> int:
    """``value`` if it is a positive integer (``name`` names the argument in the error)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParamsError(f"{name} must be a positive integer, got {value!r}")
    return value


def latent_grid(
    height: int,
    width: int,
    num_frames: int,
    *,
    spatial_scale: int,
    temporal_scale: int,
    patch_size: tuple[int, int, int],
) -> tuple[int, int, int]:
    """``(latent frames, latent height, latent width)`` of a request, after checking that the pixel
    size divides into VAE cells and patches (``patch_size`` is ``(frames, height, width)``)."""
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames)):
        check_positive(name, value)
    p_t, p_h, p_w = patch_size
    for name, value, patch in (("height", height, p_h), ("width", width, p_w)):
        multiple = spatial_scale * patch
        if value % multiple:
            raise ParamsError(
                f"{name}={value} is not divisible by {multiple} (VAE spatial scale {spatial_scale} x patch size {patch})"
            )
    if (num_frames - 1) % temporal_scale:
        raise ParamsError(
            f"num_frames - 1 must be divisible by the VAE's temporal scale {temporal_scale}, got {num_frames}"
        )
    latent_frames = (num_frames - 1) // temporal_scale + 1
    if latent_frames % p_t:
        raise ParamsError(f"{latent_frames} latent frames are not divisible by the temporal patch size {p_t}")
    return latent_frames, height // spatial_scale, width // spatial_scale


# -- latents and the VAE ---------------------------------------------------------------------------


def latent_mean_std(vae: torch.nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and std (``latents_mean``/``latents_std``), ``[1, C, 1, 1, 1]``."""
    config = vae.config
    view = (1, config.z_dim, 1, 1, 1)
    mean = torch.tensor(config.latents_mean, device=device).view(view)
    std = torch.tensor(config.latents_std, device=device).view(view)
    return mean, std


def to_unit(sample: torch.Tensor) -> torch.Tensor:
    """A decoded sample in [-1, 1] as float frames in [0, 1], on the CPU."""
    return (sample.float() / 2 + 0.5).clamp(0, 1).cpu()


def vae_decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's decoding of (unnormalised) ``latents``, a sample in [-1, 1]."""
    return vae.decode(latents.to(vae.device, vae.dtype), return_dict=False)[0]


def decode_normalised(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Mean/std-normalised latents (Wan, Qwen-Image VAEs) -> frames in [0, 1]."""
    mean, std = latent_mean_std(vae, latents.device)
    return to_unit(vae_decode(vae, latents * std + mean))


# -- images --------------------------------------------------------------------------------------


def pil_to_unit(image: Any) -> torch.Tensor:
    """A PIL image as an RGB ``[3, H, W]`` float tensor in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def is_image(value: Any) -> bool:
    """Whether ``value`` is one image (a PIL image or a tensor), not a list of them."""
    return isinstance(value, torch.Tensor) or (hasattr(value, "convert") and hasattr(value, "size"))


def image_to_unit(image: Any, what: str) -> torch.Tensor:
    """``image`` (PIL, or ``[3, H, W]`` tensor in [0, 1]) as a float32 ``[3, H, W]`` CPU tensor in [0, 1]."""
    if isinstance(image, torch.Tensor):
        pixels = image.detach().float().cpu()
        if pixels.ndim != 3 or pixels.shape[0] != 3:
            raise ParamsError(
                f"{what} as a tensor must be [3, H, W] (RGB, values in [0, 1]), got {tuple(pixels.shape)}"
            )
        if pixels.numel() and (pixels.min() < 0 or pixels.max() > 1 or not torch.isfinite(pixels).all()):
            raise ParamsError(f"{what} as a tensor must hold values in [0, 1]")
        return pixels
    if hasattr(image, "convert") and hasattr(image, "size"):
        return pil_to_unit(image)
    raise ParamsError(f"{what} must be a PIL image or a [3, H, W] tensor in [0, 1], got {type(image).__name__}")


def image_to_pixels(image: Any, size: tuple[int, int], what: str) -> torch.Tensor:
    """``image`` as ``[1, 3, *size]`` float32 in [-1, 1] (what VAEs encode), resized bilinearly if needed."""
    pixels = image_to_unit(image, what).unsqueeze(0)
    if tuple(pixels.shape[2:]) != tuple(size):
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    return pixels * 2.0 - 1.0


def image_to_pil(image: Any, what: str) -> Any:
    """``image`` as a PIL image: a PIL image as given, a tensor in [0, 1] rounded to 8-bit RGB."""
    if not isinstance(image, torch.Tensor):
        if not (hasattr(image, "convert") and hasattr(image, "size")):
            image_to_unit(image, what)  # raises the error every family gives for a wrong type
        return image
    from PIL import Image

    pixels = (image_to_unit(image, what) * 255).round().to(torch.uint8)
    return Image.fromarray(pixels.permute(1, 2, 0).numpy())
