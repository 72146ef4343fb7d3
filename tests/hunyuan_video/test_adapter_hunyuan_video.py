"""HunyuanVideoAdapter reproduces the diffusers forward (T2V, both I2V kinds); the pipeline caches right."""

from __future__ import annotations

import pytest
import torch

from conftest import HUNYUAN_POOLED_DIM as POOLED_DIM
from conftest import HUNYUAN_TEXT_DIM as TEXT_DIM
from conftest import tiny_hunyuan, write_tiny_hunyuan_dir
from conftest import tiny_hunyuan_encoders as tiny_encoders

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.none import NoCache
from ditcache.families import adapter_for
from ditcache.families.hunyuan_video.adapter import HunyuanVideoAdapter
from ditcache.families.hunyuan_video.pipeline import HunyuanPromptEmbeds, HunyuanPromptEncoder, HunyuanVideoPipeline


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


# -- the pipeline ------------------------------------------------------------------------------

STEPS = 8


def embeds(seed: int, length: int, batch: int = 1) -> HunyuanPromptEmbeds:
    """Random conditioning; the branches get different text lengths so a hook can tell them apart."""
    g = torch.Generator().manual_seed(seed)
    return HunyuanPromptEmbeds(
        torch.randn(batch, length, TEXT_DIM, generator=g),
        torch.ones(batch, length, dtype=torch.long),
        torch.randn(batch, POOLED_DIM, generator=g),
    )


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


def count_block_passes(model, lengths: dict[int, str]) -> tuple[dict[str, int], object]:
    """Count first-block calls per branch, telling the branch by the text length it gets."""
    counts = {name: 0 for name in lengths.values()}

    def hook(module, args):
        counts[lengths[args[1].shape[1]]] += 1

    return counts, model.transformer_blocks[0].register_forward_pre_hook(hook)


def run(pipe: HunyuanVideoPipeline, **kwargs):
    base = dict(
        prompt_embeds=embeds(1, 6),
        num_inference_steps=STEPS,
        height=32,
        width=48,
        num_frames=5,
        output_type="latent",
        progress=False,
    )
    return pipe(**{**base, **kwargs})


def test_pipeline_with_real_cfg_runs_the_stack_exactly_on_planned_steps():
    model = tiny_hunyuan()
    pipe = HunyuanVideoPipeline(model)
    cache = skipping_cache()
    counts, handle = count_block_passes(model, {6: "cond", 4: "uncond"})
    out = run(pipe, negative_prompt_embeds=embeds(2, 4), guidance_scale=3.0, cache=cache)
    handle.remove()
    planned = {"cond": cache.planned_compute_steps(True), "uncond": cache.planned_compute_steps(False)}
    assert all(len(steps) < STEPS for steps in planned.values()), planned
    assert counts == {name: len(steps) for name, steps in planned.items()}
    assert out.stack_passes["transformer"] == counts
    assert out.frames.shape == (1, 4, 2, 4, 6) and torch.isfinite(out.frames).all()


def test_pipeline_cache_that_computes_every_step_equals_uncached_output():
    model = tiny_hunyuan()
    pipe = HunyuanVideoPipeline(model)
    kwargs = dict(negative_prompt_embeds=embeds(2, 4), guidance_scale=3.0)
    uncached = run(pipe, enable_ada_taylor_cache=False, **kwargs)
    always = skipping_cache(thresh=0.0)
    cached = run(pipe, cache=always, **kwargs)
    assert cached.stack_passes["transformer"] == {"cond": STEPS, "uncond": STEPS}
    assert torch.equal(cached.frames, uncached.frames)
    # A cache that skips changes the result, and a rerun with it starts clean (same result again).
    skipping = skipping_cache()
    first = run(pipe, cache=skipping, **kwargs)
    second = run(pipe, cache=skipping, **kwargs)
    assert not torch.equal(first.frames, uncached.frames)
    assert torch.equal(first.frames, second.frames)


def test_embedded_guidance_only_runs_no_unconditional_branch():
    model = tiny_hunyuan()
    counts, handle = count_block_passes(model, {6: "cond", 4: "uncond"})
    out = run(HunyuanVideoPipeline(model), cache=skipping_cache(), embedded_guidance_scale=4.0)
    handle.remove()
    assert counts["uncond"] == 0 and out.branch_steps == {"cond": STEPS}
    assert counts["cond"] == out.stack_passes["transformer"]["cond"] < STEPS


def test_token_replace_i2v_keeps_the_image_as_first_frame():
    model = tiny_hunyuan("token_replace")
    image_latents = torch.randn(1, 4, 1, 4, 6, generator=torch.Generator().manual_seed(9))
    out = run(HunyuanVideoPipeline(model), image_latents=image_latents, cache=skipping_cache())
    assert torch.equal(out.frames[:, :, :1], image_latents)
    assert out.stack_passes["transformer"]["cond"] < STEPS


def test_latent_concat_i2v_returns_the_generated_frames_only():
    model = tiny_hunyuan("latent_concat")
    image_latents = torch.randn(1, 4, 1, 4, 6, generator=torch.Generator().manual_seed(9))
    out = run(HunyuanVideoPipeline(model), image_latents=image_latents, enable_ada_taylor_cache=False)
    assert out.frames.shape == (1, 4, 1, 4, 6)


def test_prompt_encoder_matches_diffusers_encode_prompt():
    """Template, crop, third-to-last Llama layer, CLIP pooled: as diffusers' HunyuanVideoPipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import HunyuanVideoPipeline as DiffusersPipeline

    llama, tokenizer, clip = tiny_encoders()
    reference = DiffusersPipeline(
        text_encoder=llama, tokenizer=tokenizer, transformer=tiny_hunyuan(), vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=clip, tokenizer_2=tokenizer,
    )
    prompts = ["a red cat on the mat", "dog"]
    with torch.no_grad():
        embeds_ref, pooled_ref, mask_ref = reference.encode_prompt(prompts, device=torch.device("cpu"))
    ours = HunyuanPromptEncoder(llama, tokenizer, clip, tokenizer).encode(prompts)
    assert torch.equal(ours.embeds, embeds_ref) and torch.equal(ours.pooled, pooled_ref)
    assert torch.equal(ours.mask, mask_ref)


@pytest.mark.parametrize("image_condition_type", [None, "token_replace"])
def test_shipped_params_cache_skips_and_the_stack_runs_only_on_computed_steps(image_condition_type):
    """The default cache (HunyuanVideo-T2V / -I2V params) at the released 50 steps, with real CFG."""
    model = tiny_hunyuan(image_condition_type)
    extra = {"image_latents": torch.randn(1, 4, 1, 4, 6)} if image_condition_type else {}
    counts, handle = count_block_passes(model, {6: "cond", 4: "uncond"})
    out = run(
        HunyuanVideoPipeline(model),
        num_inference_steps=50,
        negative_prompt_embeds=embeds(2, 4),
        guidance_scale=3.0,
        cache="ada_taylor",
        **extra,
    )
    handle.remove()
    stats = out.cache_stats["transformer"]
    assert counts == {name: stats[name]["num_computed"] for name in ("cond", "uncond")}
    assert all(0 < count < 50 for count in counts.values())


def test_from_pretrained_loads_a_local_directory_and_encodes_prompts(tmp_path):
    write_tiny_hunyuan_dir(tmp_path)
    llama, tokenizer, clip = tiny_encoders()
    model = tiny_hunyuan()
    loaded = HunyuanVideoPipeline.from_pretrained(tmp_path)
    assert loaded.default_shift == 5.0
    in_memory = HunyuanVideoPipeline(model, prompt_encoder=HunyuanPromptEncoder(llama, tokenizer, clip, tokenizer),
                                     default_shift=5.0)
    # Two prompts and one negative prompt, which serves both.
    kwargs = dict(prompt_embeds=None, prompt=["a red cat", "dog"], negative_prompt="a mat", guidance_scale=2.0,
                  enable_ada_taylor_cache=False)
    out = run(loaded, **kwargs)
    assert out.frames.shape[0] == 2 and out.branch_steps == {"cond": STEPS, "uncond": STEPS}
    assert torch.equal(out.frames, run(in_memory, **kwargs).frames)
