"""WanAdapter re-composes WanTransformer3DModel.forward exactly, and the cache wraps only the stack."""

from __future__ import annotations

import pytest
import torch

from ditcache.cache.none import NoCache
from ditcache.errors import UnknownModelError
from ditcache.families import adapter_class, adapter_for, known_families
from ditcache.families.wan.adapter import WanAdapter

TOL = 1e-5


def _inputs(batch=2, channels=4, frames=2, height=8, width=6, text_len=5, text_dim=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, channels, frames, height, width, generator=g)
    text = torch.randn(batch, text_len, text_dim, generator=g)
    timestep = torch.tensor([900.0, 250.0][:batch])
    return latents, timestep, text


@torch.no_grad()
def test_t2v_matches_diffusers_forward_cond_and_uncond(make_tiny_wan):
    model = make_tiny_wan()
    adapter = adapter_for(model)
    assert isinstance(adapter, WanAdapter)
    latents, timestep, text = _inputs()
    uncond_text = torch.zeros_like(text)
    cache = NoCache()
    for is_cond, emb in ((True, text), (False, uncond_text)):
        expected = model(latents, timestep, emb, return_dict=False)[0]
        got = adapter(latents, timestep, emb, is_cond=is_cond, cache=cache)
        assert got.shape == expected.shape == latents.shape
        assert (got - expected).abs().max().item() <= TOL
    assert adapter.stack_passes == {"cond": 1, "uncond": 1}
    assert cache.stats()["cond"]["computed_steps"] == [0]


@torch.no_grad()
def test_i2v_image_tokens_match_diffusers_forward(make_tiny_wan):
    # Wan's attention processor takes everything before the last 512 text tokens as image context.
    model = make_tiny_wan(image_dim=12, added_kv_proj_dim=16, in_channels=8, out_channels=4)
    adapter = adapter_for(model)
    latents, timestep, text = _inputs(channels=8, text_len=512)
    image = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(3))
    expected = model(latents, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]
    got = adapter(latents, timestep, text, encoder_hidden_states_image=image, cache=NoCache())
    assert got.shape == (2, 4, 2, 8, 6)
    assert (got - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_per_token_timestep_matches_diffusers_forward(make_tiny_wan):
    model = make_tiny_wan()
    adapter = adapter_for(model)
    latents, _, text = _inputs()
    tokens = 2 * (8 // 2) * (6 // 2)
    timestep = torch.linspace(0, 999, 2 * tokens).reshape(2, tokens)
    expected = model(latents, timestep, text, return_dict=False)[0]
    got = adapter(latents, timestep, text)
    assert (got - expected).abs().max().item() <= TOL


@torch.no_grad()
def test_skipped_step_runs_no_block_and_adds_cached_residual(make_tiny_wan):
    """On a skip the head sees x + residual of the last computed step; the blocks never run."""

    class SkipSecond(NoCache):
        def __init__(self):
            super().__init__()
            self.residual = None

        def should_compute(self, is_cond):
            super().should_compute(is_cond)
            return self.current_step(is_cond) == 0

        def update(self, output, ori_input, is_cond):
            self.residual = output - ori_input

        def approximate(self, input, is_cond):
            return input + self.residual

    model = make_tiny_wan()
    adapter = adapter_for(model)
    latents, timestep, text = _inputs()
    cache = SkipSecond()
    first = adapter(latents, timestep, text, cache=cache)
    calls = []
    hook = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    second = adapter(latents, timestep, text, cache=cache)
    hook.remove()
    assert calls == []
    assert adapter.stack_passes == {"cond": 1}
    # Same input, residual reused verbatim: the prediction is the computed one.
    assert torch.allclose(first, second, atol=TOL)


def test_registry_lookup_and_errors(make_tiny_wan):
    assert "wan" in known_families()
    assert adapter_class("wan") is WanAdapter
    with pytest.raises(UnknownModelError, match="known families: .*wan"):
        adapter_class("sd15")
    with pytest.raises(UnknownModelError, match="no adapter for transformer class Linear"):
        adapter_for(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="unexpected arguments: bogus"):
        adapter_for(make_tiny_wan())(*_inputs(), bogus=1)
