"""QwenImageAdapter reproduces the diffusers forward (T2I, Edit-Plus shapes); the pipeline caches right."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import QWEN_TEXT_DIM as TEXT_DIM
from conftest import tiny_qwen, write_tiny_qwen_dir
from conftest import tiny_qwen_encoder as tiny_encoder
from conftest import tiny_qwen_vae as tiny_vae

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.none import NoCache
from ditcache.families import adapter_for
from ditcache.families.qwen_image.adapter import QwenImageAdapter
from ditcache.families.qwen_image.pipeline import QwenImagePipeline, QwenPromptEmbeds, QwenPromptEncoder
from ditcache.runtime.scheduler import QWEN_IMAGE_SCHEDULER, qwen_image_schedule


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


# -- the pipeline ------------------------------------------------------------------------------

STEPS = 8


def embeds(seed: int, length: int) -> QwenPromptEmbeds:
    """Random conditioning; the branches get different text lengths so a hook can tell them apart."""
    return QwenPromptEmbeds(torch.randn(1, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))


def skipping_cache(thresh: float = 0.3) -> AdaTaylorCache:
    # cond's flat curve lets K=2 skips run back to back; uncond's drifting one skips less.
    return AdaTaylorCache(
        cond_mag_ratios=[1.0] * STEPS,
        uncond_mag_ratios=[1.0] + [1.1] * (STEPS - 1),
        K=2,
        thresh=thresh,
        retention_ratio=0.2,
        num_inference_steps=STEPS,
        n_derivatives=1,
    )


def count_block_passes(model, lengths: dict[int, str]):
    """Count first-block calls per branch, telling the branch by the text length it gets."""
    counts = {name: 0 for name in lengths.values()}

    def hook(module, args, kwargs):
        counts[lengths[kwargs["encoder_hidden_states"].shape[1]]] += 1

    return counts, model.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)


def run(pipe: QwenImagePipeline, **kwargs):
    base = dict(
        prompt_embeds=embeds(1, 5),
        negative_prompt_embeds=embeds(2, 3),
        num_inference_steps=STEPS,
        height=48,
        width=64,
        output_type="latent",
        progress=False,
    )
    return pipe(**{**base, **kwargs})


REFERENCES = [torch.randn(1, 4, 1, 4, 6), torch.randn(1, 4, 1, 4, 4)]


@pytest.mark.parametrize("references", [None, REFERENCES], ids=["t2i", "edit_plus"])
def test_pipeline_runs_the_stack_exactly_on_planned_steps(references):
    model = tiny_qwen()
    cache = skipping_cache()
    counts, handle = count_block_passes(model, {5: "cond", 3: "uncond"})
    out = run(QwenImagePipeline(model), cache=cache, reference_latents=references)
    handle.remove()
    planned = {"cond": cache.planned_compute_steps(True), "uncond": cache.planned_compute_steps(False)}
    assert all(len(steps) < STEPS for steps in planned.values()), planned
    assert counts == {name: len(steps) for name, steps in planned.items()}
    assert out.stack_passes["transformer"] == counts
    # Only the noisy latents come back, whatever the references add to the sequence.
    assert out.frames.shape == (1, 4, 1, 6, 8) and torch.isfinite(out.frames).all()


@pytest.mark.parametrize("references", [None, REFERENCES], ids=["t2i", "edit_plus"])
def test_pipeline_cache_that_computes_every_step_equals_uncached_output(references):
    pipe = QwenImagePipeline(tiny_qwen())
    uncached = run(pipe, enable_ada_taylor_cache=False, reference_latents=references)
    cached = run(pipe, cache=skipping_cache(thresh=0.0), reference_latents=references)
    assert cached.stack_passes["transformer"] == {"cond": STEPS, "uncond": STEPS}
    assert torch.equal(cached.frames, uncached.frames)
    skipped = run(pipe, cache=skipping_cache(), reference_latents=references)
    assert not torch.equal(skipped.frames, uncached.frames)


def test_guidance_off_runs_no_unconditional_branch():
    model = tiny_qwen()
    counts, handle = count_block_passes(model, {5: "cond", 3: "uncond"})
    out = run(QwenImagePipeline(model), cache=skipping_cache(), guidance_scale=1.0)
    handle.remove()
    assert counts["uncond"] == 0 and out.branch_steps == {"cond": STEPS}
    assert counts["cond"] == out.stack_passes["transformer"]["cond"] < STEPS


def test_pipeline_decodes_images_with_a_vae():
    pipe = QwenImagePipeline(tiny_qwen(), vae=tiny_vae())
    out = run(pipe, output_type="frames", num_inference_steps=2, enable_ada_taylor_cache=False)
    assert out.frames.shape == (1, 3, 1, 48, 64)
    assert out.frames.min() >= 0 and out.frames.max() <= 1


def test_dynamic_shift_matches_qwen_image_scheduler():
    """Dynamic shifting as diffusers' QwenImagePipeline sets it; exp(mu) as a static shift is the same map."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    seq_len = 1024
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER)
    mu = calculate_shift(seq_len, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    ours = qwen_image_schedule(STEPS, seq_len)
    assert ours.shift == pytest.approx(math.exp(mu))
    assert torch.equal(ours.sigmas, scheduler.sigmas.float()) and torch.equal(ours.timesteps, scheduler.timesteps)
    static = qwen_image_schedule(STEPS, seq_len, shift=math.exp(mu))
    assert torch.allclose(static.sigmas, ours.sigmas, atol=1e-6)


@pytest.mark.parametrize("prompts", [["a red cat on the mat", "dog"], ["a cat"]], ids=["padded", "unpadded"])
def test_prompt_encoder_matches_diffusers_encode_prompt(prompts):
    """Template, system-prefix drop, re-padding and the all-valid -> None mask: as diffusers' pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImagePipeline as DiffusersPipeline

    encoder, tokenizer = tiny_encoder()
    reference = DiffusersPipeline(
        text_encoder=encoder, tokenizer=tokenizer, transformer=tiny_qwen(), vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    with torch.no_grad():
        embeds_ref, mask_ref = reference.encode_prompt(prompts, device=torch.device("cpu"))
    ours = QwenPromptEncoder(encoder, tokenizer).encode(prompts)
    assert torch.equal(ours.embeds, embeds_ref)
    assert (ours.mask is None and mask_ref is None) or torch.equal(ours.mask, mask_ref)


@pytest.mark.parametrize("references", [None, REFERENCES], ids=["t2i", "edit_plus"])
def test_shipped_params_cache_skips_and_the_stack_runs_only_on_computed_steps(references):
    """The default cache (Qwen-Image / Qwen-Image-Edit-Plus params) at the released step counts."""
    model = tiny_qwen()
    counts, handle = count_block_passes(model, {5: "cond", 3: "uncond"})
    out = run(QwenImagePipeline(model), num_inference_steps=None, reference_latents=references, cache="ada_taylor")
    handle.remove()
    steps = 40 if references else 50
    stats = out.cache_stats["transformer"]
    assert out.branch_steps == {"cond": steps, "uncond": steps}
    assert counts == {name: stats[name]["num_computed"] for name in ("cond", "uncond")}
    assert all(0 < count < steps for count in counts.values())


def test_from_pretrained_loads_a_local_directory_and_encodes_prompts(tmp_path):
    write_tiny_qwen_dir(tmp_path)
    encoder, tokenizer = tiny_encoder()
    model, vae = tiny_qwen(), tiny_vae()
    loaded = QwenImagePipeline.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert loaded.scheduler_config == {"_class_name": "FlowMatchEulerDiscreteScheduler", **config}
    in_memory = QwenImagePipeline(model, vae, QwenPromptEncoder(encoder, tokenizer), scheduler_config=config)
    # Two prompts; the default negative prompt " " serves both.
    kwargs = dict(prompt_embeds=None, negative_prompt_embeds=None, prompt=["a red cat", "dog"], output_type="frames",
                  num_inference_steps=2, enable_ada_taylor_cache=False)
    out = run(loaded, **kwargs)
    assert out.frames.shape == (2, 3, 1, 48, 64) and out.branch_steps == {"cond": 2, "uncond": 2}
    assert torch.equal(out.frames, run(in_memory, **kwargs).frames)
