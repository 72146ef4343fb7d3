"""Adapter for diffusers' ``WanTransformer3DModel`` (Wan2.1 T2V/I2V/FL2V, Wan2.2 experts).

Re-composes ``WanTransformer3DModel.forward`` as embed -> blocks -> head, reusing its submodules:
the result equals the diffusers forward (up to float rounding) when every step is computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from ditcache.families.wan.ulysses import PROCESSORS
from ditcache.parallel.ulysses import UlyssesContext
from ditcache.runtime.adapter import FamilyAdapter, StackState


class WanAdapter(FamilyAdapter):
    """Wan transformer split for caching.

    ``extra`` accepts ``encoder_hidden_states_image`` (I2V / FL2V CLIP image tokens). The timestep
    may be ``[B]`` (one per sample) or ``[B, S]`` (one per token, Wan2.2 TI2V), like diffusers.
    """

    family = "wan"
    transformer_class = WanTransformer3DModel
    ulysses_processors = PROCESSORS

    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        **extra: Any,
    ) -> StackState:
        if extra:
            raise TypeError(f"WanAdapter.embed got unexpected arguments: {', '.join(sorted(extra))}")
        model = self.transformer
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = model.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)

        rotary_emb = model.rope(hidden_states)
        # flatten+transpose leaves a strided view; the blocks run faster on contiguous tokens.
        tokens = model.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()

        per_token = timestep.ndim == 2
        temb, timestep_proj, text, image = model.condition_embedder(
            timestep.flatten() if per_token else timestep,
            encoder_hidden_states,
            encoder_hidden_states_image,
            timestep_seq_len=timestep.shape[1] if per_token else None,
        )
        # Six modulation vectors per block: [B, 6, D], or [B, S, 6, D] with per-token timesteps.
        timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))
        if image is not None:
            text = torch.cat([image, text], dim=1)

        return StackState(
            hidden_states=tokens,
            block_kwargs={"encoder_hidden_states": text, "temb": timestep_proj, "rotary_emb": rotary_emb},
            head_kwargs={"temb": temb, "batch": batch, "grid": grid},
        )

    def shard_block_kwargs(self, block_kwargs: dict[str, Any], sp: UlyssesContext) -> dict[str, Any]:
        """Rope ``[1, S, 1, D]`` (cos, sin) and a per-token modulation ``[B, S, 6, D]`` follow the tokens;
        text tokens and a per-sample modulation ``[B, 6, D]`` are the same for every token."""
        sharded = dict(block_kwargs)
        sharded["rotary_emb"] = tuple(sp.shard_like(r, dim=1) for r in block_kwargs["rotary_emb"])
        if block_kwargs["temb"].ndim == 4:
            sharded["temb"] = sp.shard_like(block_kwargs["temb"], dim=1)
        return sharded

    def iter_blocks(self, state: StackState, hidden_states: torch.Tensor) -> Iterator[torch.Tensor]:
        for block in self.transformer.blocks:
            hidden_states = block(hidden_states, **state.block_kwargs)
            yield hidden_states

    def max_positions(self) -> int:
        """Wan precomputes its rotary table for ``rope_max_seq_len`` positions per axis."""
        return self.transformer.rope.max_seq_len

    def modulation(self, state: StackState) -> torch.Tensor:
        """The first block's timestep modulation ``timestep_proj`` (TeaCache's ``e0`` for Wan)."""
        return state.block_kwargs["temb"]

    def head(self, hidden_states: torch.Tensor, state: StackState) -> torch.Tensor:
        model = self.transformer
        temb = state.head_kwargs["temb"]
        table = model.scale_shift_table.to(temb.device)
        if temb.ndim == 3:  # per-token time embedding [B, S, D]
            shift, scale = (table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (table + temb.unsqueeze(1)).chunk(2, dim=1)
        shift = shift.to(hidden_states.device)
        scale = scale.to(hidden_states.device)

        x = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        x = model.proj_out(x)

        batch = state.head_kwargs["batch"]
        f, h, w = state.head_kwargs["grid"]
        p_t, p_h, p_w = model.config.patch_size
        x = x.reshape(batch, f, h, w, p_t, p_h, p_w, -1)
        # [B, f, h, w, pt, ph, pw, C] -> [B, C, f*pt, h*ph, w*pw]
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
