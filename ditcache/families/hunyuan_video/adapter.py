"""HunyuanVideo adapter: diffusers ``HunyuanVideoTransformer3DModel`` as embed -> blocks -> head.

The stack is the dual-stream ``transformer_blocks`` (image and text tokens kept apart, joint
attention) followed by the single-stream ``single_transformer_blocks`` (image and text tokens
concatenated, image first). Only the image tokens leave the stack: the head reads nothing else, so
the cache's residual is that of the image stream and a skipped step needs no text state.

Both image-to-video variants of the class are covered: ``latent_concat`` changes only the input
channels (the pipeline concatenates image latents and a mask), ``token_replace`` gives the first
latent frame its own modulation (a t=0 embedding), which the blocks receive via ``block_kwargs``.

Under sequence parallelism the first-frame tokens are the leading block of the sequence, so on each
contiguous shard they are a (possibly empty) prefix: the blocks get that local prefix length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from diffusers import HunyuanVideoTransformer3DModel

from ditcache.families.hunyuan_video.ulysses import PROCESSORS
from ditcache.parallel.ulysses import UlyssesContext
from ditcache.runtime.adapter import FamilyAdapter, StackState


class HunyuanVideoAdapter(FamilyAdapter):
    """Cache-ready view of a ``HunyuanVideoTransformer3DModel`` (T2V and both I2V variants)."""

    family = "hunyuan_video"
    transformer_class = HunyuanVideoTransformer3DModel
    ulysses_processors = PROCESSORS

    @property
    def patch_size(self) -> tuple[int, ...]:
        cfg = self.transformer.config
        return (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)

    @property
    def uses_embedded_guidance(self) -> bool:
        """True for guidance-distilled checkpoints, which need a ``guidance`` input every forward."""
        return self.transformer.time_text_embed.guidance_embedder is not None

    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        pooled_projections: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
    ) -> StackState:
        """Patch-embed ``[B, C, F, H, W]`` latents; refine the text tokens; build rope, temb and mask.

        ``encoder_attention_mask`` marks valid text tokens (a padded prefix mask, as the Llama
        encoder produces); ``None`` means every text token is valid. ``guidance`` is the embedded
        guidance scale times 1000, required when the checkpoint is guidance-distilled.
        """
        t = self.transformer
        batch, _, frames, height, width = hidden_states.shape
        p_t, p, _ = self.patch_size
        grid = (frames // p_t, height // p, width // p)
        if self.uses_embedded_guidance and guidance is None:
            raise ValueError(
                "this HunyuanVideo checkpoint has guidance_embeds=True: pass guidance="
                "embedded_guidance_scale * 1000 (one value per batch entry)"
            )
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(
                encoder_hidden_states.shape[:2], dtype=torch.bool, device=encoder_hidden_states.device
            )

        image_rotary_emb = t.rope(hidden_states)
        temb, token_replace_emb = t.time_text_embed(timestep, pooled_projections, guidance)
        tokens = t.x_embedder(hidden_states)
        text = t.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

        # Joint key mask over [image | text]: every image token, then the first n valid text tokens
        # (the encoder pads at the end, so the count of valid tokens locates them).
        n_valid_text = encoder_attention_mask.sum(dim=1, dtype=torch.int)
        text_keep = torch.arange(text.shape[1], device=tokens.device)[None, :] < n_valid_text[:, None]
        image_keep = torch.ones(batch, tokens.shape[1], dtype=torch.bool, device=tokens.device)
        attention_mask = torch.cat([image_keep, text_keep], dim=1)[:, None, None, :]

        return StackState(
            hidden_states=tokens,
            block_kwargs={
                "encoder_hidden_states": text,
                "temb": temb,
                "attention_mask": attention_mask,
                "image_rotary_emb": image_rotary_emb,
                "token_replace_emb": token_replace_emb,
                "first_frame_num_tokens": grid[1] * grid[2],
            },
            head_kwargs={"temb": temb, "grid": grid},
        )

    def shard_block_kwargs(self, block_kwargs: dict[str, Any], sp: UlyssesContext) -> dict[str, Any]:
        """Rope ``[S, D]`` follows the tokens; the joint key mask stays whole (the Ulysses processor
        splits it), and the first-frame count becomes this shard's share of the first frame."""
        sharded = dict(block_kwargs)
        sharded["image_rotary_emb"] = tuple(sp.shard_like(r, dim=0) for r in block_kwargs["image_rotary_emb"])
        sharded["first_frame_num_tokens"] = sp.local_count(block_kwargs["first_frame_num_tokens"])
        return sharded

    def iter_blocks(self, state: StackState, hidden_states: torch.Tensor) -> Iterator[torch.Tensor]:
        kw = state.block_kwargs
        # Positional because the plain and token-replace blocks name these arguments differently.
        args = (
            kw["temb"],
            kw["attention_mask"],
            kw["image_rotary_emb"],
            kw["token_replace_emb"],
            kw["first_frame_num_tokens"],
        )
        text = kw["encoder_hidden_states"]
        for block in [*self.transformer.transformer_blocks, *self.transformer.single_transformer_blocks]:
            hidden_states, text = block(hidden_states, text, *args)
            yield hidden_states

    def head(self, hidden_states: torch.Tensor, state: StackState) -> torch.Tensor:
        """Tokens ``[B, F'H'W', D]`` back to a ``[B, C_out, F, H, W]`` prediction."""
        t = self.transformer
        frames, height, width = state.head_kwargs["grid"]
        p_t, p, _ = self.patch_size
        x = t.proj_out(t.norm_out(hidden_states, state.head_kwargs["temb"]))
        x = x.reshape(x.shape[0], frames, height, width, -1, p_t, p, p)
        # [B, F', H', W', C, pt, p, p] -> [B, C, F', pt, H', p, W', p]
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
