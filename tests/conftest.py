"""Shared fixtures: tiny random Wan transformers and a tiny real prompt encoder (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

TEXT_DIM = 8


@pytest.fixture(autouse=True)
def _isolated_user_config(tmp_path_factory, monkeypatch):
    """Every test (and the processes it starts) gets an empty per-user config home, so nothing a
    test calibrates lands in the real ~/.config/ditcache/params, and no user file there changes a result."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))
    monkeypatch.delenv("DITCACHE_PARAMS_DIR", raising=False)


def tiny_wan(seed: int = 0, **overrides) -> WanTransformer3DModel:
    """A 2-layer, 2-head x 8-dim Wan transformer with random weights."""
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=TEXT_DIM,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=32,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return WanTransformer3DModel(**config).eval()


class TinyPromptEncoder(torch.nn.Module):
    """A real (random) prompt encoder: characters -> embeddings -> one linear layer, fixed length."""

    def __init__(self, text_dim: int = TEXT_DIM, length: int = 6, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.length = length
        self.table = torch.nn.Parameter(torch.randn(128, text_dim, generator=generator))
        self.mix = torch.nn.Linear(text_dim, text_dim)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            codes = [ord(c) % 128 for c in prompt[: self.length]]
            ids[row, : len(codes)] = torch.tensor(codes, dtype=torch.long)
        return self.mix(self.table[ids])


@pytest.fixture
def make_tiny_wan():
    """Factory of tiny random Wan transformers (``make_tiny_wan(seed, **config_overrides)``)."""
    return tiny_wan


@pytest.fixture
def prompt_encoder() -> TinyPromptEncoder:
    return TinyPromptEncoder()
