"""QwenImageAdapter reproduces QwenImageTransformer2DModel's forward: T2I and Edit-Plus shapes."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel

from ditcache.cache.base import NoCache
from ditcache.runtime.adapters import adapter_for
from ditcache.runtime.adapters.qwen_image import QwenImageAdapter

TEXT_DIM = 16


def tiny_qwen(zero_cond_t: bool = False):
    """2 dual-stream blocks, 2 heads x 16 dims, rope axes (4, 6, 6); 4 latent channels, 2x2 packing."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    ).eval()


def branch_text(seed: int, valid_text: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(valid_text), 5, dtype=torch.long)
    for row, n in enumerate(valid_text):
        mask[row, :n] = 1
    return torch.randn(len(valid_text), 5, TEXT_DIM, generator=g), mask


BRANCHES = {"cond": (1, [3, 5]), "uncond": (2, [1, 2])}
# T2I: one 3x4 grid of packed tokens. Edit-Plus: the noisy grid, then two reference images' grids.
SHAPES = {"t2i": [(1, 3, 4)], "edit_plus": [(1, 3, 4), (1, 2, 3), (1, 2, 2)]}


# zero_cond_t (t=0 modulation of the reference tokens) only exists with reference images.
@pytest.mark.parametrize("layout, zero_cond_t", [("t2i", False), ("edit_plus", False), ("edit_plus", True)])
@pytest.mark.parametrize("branch", ["cond", "uncond"])
def test_adapter_matches_diffusers_forward(layout, zero_cond_t, branch):
    model = tiny_qwen(zero_cond_t)
    adapter = adapter_for(model)
    assert isinstance(adapter, QwenImageAdapter)
    shapes = [SHAPES[layout]] * 2
    n_tokens = sum(f * h * w for f, h, w in SHAPES[layout])
    x = torch.randn(2, n_tokens, 16, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.6, 0.6])
    seed, valid = BRANCHES[branch]
    text, mask = branch_text(seed, valid)
    is_cond = branch == "cond"
    with torch.no_grad():
        expected = model(x, text, mask, sigma, shapes, return_dict=False)[0]
        plain = adapter(x, sigma, text, encoder_hidden_states_mask=mask, img_shapes=shapes, is_cond=is_cond)
        no_cache = adapter(
            x, sigma, text, encoder_hidden_states_mask=mask, img_shapes=shapes, is_cond=is_cond, cache=NoCache()
        )
    assert plain.shape == expected.shape == (2, n_tokens, 16)
    assert (plain - expected).abs().max().item() <= 1e-5
    assert (no_cache - expected).abs().max().item() <= 1e-5
    assert adapter.stack_passes == {branch: 2}


def test_adapter_without_text_mask_and_with_controlnet_residuals_matches():
    model = tiny_qwen()
    adapter = QwenImageAdapter(model)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 12, 16, generator=g)
    text = torch.randn(1, 5, TEXT_DIM, generator=g)
    controlnet = [torch.randn(1, 12, 32, generator=g)]
    sigma = torch.tensor([0.3])
    with torch.no_grad():
        expected = model(
            x, text, None, sigma, [[(1, 3, 4)]], controlnet_block_samples=controlnet, return_dict=False
        )[0]
        got = adapter(x, sigma, text, img_shapes=[[(1, 3, 4)]], controlnet_block_samples=controlnet)
    assert (got - expected).abs().max().item() <= 1e-5


def test_mask_of_wrong_shape_is_a_clear_error():
    adapter = QwenImageAdapter(tiny_qwen())
    text, mask = branch_text(0, [2])
    with pytest.raises(ValueError, match="encoder_hidden_states_mask"):
        adapter(torch.randn(1, 12, 16), torch.tensor([0.5]), text, encoder_hidden_states_mask=mask[:, :3],
                img_shapes=[[(1, 3, 4)]])
