"""Input-side helpers of the HunyuanVideo and Qwen-Image pipelines (the denoising core is ``denoise``).

Both families load one transformer, an optional VAE and an optional (large) prompt encoder from a
local directory, and take either prompts or caller-supplied prompt embeddings; these helpers hold
what that has in common.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from ditcache.errors import ParamsError
from ditcache.runtime.denoise import as_prompt_list
from ditcache.runtime.loading import check_part, load_diffusers_model, part_spec, read_model_index

OUTPUT_TYPES = ("frames", "latent")


class _Embeds(Protocol):
    def to(self, device: torch.device, dtype: torch.dtype) -> Any: ...


E = TypeVar("E", bound=_Embeds)


def load_transformer_and_vae(
    root: Path, transformer_class: type, vae_class: type, dtype: torch.dtype, device: str | torch.device
) -> tuple[dict[str, Any], torch.nn.Module, torch.nn.Module | None]:
    """``(model_index, transformer, vae or None)`` of a local diffusers-format directory, on ``device``."""
    index = read_model_index(root)
    transformer = load_diffusers_model(transformer_class, check_part(root, "transformer"), dtype).to(device)
    vae = None
    if part_spec(index, "vae") is not None:
        # Decoding runs once per request; fp32 keeps the frames clean.
        vae = load_diffusers_model(vae_class, check_part(root, "vae"), torch.float32).to(device)
    return index, transformer, vae


def scheduler_config(root: Path, index: dict[str, Any]) -> dict[str, Any]:
    """The directory's ``scheduler/scheduler_config.json`` ({} when the index names no scheduler)."""
    if part_spec(index, "scheduler") is None:
        return {}
    return json.loads((check_part(root, "scheduler") / "scheduler_config.json").read_text())


def check_output(output_type: str, has_vae: bool, seed: int) -> None:
    """Reject an unknown ``output_type``, decoding without a VAE, and a non-integer seed."""
    if output_type not in OUTPUT_TYPES:
        raise ParamsError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if output_type == "frames" and not has_vae:
        raise ParamsError("decoding frames needs a vae; pass output_type='latent' or build the pipeline with one")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamsError(f"seed must be an integer, got {seed!r}")


def conditioning(
    encoder: Any,
    prompt: str | list[str] | None,
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
