"""Qwen-Image adapter: diffusers ``QwenImageTransformer2DModel`` as embed -> blocks -> head.

Every block is dual-stream (image and text tokens kept apart, joint attention); only the image
stream reaches the head, so the cache's residual is the image stream's and a skipped step needs no
text state.

The image stream is the packed latent tokens ``[B, S, C*p*p]``. For the Edit / Edit-Plus models the
pipeline appends the reference images' packed latents to the noisy latents along the sequence and
lists one ``(frames, h, w)`` grid per part in ``img_shapes`` (noisy latents first); the stack and the
cache see the whole sequence, and the head returns a prediction for every token (the pipeline keeps
the noisy-latent part). ``zero_cond_t`` checkpoints modulate the reference tokens with a t=0
embedding; the blocks receive the selecting index via ``block_kwargs``.
"""

from __future__ import annotations

from math import prod
from collections.abc import Iterator
from typing import Any

import torch
from diffusers import QwenImageTransformer2DModel

from ditcache.families.qwen_image.ulysses import PROCESSORS
from ditcache.parallel.ulysses import UlyssesContext
from ditcache.runtime.adapter import FamilyAdapter, StackState

ImgShapes = list[list[tuple[int, int, int]]] | list[tuple[int, int, int]]


class QwenImageAdapter(FamilyAdapter):
    """Cache-ready view of a ``QwenImageTransformer2DModel`` (T2I, Edit, Edit-Plus)."""

    family = "qwen_image"
    transformer_class = QwenImageTransformer2DModel
    ulysses_processors = PROCESSORS

    @property
    def patch_size(self) -> tuple[int, ...]:
        p = self.transformer.config.patch_size
        return (p, p)

    def max_positions(self) -> int:
        """Qwen-Image's rotary table has ``len(pos_freqs)`` positions; with ``scale_rope`` an axis is
        centred on 0, so it spans twice that (the text tokens follow the image's largest index)."""
        rope = self.transformer.pos_embed
        size = rope.pos_freqs.shape[0]
        return 2 * size if rope.scale_rope else size

    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        img_shapes: ImgShapes,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
        controlnet_block_samples: list[torch.Tensor] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> StackState:
        """Embed packed latents ``[B, S, C*p*p]`` and text ``[B, L, D_txt]``; rope, temb, masks.

        ``timestep`` is sigma in [0, 1] (the model scales it by 1000 itself). ``img_shapes`` is, per
        batch entry, the list of latent grids ``(frames, h/p, w/p)`` making up the image sequence.
        ``encoder_hidden_states_mask`` marks valid text tokens (any pattern); ``None`` = all valid.
        """
        t = self.transformer
        tokens = t.img_in(hidden_states)
        timestep = timestep.to(tokens.dtype)

        modulate_index = None
        if t.zero_cond_t:
            # Rows [0, B) carry the real timestep, rows [B, 2B) t=0 for the reference-image tokens.
            timestep = torch.cat([timestep, timestep * 0], dim=0)
            modulate_index = torch.tensor(
                [[0] * prod(sample[0]) + [1] * sum(prod(s) for s in sample[1:]) for sample in img_shapes],
                device=timestep.device,
                dtype=torch.int,
            )

        text = t.txt_in(t.txt_norm(encoder_hidden_states))
        if encoder_hidden_states_mask is not None:
            if encoder_hidden_states_mask.shape != text.shape[:2]:
                raise ValueError(
                    f"encoder_hidden_states_mask has shape {tuple(encoder_hidden_states_mask.shape)}; "
                    f"expected (batch, text_len) = {tuple(text.shape[:2])}"
                )
            encoder_hidden_states_mask = encoder_hidden_states_mask.to(torch.bool)

        temb = t.time_text_embed(timestep, tokens, additional_t_cond)
        image_rotary_emb = t.pos_embed(img_shapes, max_txt_seq_len=text.shape[1], device=tokens.device)

        return StackState(
            hidden_states=tokens,
            block_kwargs={
                "encoder_hidden_states": text,
                "encoder_hidden_states_mask": encoder_hidden_states_mask,
                "temb": temb,
                "image_rotary_emb": image_rotary_emb,
                "joint_attention_kwargs": attention_kwargs,
                "modulate_index": modulate_index,
                "controlnet_block_samples": controlnet_block_samples,
            },
            # The head modulates with the real timestep only (the first half under zero_cond_t).
            head_kwargs={"temb": temb.chunk(2, dim=0)[0] if t.zero_cond_t else temb},
        )

    def shard_block_kwargs(self, block_kwargs: dict[str, Any], sp: UlyssesContext) -> dict[str, Any]:
        """The image rope ``[S, D]``, ``modulate_index`` ``[B, S]`` and ControlNet residuals
        ``[B, S, D]`` follow the tokens; text tokens, their mask and the text rope stay whole."""
        sharded = dict(block_kwargs)
        image_freqs, text_freqs = block_kwargs["image_rotary_emb"]
        sharded["image_rotary_emb"] = (sp.shard_like(image_freqs, dim=0), text_freqs)
        if block_kwargs["modulate_index"] is not None:
            sharded["modulate_index"] = sp.shard_like(block_kwargs["modulate_index"], dim=1)
        if block_kwargs["controlnet_block_samples"]:
            sharded["controlnet_block_samples"] = [
                sp.shard_like(r, dim=1) for r in block_kwargs["controlnet_block_samples"]
            ]
        return sharded

    def iter_blocks(self, state: StackState, hidden_states: torch.Tensor) -> Iterator[torch.Tensor]:
        kw = dict(state.block_kwargs)
        text = kw.pop("encoder_hidden_states")
        controlnet = kw.pop("controlnet_block_samples")
        blocks = self.transformer.transformer_blocks
        # ControlNet residuals are spread evenly over the blocks (ceil), as the model does.
        interval = -(-len(blocks) // len(controlnet)) if controlnet else 0
        for i, block in enumerate(blocks):
            text, hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=text, **kw)
            if controlnet:
                hidden_states = hidden_states + controlnet[i // interval]
            yield hidden_states

    def head(self, hidden_states: torch.Tensor, state: StackState) -> torch.Tensor:
        """Packed prediction ``[B, S, p*p*C_out]`` for every image token."""
        t = self.transformer
        return t.proj_out(t.norm_out(hidden_states, state.head_kwargs["temb"]))
