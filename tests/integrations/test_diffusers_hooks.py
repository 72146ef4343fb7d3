"""ditcache.integrations: ditcache's caches on diffusers' own pipelines (tiny random models, CPU).

Every case is a real diffusers pipeline built from tiny random parts, run from prompt embeddings
(no text encoder) to latents. The branches are told apart by their text length (cond and uncond
embeddings differ in length), and real block-stack passes are counted by a forward hook on a
module inside the last block, which runs only when the block really computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ditcache.cache.ada_taylor import AdaTaylorConfig
from ditcache.cache.calibrator import Calibrator, CalibratorConfig
from ditcache.cache.context import StepContext
from ditcache.cache.none import NoCache
from ditcache.errors import CacheConfigError, UnknownModelError
from ditcache.integrations import cache_session, cache_stats, disable_cache, enable_cache
from ditcache.runtime.loading import ModelSettings
from ditcache.families.wan.pipeline import Wan22Pipeline
from ditcache.families.wan.pipeline import WanPipeline as DitWanPipeline

STEPS, SHIFT, GUIDANCE = 8, 3.0, 3.0
COND_LEN, UNCOND_LEN = 6, 4
LENGTHS = {COND_LEN: "cond", UNCOND_LEN: "uncond"}


def explicit(thresh: float) -> AdaTaylorConfig:
    """AdaTaylor with explicit params: thresh 0 computes every step, 0.15 skips some of each branch."""
    return AdaTaylorConfig(
        cond_mag_ratios=(1.0,) + (0.98,) * (STEPS - 1),
        uncond_mag_ratios=(1.0,) + (0.96,) * (STEPS - 1),
        K=3,
        thresh=thresh,
        retention_ratio=0.2,
    )


SKIPPING, EVERY_STEP = explicit(0.15), explicit(0.0)


def unipc(shift: float) -> UniPCMultistepScheduler:
    """The scheduler of the published Wan Diffusers folders (and ditcache's Wan default)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)


def embeds(seed: int, length: int, dim: int) -> torch.Tensor:
    return torch.randn(1, length, dim, generator=torch.Generator().manual_seed(seed))


# -- tiny parts -------------------------------------------------------------------------------------


def tiny_wan(seed: int = 0, **overrides) -> torch.nn.Module:
    config = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    )
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**config, **overrides}).eval()


def tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2,
    ).eval()


def tiny_clip() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return CLIPVisionModel(config).eval(), processor


def tiny_hunyuan() -> HunyuanVideoTransformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), guidance_embeds=True,
    ).eval()


def tiny_qwen() -> QwenImageTransformer2DModel:
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6),
    ).eval()


# -- the cases: a pipeline, its call, and where a real block pass shows ---------------------------


@dataclass
class Case:
    pipe: object
    kwargs: dict
    last_inner: Callable[[torch.nn.Module], torch.nn.Module]  # a module of the last block

    def __post_init__(self) -> None:
        self.pipe.set_progress_bar_config(disable=True)

    def run(self, **overrides) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return self.pipe(**{**self.kwargs, **overrides}, generator=generator, output_type="latent",
                             return_dict=False)[0]


def wan_t2v() -> Case:
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(),
                       scheduler=unipc(SHIFT))
    kwargs = dict(prompt_embeds=embeds(1, COND_LEN, 8), negative_prompt_embeds=embeds(2, UNCOND_LEN, 8),
                  height=64, width=64, num_frames=1, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    return Case(pipe, kwargs, lambda t: t.blocks[-1].ffn)


def wan22() -> Case:
    """Wan2.2 A14B: the high-noise expert runs steps 0-4 (t >= 500), the low-noise one steps 5-7."""
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=tiny_wan(0),
                       transformer_2=tiny_wan(1), scheduler=unipc(1.0), boundary_ratio=0.5)
    return replace(wan_t2v(), pipe=pipe)


def wan_i2v() -> Case:
    encoder, processor = tiny_clip()
    transformer = tiny_wan(2, in_channels=4 + 2 + 4, image_dim=8)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=transformer,
                                   image_encoder=encoder, image_processor=processor,
                                   scheduler=unipc(SHIFT))
    image = Image.fromarray(torch.randint(0, 256, (16, 16, 3), generator=torch.Generator().manual_seed(3),
                                          dtype=torch.uint8).numpy())
    kwargs = dict(image=image, prompt_embeds=embeds(1, COND_LEN, 8), negative_prompt_embeds=embeds(2, UNCOND_LEN, 8),
                  height=16, width=16, num_frames=5, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    return Case(pipe, kwargs, lambda t: t.blocks[-1].ffn)


def hunyuan() -> Case:
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tiny_hunyuan(), vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None,
                                tokenizer_2=None)
    kwargs = dict(
        prompt_embeds=embeds(1, COND_LEN, 16), pooled_prompt_embeds=embeds(3, 1, 8)[0],
        prompt_attention_mask=torch.ones(1, COND_LEN), negative_prompt_embeds=embeds(2, UNCOND_LEN, 16),
        negative_pooled_prompt_embeds=embeds(4, 1, 8)[0], negative_prompt_attention_mask=torch.ones(1, UNCOND_LEN),
        true_cfg_scale=GUIDANCE, height=32, width=48, num_frames=1, num_inference_steps=STEPS,
    )
    return Case(pipe, kwargs, lambda t: t.single_transformer_blocks[-1].proj_out)


def qwen() -> Case:
    pipe = QwenImagePipeline(text_encoder=None, tokenizer=None, transformer=tiny_qwen(), vae=None,
                             scheduler=FlowMatchEulerDiscreteScheduler())
    kwargs = dict(prompt_embeds=embeds(1, COND_LEN, 16), prompt_embeds_mask=torch.ones(1, COND_LEN, dtype=torch.long),
                  negative_prompt_embeds=embeds(2, UNCOND_LEN, 16),
                  negative_prompt_embeds_mask=torch.ones(1, UNCOND_LEN, dtype=torch.long), true_cfg_scale=GUIDANCE,
                  height=48, width=64, num_inference_steps=STEPS)
    return Case(pipe, kwargs, lambda t: t.transformer_blocks[-1].img_mlp)


CASES = {"wan_t2v": wan_t2v, "wan_i2v": wan_i2v, "wan22": wan22, "hunyuan_video": hunyuan, "qwen_image": qwen}


def experts(pipe) -> dict[str, torch.nn.Module]:
    return {name: getattr(pipe, name) for name in ("transformer", "transformer_2") if getattr(pipe, name, None)}


def count_stack_passes(pipe, last_inner) -> tuple[dict[str, dict[str, int]], list]:
    """expert -> branch -> real passes through the last block (branch told by the text length)."""
    counts: dict[str, dict[str, int]] = {}
    current: dict[str, str] = {}
    handles = []
    for name, transformer in experts(pipe).items():
        def branch(module, args, kwargs, name=name):
            current.update(expert=name, branch=LENGTHS[kwargs["encoder_hidden_states"].shape[1]])

        def passed(module, args, output):
            per_branch = counts.setdefault(current["expert"], {})
            per_branch[current["branch"]] = per_branch.get(current["branch"], 0) + 1

        handles.append(transformer.register_forward_pre_hook(branch, with_kwargs=True))
        handles.append(last_inner(transformer).register_forward_hook(passed))
    return counts, handles


# -- 1 and 5: computing every step is the uncached pipeline, exactly -------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_every_step_computed_equals_uncached_and_disable_restores_it(name):
    case = CASES[name]()
    uncached = case.run()
    enable_cache(case.pipe, EVERY_STEP if name != "hunyuan_video" else "none")
    cached = case.run()
    stats = cache_stats(case.pipe)
    disable_cache(case.pipe)
    assert torch.equal(cached, uncached)
    assert all(s["num_skipped"] == 0 for per_branch in stats.values() for s in per_branch.values())
    assert {b for per_branch in stats.values() for b in per_branch} == {"cond", "uncond"}
    assert torch.equal(case.run(), uncached)


# -- 2: a skipping plan runs exactly the planned block passes --------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_skipping_runs_exactly_the_planned_block_passes(name):
    case = CASES[name]()
    session = enable_cache(case.pipe, SKIPPING)
    counts, handles = count_stack_passes(case.pipe, case.last_inner)
    case.run()
    for handle in handles:
        handle.remove()
    stats = cache_stats(case.pipe)
    # Each expert's plan, over the steps it served (Wan2.2's high-noise cache plans all N steps).
    planned = {
        expert: {
            branch: [s for s in cache.planned_compute_steps(branch == "cond")
                     if s in stats[expert][branch]["computed_steps"] + stats[expert][branch]["skipped_steps"]]
            for branch in ("cond", "uncond")
        }
        for expert, cache in session.caches.items()
    }
    assert counts == session.stack_passes == {e: {b: len(p) for b, p in per.items()} for e, per in planned.items()}
    for expert, per_branch in stats.items():
        for branch, s in per_branch.items():
            assert s["computed_steps"] == planned[expert][branch]
    total = {b: sum(per[b] for per in counts.values()) for b in ("cond", "uncond")}
    assert all(0 < n < STEPS for n in total.values())
    if name == "wan22":  # the low-noise expert counts from its first step, which it computes
        first_low = session.caches["transformer_2"].init_step
        assert first_low > 0 and all(p[0] == first_low for p in planned["transformer_2"].values())
    disable_cache(case.pipe)


# -- 3 and 4: the same as ditcache's own pipeline ---------------------------------------------------

SETTINGS = ModelSettings(
    latent_space="pixel", height=8, width=8, num_frames=1, default_steps=STEPS, default_shift=SHIFT,
    default_guidance_scale=GUIDANCE, model_type=None, boundary_ratio=None,
)


class TinyPromptEncoder:
    """Fixed embeddings per prompt, shared by both pipelines (diffusers gets them as prompt_embeds)."""

    table = {"a cat": embeds(1, COND_LEN, 8), "": embeds(2, COND_LEN, 8)}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return torch.cat([self.table[p] for p in prompts])


def ditcache_pipe(diffusers_pipe, shift: float):
    """ditcache's pipeline on the same transformer(s), returning latents instead of frames."""
    parts = experts(diffusers_pipe)
    if len(parts) == 2:
        pipe = Wan22Pipeline(parts, TinyPromptEncoder(), replace(SETTINGS, boundary_ratio=0.5, default_shift=shift))
    else:
        pipe = DitWanPipeline(parts, TinyPromptEncoder(), replace(SETTINGS, default_shift=shift))
    pipe._decode = lambda latents: latents
    return pipe


def both(case: Case, cache, shift: float):
    """(diffusers latents, ditcache output) for the same noise, embeddings, schedule and cache."""
    noise = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    enable_cache(case.pipe, cache)
    table = TinyPromptEncoder.table
    latents = case.run(latents=noise, prompt_embeds=table["a cat"], negative_prompt_embeds=table[""])
    stats = cache_stats(case.pipe)
    disable_cache(case.pipe)
    ours = ditcache_pipe(case.pipe, shift)(prompt="a cat", seed=5, cache=cache, progress=False)
    return latents, stats, ours


@pytest.mark.parametrize("name, shift", [("wan_t2v", SHIFT), ("wan22", 1.0)])
def test_same_plan_matches_ditcache_pipeline(name, shift):
    case = CASES[name]()
    latents, stats, ours = both(case, SKIPPING, shift)
    assert stats == ours.cache_stats
    assert any(s["num_skipped"] for per_branch in stats.values() for s in per_branch.values())
    assert torch.allclose(latents, ours.frames, atol=1e-5, rtol=0)


def test_calibrator_through_enable_cache_gives_ditcache_curve():
    """Wan2.2: one calibrator spans both experts, in enable_cache as in ditcache's pipeline."""
    case = wan22()
    shared = Calibrator(num_inference_steps=STEPS)
    both(case, shared, 1.0)
    theirs = shared.result()
    ours = Calibrator(num_inference_steps=STEPS)
    ditcache_pipe(case.pipe, 1.0)(prompt="a cat", seed=5, cache=ours, progress=False)
    for key in ("cond_mag_ratios", "uncond_mag_ratios", "sigmas"):
        assert theirs[key] == pytest.approx(ours.result()[key], rel=1e-5, abs=1e-6)
    # The same through a config: one calibrator built per request, shared by the two experts.
    session = enable_cache(case.pipe, CalibratorConfig())
    case.run(latents=torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
             prompt_embeds=TinyPromptEncoder.table["a cat"], negative_prompt_embeds=TinyPromptEncoder.table[""])
    assert session.caches["transformer"] is session.caches["transformer_2"]
    assert session.caches["transformer"].result()["cond_mag_ratios"] == pytest.approx(theirs["cond_mag_ratios"])
    disable_cache(case.pipe)


# -- 5: back-to-back requests reset by themselves ---------------------------------------------------


def test_back_to_back_requests_equal_a_fresh_enable():
    case = wan22()
    enable_cache(case.pipe, SKIPPING)
    first, first_stats = case.run(), cache_stats(case.pipe)
    second = case.run()
    assert torch.equal(first, second) and cache_stats(case.pipe) == first_stats
    # A request interrupted by an exception never resets the hooks; the next one starts over anyway
    # (its first timestep is not below the last one seen).
    session = cache_session(case.pipe)
    def stop_at_step_2(pipe, step, timestep, tensors):
        if step == 2:
            raise RuntimeError("stop")
        return tensors

    with pytest.raises(RuntimeError, match="stop"):
        case.run(callback_on_step_end=stop_at_step_2)
    assert torch.equal(case.run(), first) and session.stats() == first_stats
    # Without CFG only the cond branch runs, and a request after it starts over too.
    case.run(guidance_scale=1.0)
    assert set(cache_stats(case.pipe)["transformer"]) == {"cond"}
    assert torch.equal(case.run(), first)
    disable_cache(case.pipe)
    enable_cache(case.pipe, SKIPPING)
    assert torch.equal(case.run(), first)
    disable_cache(case.pipe)


# -- errors -----------------------------------------------------------------------------------------


def test_errors_are_one_clear_line():
    case = wan_t2v()
    with pytest.raises(CacheConfigError, match="has no transformer"):
        enable_cache(object(), SKIPPING)
    flux_like = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=torch.nn.Linear(2, 2),
                            scheduler=FlowMatchEulerDiscreteScheduler())
    with pytest.raises(CacheConfigError, match="pipe.transformer is a Linear; .* supports HunyuanVideoTransformer3DModel, "
                                               "QwenImageTransformer2DModel, WanTransformer3DModel"):
        enable_cache(flux_like, SKIPPING)
    with pytest.raises(UnknownModelError, match="unknown model_type 'No-Such-Model'"):
        enable_cache(case.pipe, AdaTaylorConfig(model_type="No-Such-Model"))
    with pytest.raises(CacheConfigError, match="ada_taylor needs model_type="):
        enable_cache(case.pipe, AdaTaylorConfig())
    enable_cache(case.pipe, "none")
    with pytest.raises(CacheConfigError, match=r"already enabled on pipe.transformer: call ditcache.disable_cache"):
        enable_cache(case.pipe, SKIPPING)
    disable_cache(case.pipe)
    disable_cache(case.pipe)  # nothing left to disable: a no-op
    with pytest.raises(CacheConfigError, match="no ditcache cache is enabled"):
        cache_stats(case.pipe)
    with pytest.raises(CacheConfigError, match="residual must not cross the switch"):
        enable_cache(wan22().pipe, SKIPPING.build(STEPS))
    enable_cache(case.pipe, AdaTaylorConfig(), model_type="Wan2.1-T2V-1.3B")  # the model's params fill it in
    disable_cache(case.pipe)


# -- the step context -------------------------------------------------------------------------------


class ProbingCache(NoCache):
    """Computes every step, looks at the first block's output, and records each context."""

    spans_experts = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[StepContext] = []

    def should_compute(self, ctx):
        ctx.first_block()
        self.seen.append(ctx)
        return super().should_compute(ctx)


def test_step_context_carries_the_step_and_a_probe_that_is_not_paid_twice():
    case = wan22()
    uncached = case.run()
    cache = ProbingCache()
    enable_cache(case.pipe, cache)
    first_block_runs = []
    handle = case.pipe.transformer.blocks[0].ffn.register_forward_hook(lambda *a: first_block_runs.append(1))
    assert torch.equal(case.run(), uncached)
    handle.remove()
    scheduler = case.pipe.scheduler
    assert [(c.step, c.is_cond, c.expert) for c in cache.seen] == [
        (i, cond, "transformer" if i < 5 else "transformer_2") for i in range(STEPS) for cond in (True, False)
    ]
    assert [c.sigma for c in cache.seen[::2]] == pytest.approx(scheduler.sigmas[:STEPS].tolist())
    assert [c.timestep for c in cache.seen[::2]] == pytest.approx(scheduler.timesteps.tolist())
    assert len(first_block_runs) == 2 * 5  # the probe is the computed step's first block
    ctx = cache.seen[0]
    assert ctx.hidden_states.shape == (1, 16, 16) and ctx.modulation.shape == (1, 6, 16)
    disable_cache(case.pipe)
