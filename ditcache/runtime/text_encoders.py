"""Prompt encoders: ``encode(prompts) -> [B, L, text_dim]`` embeddings for the transformer.

Any object with this ``encode`` method (and a ``device``/``dtype`` it produces on) serves a pipeline.
Real Wan checkpoints use UMT5-XXL (:class:`UMT5TextEncoder`); the reference model ships its own
small digit prompt encoder (``ditcache.runtime.reference.DigitPromptEncoder``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class TextEncoder(Protocol):
    """What a pipeline needs from a prompt encoder."""

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Embed ``prompts`` as ``[len(prompts), L, text_dim]``."""
        ...


class UMT5TextEncoder(torch.nn.Module):
    """UMT5 encoder + tokenizer loaded from local directories, encoding like Wan does.

    Wan pads every prompt to ``max_length`` tokens and zeroes the embeddings past the prompt's end
    (the transformer attends to all ``max_length`` positions, and the padding must carry nothing).
    """

    def __init__(self, encoder: torch.nn.Module, tokenizer, max_length: int = 512) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_pretrained(
        cls,
        encoder_dir: str | Path,
        tokenizer_dir: str | Path,
        *,
        max_length: int = 512,
        dtype: torch.dtype = torch.float32,
        device_map: dict[str, torch.device] | None = None,
    ) -> "UMT5TextEncoder":
        """Load from ``text_encoder/`` and ``tokenizer/`` folders; never downloads.

        transformers builds the encoder empty and reads the weights shard by shard into ``dtype``,
        placing them per ``device_map`` (None: the CPU), so UMT5-XXL never exists twice in memory.
        """
        from transformers import AutoTokenizer, UMT5EncoderModel

        encoder = UMT5EncoderModel.from_pretrained(
            str(encoder_dir), dtype=dtype, device_map=device_map, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        return cls(encoder.eval(), tokenizer, max_length=max_length)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(device)
        mask = tokens.attention_mask.to(device)
        hidden = self.encoder(ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)
