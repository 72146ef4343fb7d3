"""Qwen-Image's Ulysses attention processor: joint ``[text, image]`` attention of its dual-stream blocks."""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import (
    QwenDoubleStreamAttnProcessor2_0,
    apply_rotary_emb_qwen,
)

from ditcache.parallel.ulysses import UlyssesProcessor


class UlyssesQwenDoubleStreamAttnProcessor(UlyssesProcessor):
    """Ulysses version of ``QwenDoubleStreamAttnProcessor2_0`` (joint ``[text, image]`` attention).

    ``image_rotary_emb`` is ``(local image freqs, full text freqs)``: the image part sharded like the
    tokens (:meth:`UlyssesContext.shard_like`), the text part as the unsharded model computes it.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:

        if encoder_hidden_states is None:
            raise ValueError("Ulysses Qwen-Image attention requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError("Ulysses Qwen-Image attention takes encoder_hidden_states_mask, not attention_mask")
        head_dim = attn.inner_dim // attn.heads
        img = [p(hidden_states).unflatten(-1, (-1, head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v)]
        txt = [
            p(encoder_hidden_states).unflatten(-1, (-1, head_dim))
            for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        ]
        norms = ((img, attn.norm_q, attn.norm_k), (txt, attn.norm_added_q, attn.norm_added_k))
        for stream, norm_q, norm_k in norms:
            if norm_q is not None:
                stream[0] = norm_q(stream[0])
            if norm_k is not None:
                stream[1] = norm_k(stream[1])
        if image_rotary_emb is not None:
            for stream, freqs in zip((img, txt), image_rotary_emb):
                stream[0] = apply_rotary_emb_qwen(stream[0], freqs, use_real=False)
                stream[1] = apply_rotary_emb_qwen(stream[1], freqs, use_real=False)
        txt_mask = None if encoder_hidden_states_mask is None else encoder_hidden_states_mask.to(torch.bool)
        img_out, txt_out = self.ctx.attention(tuple(img), tuple(txt), txt_key_mask=txt_mask, txt_first=True)
        img_out = attn.to_out[0](img_out.flatten(2, 3).to(img[0].dtype).contiguous())
        if len(attn.to_out) > 1:
            img_out = attn.to_out[1](img_out)
        txt_out = attn.to_add_out(txt_out.flatten(2, 3).to(img[0].dtype).contiguous())
        return img_out, txt_out


PROCESSORS: dict[type, type[UlyssesProcessor]] = {QwenDoubleStreamAttnProcessor2_0: UlyssesQwenDoubleStreamAttnProcessor}
