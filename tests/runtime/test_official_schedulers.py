"""ditcache samples as the official diffusers pipelines do: same scheduler, same timesteps, same latents.

Each family's pipeline, cache off, against diffusers' own pipeline on the same tiny random
transformer, the same scheduler config, the same initial latents and the same (precomputed)
prompt embeddings, compared on the final latents (``output_type="latent"``, no VAE).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import HUNYUAN_POOLED_DIM, HUNYUAN_TEXT_DIM, QWEN_TEXT_DIM, TinyPromptEncoder, tiny_hunyuan, tiny_qwen, tiny_wan
from ditcache.errors import ParamsError
from ditcache.families.hunyuan_video.pipeline import HunyuanPromptEmbeds, HunyuanVideoPipeline
from ditcache.families.qwen_image.pipeline import QwenImagePipeline, QwenPromptEmbeds
from ditcache.families.wan.pipeline import Wan22Pipeline, WanPipeline
from ditcache.runtime.loading import ModelSettings
from ditcache.runtime.request import initial_noise
from ditcache.runtime.scheduler import (
    HUNYUAN_VIDEO_SCHEDULER,
    QWEN_IMAGE_SCHEDULER,
    WAN_SCHEDULER,
    build_scheduler,
    hunyuan_video_schedule,
    qwen_image_schedule,
    wan_schedule,
)

STEPS = 6
SEED = 11
PROMPTS, NEGATIVE = ["a seven", "a two"], "blurry"
WAN_SETTINGS = ModelSettings(
    latent_space="pixel", height=8, width=8, num_frames=2, default_steps=STEPS, default_shift=3.0,
    default_guidance_scale=4.0, model_type=None, boundary_ratio=None,
)
ATOL = 1e-5


def wan_config(shift: float) -> dict:
    return {**WAN_SCHEDULER, "flow_shift": shift}


def diffusers_wan(transformers: dict, config: dict, boundary_ratio: float | None = None):
    from diffusers import WanPipeline as DiffusersWan

    return DiffusersWan(
        tokenizer=None, text_encoder=None, vae=None, scheduler=build_scheduler(config),
        transformer=transformers["transformer"], transformer_2=transformers.get("transformer_2"),
        boundary_ratio=boundary_ratio,
    )


def diffusers_wan_latents(transformers, encoder, shift, guidance, boundary_ratio=None, **kwargs):
    pipe = diffusers_wan(transformers, wan_config(shift), boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            prompt_embeds=encoder.encode(PROMPTS),
            negative_prompt_embeds=encoder.encode([NEGATIVE] * len(PROMPTS)),
            # diffusers' geometry (VAE scale 4 x 8): 64 x 64 x 5 frames = our 8 x 8 x 2 pixel-space latents
            height=64, width=64, num_frames=5,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=initial_noise((len(PROMPTS), 4, 2, 8, 8), SEED),
            output_type="latent",
            **kwargs,
        ).frames


def ours(pipe, **kwargs):
    base = dict(prompt=PROMPTS, negative_prompt=NEGATIVE, seed=SEED, output_type="latent", progress=False)
    return pipe(**{**base, **kwargs})


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_wan_latents_equal_diffusers_wan_pipeline(shift):
    encoder, transformer = TinyPromptEncoder(), tiny_wan()
    pipe = WanPipeline({"transformer": transformer}, encoder, WAN_SETTINGS)
    out = ours(pipe, sigma_shift=shift, guidance_scale=3.0)
    expected = diffusers_wan_latents({"transformer": transformer}, encoder, shift, 3.0)
    assert out.frames.shape == expected.shape
    torch.testing.assert_close(out.frames, expected, atol=ATOL, rtol=0)
    assert out.sigmas == wan_schedule(STEPS, shift).sigmas.tolist() and out.sigmas[-1] == 0.0


def test_wan_folder_config_picks_the_class_and_the_request_shift_applies():
    """A folder's FlowMatchEuler config (as diffusers' own Wan tests use) is built as that class."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 7.0}
    encoder, transformer = TinyPromptEncoder(), tiny_wan()
    pipe = WanPipeline({"transformer": transformer}, encoder, WAN_SETTINGS, scheduler_config=config)
    out = ours(pipe, sigma_shift=2.0, guidance_scale=3.0)
    reference = FlowMatchEulerDiscreteScheduler(shift=2.0)
    reference.set_timesteps(STEPS)
    assert out.sigmas == reference.sigmas.tolist() and out.timesteps == reference.timesteps.tolist()
    dpipe = diffusers_wan({"transformer": transformer}, {**config, "shift": 2.0})
    dpipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        expected = dpipe(
            prompt_embeds=encoder.encode(PROMPTS), negative_prompt_embeds=encoder.encode([NEGATIVE] * 2),
            height=64, width=64, num_frames=5, num_inference_steps=STEPS, guidance_scale=3.0,
            latents=initial_noise((2, 4, 2, 8, 8), SEED), output_type="latent",
        ).frames
    torch.testing.assert_close(out.frames, expected, atol=ATOL, rtol=0)


BOUNDARY = 0.6  # at shift 1 the timesteps are 999, 832, 666, 500, ...: the switch is at step 3


@pytest.fixture
def wan22():
    encoder = TinyPromptEncoder()
    experts = {"transformer": tiny_wan(seed=0), "transformer_2": tiny_wan(seed=1)}
    return Wan22Pipeline(experts, encoder, replace(WAN_SETTINGS, boundary_ratio=BOUNDARY)), experts, encoder


@pytest.mark.parametrize("guidance_scale_2", [None, 1.5])
def test_wan22_latents_equal_diffusers_with_boundary_and_guidance_scale_2(wan22, guidance_scale_2):
    pipe, experts, encoder = wan22
    out = ours(pipe, sigma_shift=1.0, guidance_scale=3.0, guidance_scale_2=guidance_scale_2)
    assert out.expert_steps == {"transformer": [0, 1, 2], "transformer_2": [3, 4, 5]}
    expected = diffusers_wan_latents(experts, encoder, 1.0, 3.0, BOUNDARY, guidance_scale_2=guidance_scale_2)
    torch.testing.assert_close(out.frames, expected, atol=ATOL, rtol=0)


def test_guidance_scale_2_changes_only_the_low_noise_steps(wan22):
    pipe, experts, _ = wan22
    inputs: dict[str, list[torch.Tensor]] = {}

    def record(key):
        def hook(module, args):  # the first block's input tokens: a function of the step's latents
            inputs.setdefault(key, []).append(args[0].clone())

        return hook

    runs = {}
    for scale_2 in (3.0, 1.5):
        hooks = [
            experts[name].blocks[0].register_forward_pre_hook(record((scale_2, name))) for name in experts
        ]
        runs[scale_2] = ours(pipe, sigma_shift=1.0, guidance_scale=3.0, guidance_scale_2=scale_2)
        for hook in hooks:
            hook.remove()
    default = ours(pipe, sigma_shift=1.0, guidance_scale=3.0)
    assert torch.equal(default.frames, runs[3.0].frames)  # None means guidance_scale, as diffusers
    # The high-noise expert sees the same latents on every step, and so does the low-noise one on
    # its first step (guidance_scale_2 has not acted yet); every later low-noise step differs.
    high_a, high_b = inputs[(3.0, "transformer")], inputs[(1.5, "transformer")]
    low_a, low_b = inputs[(3.0, "transformer_2")], inputs[(1.5, "transformer_2")]
    assert len(high_a) == 2 * 3 and all(torch.equal(a, b) for a, b in zip(high_a, high_b))
    assert torch.equal(low_a[0], low_b[0]) and torch.equal(low_a[1], low_b[1])  # cond and uncond of step 3
    assert all(not torch.equal(a, b) for a, b in zip(low_a[2:], low_b[2:]))
    assert not torch.equal(runs[3.0].frames, runs[1.5].frames)


def test_guidance_scale_2_is_refused_where_it_cannot_act(wan22):
    single = WanPipeline({"transformer": tiny_wan()}, TinyPromptEncoder(), WAN_SETTINGS)
    with pytest.raises(ParamsError, match="two-expert"):
        ours(single, guidance_scale_2=2.0)
    with pytest.raises(ParamsError, match="needs guidance_scale > 1"):
        ours(wan22[0], guidance_scale=1.0, guidance_scale_2=3.0)


def test_every_request_gets_a_fresh_scheduler_so_runs_repeat_exactly(wan22):
    """UniPC keeps the previous model outputs: a scheduler shared between requests (or ranks) would
    change the second run; one built per request makes every run a function of its settings."""
    pipe, _, encoder = wan22
    first = ours(pipe, sigma_shift=1.0, guidance_scale=3.0, guidance_scale_2=2.0)
    ours(pipe, sigma_shift=2.0, guidance_scale=5.0, num_inference_steps=4, seed=3)
    again = ours(pipe, sigma_shift=1.0, guidance_scale=3.0, guidance_scale_2=2.0)
    other = Wan22Pipeline(
        {"transformer": tiny_wan(seed=0), "transformer_2": tiny_wan(seed=1)}, encoder,
        replace(WAN_SETTINGS, boundary_ratio=BOUNDARY),
    )  # another "rank": its own pipeline and scheduler, the same settings
    fresh = ours(other, sigma_shift=1.0, guidance_scale=3.0, guidance_scale_2=2.0)
    assert torch.equal(first.frames, again.frames) and torch.equal(first.frames, fresh.frames)
    a, b = wan_schedule(STEPS, 1.0), wan_schedule(STEPS, 1.0)
    assert a.scheduler is not b.scheduler and torch.equal(a.sigmas, b.sigmas)


# -- HunyuanVideo -------------------------------------------------------------------------------------


def hunyuan_embeds(seed: int, length: int) -> HunyuanPromptEmbeds:
    g = torch.Generator().manual_seed(seed)
    return HunyuanPromptEmbeds(
        torch.randn(1, length, HUNYUAN_TEXT_DIM, generator=g),
        torch.ones(1, length, dtype=torch.long),
        torch.randn(1, HUNYUAN_POOLED_DIM, generator=g),
    )


@pytest.mark.parametrize("true_cfg", [False, True])
def test_hunyuan_video_latents_equal_diffusers_pipeline(true_cfg):
    from diffusers import HunyuanVideoPipeline as DiffusersHunyuan

    transformer = tiny_hunyuan()
    cond, uncond = hunyuan_embeds(1, 6), hunyuan_embeds(2, 4)
    extra = dict(negative_prompt_embeds=uncond, guidance_scale=3.0) if true_cfg else {}
    out = HunyuanVideoPipeline(transformer)(
        prompt_embeds=cond, num_inference_steps=STEPS, height=32, width=48, num_frames=5, seed=SEED,
        sigma_shift=7.0, output_type="latent", progress=False, **extra,
    )
    dpipe = DiffusersHunyuan(
        text_encoder=None, tokenizer=None, transformer=transformer, vae=None,
        scheduler=build_scheduler(HUNYUAN_VIDEO_SCHEDULER), text_encoder_2=None, tokenizer_2=None,
    )
    dpipe.set_progress_bar_config(disable=True)
    negative = {}
    if true_cfg:
        negative = dict(
            negative_prompt_embeds=uncond.embeds, negative_pooled_prompt_embeds=uncond.pooled,
            negative_prompt_attention_mask=uncond.mask, true_cfg_scale=3.0,
        )
    with torch.no_grad():
        expected = dpipe(
            prompt_embeds=cond.embeds, pooled_prompt_embeds=cond.pooled, prompt_attention_mask=cond.mask,
            height=32, width=48, num_frames=5, num_inference_steps=STEPS, guidance_scale=6.0,
            latents=initial_noise(out.frames.shape, SEED), output_type="latent", **negative,
        ).frames
    assert out.branch_steps == ({"cond": STEPS, "uncond": STEPS} if true_cfg else {"cond": STEPS})
    torch.testing.assert_close(out.frames, expected, atol=ATOL, rtol=0)
    assert out.sigmas == hunyuan_video_schedule(STEPS, 7.0).sigmas.tolist()


# -- Qwen-Image ---------------------------------------------------------------------------------------


def qwen_embeds(seed: int, length: int) -> QwenPromptEmbeds:
    return QwenPromptEmbeds(torch.randn(1, length, QWEN_TEXT_DIM, generator=torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("sigma_shift", [None, 2.0], ids=["dynamic", "static"])
def test_qwen_image_latents_equal_diffusers_pipeline(sigma_shift):
    from diffusers import QwenImagePipeline as DiffusersQwen

    transformer = tiny_qwen()
    cond, uncond = qwen_embeds(1, 5), qwen_embeds(2, 3)
    pipe = QwenImagePipeline(transformer)
    out = pipe(
        prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=STEPS, height=48, width=64,
        guidance_scale=4.0, sigma_shift=sigma_shift, seed=SEED, output_type="latent", progress=False,
    )
    config = dict(QWEN_IMAGE_SCHEDULER)
    if sigma_shift is not None:  # a static shift: the same map as mu = log(shift)
        config.update(use_dynamic_shifting=False, shift=sigma_shift)
    dpipe = DiffusersQwen(
        scheduler=build_scheduler(config), vae=None, text_encoder=None, tokenizer=None, transformer=transformer
    )
    dpipe.set_progress_bar_config(disable=True)
    noise = pipe._pack(initial_noise((1, 4, 6, 8), SEED))
    with torch.no_grad():
        expected = dpipe(
            prompt_embeds=cond.embeds, prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long),
            negative_prompt_embeds=uncond.embeds, negative_prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long),
            true_cfg_scale=4.0, height=48, width=64, num_inference_steps=STEPS, latents=noise, output_type="latent",
        ).images
    torch.testing.assert_close(pipe._pack(out.frames[:, :, 0]), expected, atol=ATOL, rtol=0)
    schedule = qwen_image_schedule(STEPS, noise.shape[1], sigma_shift)
    assert out.sigmas == schedule.sigmas.tolist() and out.sigmas[-2] == pytest.approx(0.02, abs=1e-6)  # shift_terminal
    if sigma_shift is None:
        mu = (0.9 - 0.5) / (8192 - 256) * (noise.shape[1] - 256) + 0.5
        assert schedule.shift == pytest.approx(math.exp(mu))


def test_qwen_image_timesteps_reach_the_model_as_diffusers_divides_them():
    schedule = qwen_image_schedule(STEPS, 12)
    assert np.allclose(schedule.timesteps.numpy() / 1000, schedule.sigmas[:-1].numpy(), atol=1e-6)
