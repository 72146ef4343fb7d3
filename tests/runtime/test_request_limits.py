"""Sizes past the model's rotary table or the device's memory fail with one line naming the
argument, before the transformer runs (and before the latents are allocated)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import HUNYUAN_POOLED_DIM, HUNYUAN_TEXT_DIM, QWEN_TEXT_DIM, REPO, tiny_hunyuan, tiny_qwen, tiny_wan
from ditcache.errors import ParamsError
from ditcache.families import adapter_for
from ditcache.families.hunyuan_video.pipeline import HunyuanPromptEmbeds, HunyuanVideoPipeline
from ditcache.families.qwen_image.pipeline import QwenImagePipeline, QwenPromptEmbeds
from ditcache.families.wan.pipeline import WanPipeline
from ditcache.runtime.limits import check_size, free_memory
from ditcache.runtime.loading import ModelSettings

SETTINGS = ModelSettings(
    latent_space="pixel", height=8, width=8, num_frames=1, default_steps=2, default_shift=1.0,
    default_guidance_scale=4.0, model_type=None, boundary_ratio=None,
)


def forward_calls(model: torch.nn.Module) -> list[int]:
    """A counter of calls into any of the transformer's submodules."""
    calls: list[int] = []
    for module in model.children():
        module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_wan_height_past_the_rotary_table_names_height(prompt_encoder):
    model = tiny_wan(rope_max_seq_len=32)  # 32 positions of 2 pixels: 64 pixels at most
    calls = forward_calls(model)
    pipe = WanPipeline({"transformer": model}, prompt_encoder, SETTINGS)
    pipe("a seven", height=64, width=8, progress=False, output_type="latent")  # the last row that fits
    calls.clear()
    with pytest.raises(ParamsError, match=r"height=66 gives 33 rotary positions along height.*table of 32.*lower height"):
        pipe("a seven", height=66, width=8, progress=False)
    assert calls == []


def test_wan_memory_floor_refuses_a_huge_size_before_allocating(prompt_encoder):
    model = tiny_wan(rope_max_seq_len=2_000_000)  # only the memory floor can stop it
    calls = forward_calls(model)
    pipe = WanPipeline({"transformer": model}, prompt_encoder, SETTINGS)
    with pytest.raises(ParamsError, match=r"height=4000000 x width=4000000 makes .* tokens.*GiB are free"):
        pipe("a seven", height=4_000_000, width=4_000_000, progress=False)
    assert calls == []


def test_memory_floor_scales_with_batch_and_uses_the_given_free_bytes():
    adapter = adapter_for(tiny_wan())  # 16 channels, fp32: 2 * 4 * 16 = 128 bytes per token and sample
    sizes = {"num_frames": 1, "height": 16, "width": 16}
    check_size(adapter, (1, 16, 16), 2, sizes, free_bytes=2 * 64 * 128)  # 64 tokens, 2 samples: fits exactly
    with pytest.raises(ParamsError, match=r"2 sample\(s\) needs at least"):
        check_size(adapter, (1, 16, 16), 2, sizes, free_bytes=2 * 64 * 128 - 1)


def test_free_memory_reads_the_host():
    free = free_memory(torch.device("cpu"))
    assert free is not None and free > 0


def test_hunyuan_has_no_table_but_the_memory_floor_applies():
    model = tiny_hunyuan()
    calls = forward_calls(model)
    assert adapter_for(model).max_positions() is None
    g = torch.Generator().manual_seed(0)
    embeds = HunyuanPromptEmbeds(
        torch.randn(1, 4, HUNYUAN_TEXT_DIM, generator=g), torch.ones(1, 4, dtype=torch.long),
        torch.randn(1, HUNYUAN_POOLED_DIM, generator=g),
    )
    with pytest.raises(ParamsError, match=r"num_frames=5 x height=4000000 x width=4000000 makes"):
        HunyuanVideoPipeline(model)(
            prompt_embeds=embeds, height=4_000_000, width=4_000_000, num_frames=5, num_inference_steps=2,
            output_type="latent", progress=False,
        )
    assert calls == []


def test_qwen_rotary_table_is_checked():
    model = tiny_qwen()
    adapter = adapter_for(model)
    limit = adapter.max_positions()
    assert limit == 2 * model.pos_embed.pos_freqs.shape[0]
    calls = forward_calls(model)
    embeds = QwenPromptEmbeds(torch.randn(1, 5, QWEN_TEXT_DIM))
    height = (limit + 1) * 2 * 8  # one position past the table (patch 2, VAE scale 8)
    with pytest.raises(ParamsError, match=rf"height={height} gives {limit + 1} rotary positions"):
        QwenImagePipeline(model)(
            prompt_embeds=embeds, height=height, width=64, num_inference_steps=2, guidance_scale=1.0,
            output_type="latent", progress=False,
        )
    assert calls == []


def test_cli_generate_with_a_huge_height_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ditcache.cli", "generate", "--height", "100000", "--width", "100000",
         "--output", str(tmp_path / "x.png")],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # The reference model's rotary table (64 positions) is the first limit a height of 100000 meets.
    assert len(lines) == 1 and "height=100000 gives 50000 rotary positions" in lines[0], result.stderr
    assert not (tmp_path / "x.png").exists()
