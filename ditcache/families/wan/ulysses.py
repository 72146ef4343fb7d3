"""Wan's Ulysses attention processor: self-attention (``attn1``) over the sharded image tokens.

Cross-attention (``attn2``) keeps its stock processor: local queries against the replicated text
keys are already exact.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from ditcache.parallel.ulysses import UlyssesProcessor


class UlyssesWanAttnProcessor(UlyssesProcessor):
    """Ulysses version of ``WanAttnProcessor`` for self-attention (``attn1``) of Wan blocks."""

    @staticmethod
    def applies_to(module: torch.nn.Module) -> bool:
        return not module.is_cross_attention

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("Ulysses Wan self-attention takes neither encoder_hidden_states nor attention_mask")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rope(query, *rotary_emb), _wan_rope(key, *rotary_emb)
        out, _ = self.ctx.attention((query, key, value))
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rope(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding (as in diffusers' WanAttnProcessor)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


PROCESSORS: dict[type, type[UlyssesProcessor]] = {WanAttnProcessor: UlyssesWanAttnProcessor}
