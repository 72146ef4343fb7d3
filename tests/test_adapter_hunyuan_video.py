"""HunyuanVideoAdapter reproduces HunyuanVideoTransformer3DModel's forward, T2V and both I2V kinds."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from ditcache.cache.base import NoCache
from ditcache.runtime.adapters import adapter_for
from ditcache.runtime.adapters.hunyuan_video import HunyuanVideoAdapter

TEXT_DIM, POOLED_DIM = 16, 8


def tiny_hunyuan(image_condition_type: str | None = None, guidance_embeds: bool = True):
    """1 dual + 1 single block, 2 heads x 8 dims, rope axes (2, 2, 4) summing to the head dim."""
    torch.manual_seed(0)
    in_channels = 9 if image_condition_type == "latent_concat" else 4
    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        rope_axes_dim=(2, 2, 4),
        guidance_embeds=guidance_embeds,
        image_condition_type=image_condition_type,
    ).eval()


def branch_inputs(seed: int, valid_text: list[int]) -> dict[str, torch.Tensor]:
    """Text inputs of one CFG branch: embeddings, a right-padded mask, pooled projections."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(valid_text), 6, dtype=torch.long)
    for row, n in enumerate(valid_text):
        mask[row, :n] = 1
    return {
        "encoder_hidden_states": torch.randn(len(valid_text), 6, TEXT_DIM, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(len(valid_text), POOLED_DIM, generator=g),
    }


BRANCHES = {"cond": (1, [4, 6]), "uncond": (2, [1, 3])}


@pytest.mark.parametrize("image_condition_type", [None, "latent_concat", "token_replace"])
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_adapter_matches_diffusers_forward(image_condition_type, branch):
    model = tiny_hunyuan(image_condition_type)
    adapter = adapter_for(model)
    assert isinstance(adapter, HunyuanVideoAdapter)
    x = torch.randn(2, model.config.in_channels, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0, 700.0])
    guidance = torch.tensor([6000.0, 6000.0])
    seed, valid = BRANCHES[branch]
    text = branch_inputs(seed, valid)
    is_cond = branch == "cond"
    with torch.no_grad():
        expected = model(x, t, guidance=guidance, return_dict=False, **text)[0]
        plain = adapter(x, t, guidance=guidance, is_cond=is_cond, **text)
        no_cache = adapter(x, t, guidance=guidance, is_cond=is_cond, cache=NoCache(), **text)
    assert plain.shape == expected.shape == (2, 4, 3, 4, 6)
    assert (plain - expected).abs().max().item() <= 1e-5
    assert (no_cache - expected).abs().max().item() <= 1e-5
    assert adapter.stack_passes == {branch: 2}


def test_adapter_without_guidance_embedding_matches():
    model = tiny_hunyuan(guidance_embeds=False)
    adapter = HunyuanVideoAdapter(model)
    x = torch.randn(1, 4, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([250.0])
    text = branch_inputs(5, [5])
    with torch.no_grad():
        expected = model(x, t, return_dict=False, **text)[0]
        got = adapter(x, t, **text)
    assert (got - expected).abs().max().item() <= 1e-5


def test_guidance_distilled_model_requires_guidance():
    adapter = HunyuanVideoAdapter(tiny_hunyuan())
    with pytest.raises(ValueError, match="guidance"):
        adapter(torch.randn(1, 4, 1, 4, 4), torch.tensor([1.0]), **branch_inputs(0, [3]))
