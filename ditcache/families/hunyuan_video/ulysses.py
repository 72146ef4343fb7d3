"""HunyuanVideo's Ulysses attention processor, for its dual-stream and single-stream blocks."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

from ditcache.parallel.ulysses import UlyssesProcessor


class UlyssesHunyuanVideoAttnProcessor(UlyssesProcessor):
    """Ulysses version of ``HunyuanVideoAttnProcessor2_0``: dual-stream blocks (separate text
    projections ``add_*_proj``) and single-stream blocks (shared projections, ``pre_only``).

    ``attention_mask`` is what the unsharded model passes: a bool key mask over
    ``[all image tokens, text tokens]``.
    """

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:

        n_local = hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        x = hidden_states
        if single_stream and encoder_hidden_states is not None:
            x = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        qkv = [proj(x).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)]
        if attn.norm_q is not None:
            qkv[0] = attn.norm_q(qkv[0])
        if attn.norm_k is not None:
            qkv[1] = attn.norm_k(qkv[1])
        img = [t[:, :n_local] for t in qkv]
        txt = None
        if encoder_hidden_states is not None:
            if single_stream:
                txt = [t[:, n_local:] for t in qkv]
            else:
                txt = [
                    proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
                    for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
                ]
                if attn.norm_added_q is not None:
                    txt[0] = attn.norm_added_q(txt[0])
                if attn.norm_added_k is not None:
                    txt[1] = attn.norm_added_k(txt[1])
        if image_rotary_emb is not None:
            img[0] = apply_rotary_emb(img[0], image_rotary_emb, sequence_dim=1)
            img[1] = apply_rotary_emb(img[1], image_rotary_emb, sequence_dim=1)
        img_mask = txt_mask = None
        if attention_mask is not None:
            n_txt = 0 if txt is None else txt[0].shape[1]
            img_mask, txt_mask = self.ctx.split_key_mask(attention_mask, x.shape[0], n_txt)
        img_out, txt_out = self.ctx.attention(
            tuple(img), None if txt is None else tuple(txt), img_key_mask=img_mask, txt_key_mask=txt_mask
        )
        img_out = img_out.flatten(2, 3).to(img[0].dtype)
        if encoder_hidden_states is None:
            return img_out, None
        txt_out = txt_out.flatten(2, 3).to(img[0].dtype)
        if getattr(attn, "to_out", None) is not None:
            img_out = attn.to_out[1](attn.to_out[0](img_out))
        if getattr(attn, "to_add_out", None) is not None:
            txt_out = attn.to_add_out(txt_out)
        return img_out, txt_out


PROCESSORS: dict[type, type[UlyssesProcessor]] = {HunyuanVideoAttnProcessor2_0: UlyssesHunyuanVideoAttnProcessor}
