"""Image-to-video (I2V) and first-last-frame (FL2V) on WanPipeline / Wan22Pipeline (tiny random models, CPU).

The references build the condition with diffusers' own ``WanImageToVideoPipeline`` (its
``prepare_latents`` and ``encode_image``) and run diffusers' ``WanTransformer3DModel.forward``.
The tiny VAE has temporal scale 2, so the mask has 2 channels: in_channels = out + 2 + z_dim.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.errors import ParamsError
from ditcache.runtime.loading import ModelSettings, load_model_dir
from ditcache.families.wan.pipeline import Wan22Pipeline, WanPipeline, pipeline_for
from ditcache.runtime.scheduler import wan_schedule

STEPS, Z, S_T = 6, 4, 2
H = W = 8
FRAMES = 5  # -> 3 latent frames
IN_CHANNELS = Z + S_T + Z
CLIP_TOKENS = (8 // 4) ** 2 + 1  # 8 px images, 4 px patches, + class token
SETTINGS = ModelSettings(
    latent_space="vae", height=H, width=W, num_frames=FRAMES, default_steps=STEPS, default_shift=1.0,
    default_guidance_scale=4.0, model_type=None, boundary_ratio=None,
)


def tiny_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(
        base_dim=8, z_dim=Z, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[1.5, 0.5, 1.0, 2.0],
        scale_factor_temporal=S_T, scale_factor_spatial=2,
    ).eval()


def tiny_clip() -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=8, patch_size=4
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    return CLIPVisionModel(config).eval(), processor


def picture(seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (H, W, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def ada_taylor(init_step: int = 0) -> AdaTaylorCache:
    return AdaTaylorCache(
        num_inference_steps=STEPS, init_step=init_step, n_derivatives=1,
        cond_mag_ratios=[1.0] + [0.98] * (STEPS - 1), uncond_mag_ratios=[1.0] + [0.96] * (STEPS - 1),
        K=3, thresh=0.15, retention_ratio=0.2,
    )


@pytest.fixture
def parts(make_tiny_wan, prompt_encoder):
    encoder, processor = tiny_clip()
    i2v = make_tiny_wan(in_channels=IN_CHANNELS, out_channels=Z, image_dim=8)
    fl2v = make_tiny_wan(
        seed=2, in_channels=IN_CHANNELS, out_channels=Z, image_dim=8, pos_embed_seq_len=2 * CLIP_TOKENS
    )
    return dict(vae=tiny_vae(), encoder=encoder, processor=processor, i2v=i2v, fl2v=fl2v, text=prompt_encoder)


def wan_pipe(parts, model="i2v") -> WanPipeline:
    return WanPipeline(
        {"transformer": parts[model]}, parts["text"], SETTINGS, parts["vae"],
        image_encoder=parts["encoder"], image_processor=parts["processor"],
    )


def diffusers_pipe(parts, model="i2v") -> WanImageToVideoPipeline:
    return WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=parts["vae"], scheduler=FlowMatchEulerDiscreteScheduler(),
        image_processor=parts["processor"], image_encoder=parts["encoder"], transformer=parts[model],
    )


def run(pipe, **kw):
    kw.setdefault("prompt", ["a seven", "a two"])
    kw.setdefault("enable_ada_taylor_cache", False)
    return pipe(progress=False, **kw)


def diffusers_condition(parts, model, image, last_image, batch, noise):
    """diffusers' condition and image embeds for ``image`` (and ``last_image``) at our geometry."""
    ref = diffusers_pipe(parts, model)
    first = ref.video_processor.preprocess(image, height=H, width=W).float()
    last = None if last_image is None else ref.video_processor.preprocess(last_image, height=H, width=W).float()
    _, condition = ref.prepare_latents(
        first, batch, Z, H, W, FRAMES, torch.float32, torch.device("cpu"), None, noise, last
    )
    embeds = ref.encode_image(image if last_image is None else [image, last_image], torch.device("cpu"))
    return condition, embeds.repeat(batch, 1, 1)


@torch.inference_mode()
def reference_loop(parts, model, prompts, negative, image, last_image, seed, guidance):
    batch = len(prompts)
    noise = torch.randn((batch, Z, 3, H // 2, W // 2), generator=torch.Generator().manual_seed(seed))
    condition, embeds = diffusers_condition(parts, model, image, last_image, batch, noise)
    transformer = parts[model]
    cond, uncond = parts["text"].encode(prompts), parts["text"].encode([negative] * batch)
    schedule = wan_schedule(STEPS, 1.0)  # the sampler the pipeline runs (diffusers' UniPC)
    x = noise
    for i in range(STEPS):
        t = schedule.timesteps[i].expand(batch)
        inp = torch.cat([x, condition], dim=1)
        v_c = transformer(inp, t, cond, encoder_hidden_states_image=embeds, return_dict=False)[0]
        v_u = transformer(inp, t, uncond, encoder_hidden_states_image=embeds, return_dict=False)[0]
        x = schedule.step(x, v_u + guidance * (v_c - v_u), i)
    vae = parts["vae"]
    mean = torch.tensor(vae.config.latents_mean).view(1, Z, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, Z, 1, 1, 1)
    video = vae.decode(x * std + mean, return_dict=False)[0]
    return (video / 2 + 0.5).clamp(0, 1), condition


def test_uncached_i2v_equals_diffusers_forward_with_diffusers_condition(parts):
    image = picture(1)
    out = run(wan_pipe(parts), image=image, negative_prompt="blurry", seed=5, guidance_scale=3.0)
    expected, _ = reference_loop(parts, "i2v", ["a seven", "a two"], "blurry", image, None, 5, 3.0)
    assert out.frames.shape == (2, 3, FRAMES, H, W)
    assert torch.allclose(out.frames, expected, atol=1e-5)


def test_tensor_image_gives_the_pil_images_condition(parts):
    pipe, image = wan_pipe(parts), picture(3)
    as_tensor = torch.tensor(numpy.array(image)).permute(2, 0, 1).float() / 255
    a = run(pipe, image=image, prompt="x", guidance_scale=1.0)
    b = run(pipe, image=as_tensor, prompt="x", guidance_scale=1.0)
    assert torch.allclose(a.frames, b.frames, atol=1e-5)


def test_ada_taylor_block_passes_equal_planned_compute_steps(parts):
    cache = ada_taylor()
    out = run(wan_pipe(parts), image=picture(1), cache=cache)
    for is_cond, name in ((True, "cond"), (False, "uncond")):
        planned = cache.planned_compute_steps(is_cond)
        assert len(planned) < STEPS
        assert out.stack_passes["transformer"][name] == len(planned)
        assert out.cache_stats["transformer"][name]["computed_steps"] == planned
    assert out.branch_steps == {"cond": STEPS, "uncond": STEPS}


def _capture_model_inputs(transformer):
    seen = []
    hook = transformer.patch_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    return seen, hook


def test_fl2v_runs_and_its_mask_marks_first_and_last_latent_frames(parts):
    pipe, first, last = wan_pipe(parts, "fl2v"), picture(1), picture(2)
    seen, hook = _capture_model_inputs(parts["fl2v"])
    out = run(pipe, image=first, last_image=last, prompt="a seven", seed=4, negative_prompt="blurry")
    hook.remove()
    assert out.frames.shape == (1, 3, FRAMES, H, W) and torch.isfinite(out.frames).all()
    mask = seen[0][:, Z : Z + S_T]  # [B, s_t, F, h, w]: one channel per pixel frame of the latent frame
    assert (mask[:, :, 0] == 1).all()  # frame 0, repeated s_t times
    assert (mask[:, :, 1] == 0).all()
    assert (mask[:, :-1, 2] == 0).all() and (mask[:, -1, 2] == 1).all()  # the last pixel frame only
    # The whole condition is diffusers' (mask + latents), the same at every step and for both branches.
    noise = torch.zeros(1, Z, 3, H // 2, W // 2)
    condition, _ = diffusers_condition(parts, "fl2v", first, last, 1, noise)
    assert len(seen) == 2 * STEPS
    for model_input in seen:
        assert torch.allclose(model_input[:, Z:], condition, atol=1e-6)
    expected, _ = reference_loop(parts, "fl2v", ["a seven"], "blurry", first, last, 4, 4.0)
    assert torch.allclose(out.frames, expected, atol=1e-5)


def test_clear_errors(parts, make_tiny_wan):
    pipe = wan_pipe(parts)
    with pytest.raises(ParamsError, match="image-to-video checkpoint .*pass image="):
        run(pipe)
    with pytest.raises(ParamsError, match="last_image= needs a first-last-frame"):
        run(pipe, image=picture(1), last_image=picture(2))
    with pytest.raises(ParamsError, match="FL2V.*pass last_image= too"):
        run(wan_pipe(parts, "fl2v"), image=picture(1))
    with pytest.raises(ParamsError, match=r"must be \[3, H, W\]"):
        run(pipe, image=torch.rand(1, 3, H, W))
    with pytest.raises(ParamsError, match=r"values in \[0, 1\]"):
        run(pipe, image=torch.rand(3, H, W) * 2 - 1)
    t2v = WanPipeline({"transformer": make_tiny_wan(out_channels=Z)}, parts["text"], SETTINGS, parts["vae"])
    with pytest.raises(ParamsError, match="text-to-video checkpoint"):
        run(t2v, image=picture(1))
    with pytest.raises(ParamsError, match="text-to-video checkpoint"):
        run(t2v, last_image=picture(1))
    with pytest.raises(ParamsError, match="pass image_encoder="):
        WanPipeline({"transformer": parts["i2v"]}, parts["text"], SETTINGS, parts["vae"])
    with pytest.raises(ParamsError, match="needs a vae"):
        WanPipeline({"transformer": parts["i2v"]}, parts["text"], replace(SETTINGS, latent_space="pixel"))
    wrong = make_tiny_wan(in_channels=IN_CHANNELS + 1, out_channels=Z)
    with pytest.raises(ParamsError, match="other channel layouts are not supported"):
        WanPipeline({"transformer": wrong}, parts["text"], SETTINGS, parts["vae"])


def test_wan22_i2v_two_experts_without_image_encoder(parts, make_tiny_wan):
    experts = {
        "transformer": make_tiny_wan(seed=0, in_channels=IN_CHANNELS, out_channels=Z),
        "transformer_2": make_tiny_wan(seed=1, in_channels=IN_CHANNELS, out_channels=Z),
    }
    pipe = Wan22Pipeline(experts, parts["text"], replace(SETTINGS, boundary_ratio=0.6), parts["vae"])
    switch = 3  # shift 1, 6 steps: timesteps 1000, 833, 667, 500, ... -> 0.6 boundary at step 3
    caches = {"transformer": ada_taylor(), "transformer_2": ada_taylor(init_step=switch)}
    seen, hook = _capture_model_inputs(experts["transformer_2"])
    out = run(pipe, image=picture(1), last_image=picture(2), cache=caches)
    hook.remove()
    assert out.expert_steps == {"transformer": [0, 1, 2], "transformer_2": [3, 4, 5]}
    for expert, cache in caches.items():
        for is_cond, name in ((True, "cond"), (False, "uncond")):
            # Each expert's cache plans the whole run; it is consulted on its expert's steps only.
            planned = [s for s in cache.planned_compute_steps(is_cond) if s in out.expert_steps[expert]]
            assert len(planned) < len(out.expert_steps[expert])
            assert out.stack_passes[expert][name] == len(planned)
            assert out.cache_stats[expert][name]["computed_steps"] == planned
    assert out.cache_stats["transformer_2"]["cond"]["computed_steps"][0] == switch
    assert seen and seen[0].shape[1] == IN_CHANNELS and (seen[0][:, Z, 0] == 1).all()
    assert out.frames.shape == (2, 3, FRAMES, H, W) and torch.isfinite(out.frames).all()
    with pytest.raises(ParamsError, match="pass image="):
        run(pipe, cache={"transformer": ada_taylor(), "transformer_2": ada_taylor(init_step=switch)})


def test_model_dir_with_image_encoder_loads_as_i2v(tmp_path, make_tiny_wan, parts):
    from test_pipeline_wan import _write_model_dir

    index = _write_model_dir(tmp_path, make_tiny_wan)
    parts["i2v"].save_pretrained(tmp_path / "transformer")
    parts["encoder"].save_pretrained(tmp_path / "image_encoder")
    parts["processor"].save_pretrained(tmp_path / "image_processor")
    index.update(
        image_encoder=["transformers", "CLIPVisionModel"], image_processor=["transformers", "CLIPImageProcessor"]
    )
    index["ditcache"].update(num_frames=FRAMES)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    loaded = load_model_dir(tmp_path)
    assert isinstance(loaded.image_encoder, CLIPVisionModel) and loaded.image_processor is not None
    pipe = pipeline_for(loaded)
    out = run(pipe, prompt="a cat", image=picture(1), num_inference_steps=2)
    assert out.frames.shape == (1, 3, FRAMES, 8, 8)
    for name in ("image_processor", "image_encoder"):
        index.pop(name)
        (tmp_path / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ParamsError, match="lists image_encoder but not image_processor|pass image_encoder="):
            load_model_dir(tmp_path) if name == "image_processor" else pipeline_for(load_model_dir(tmp_path))
    index.update(
        image_encoder=["transformers", "CLIPVisionModel"], image_processor=["transformers", "CLIPImageProcessor"]
    )
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "image_processor" / "preprocessor_config.json").unlink()
    with pytest.raises(ParamsError, match="missing image_processor/preprocessor_config.json"):
        load_model_dir(tmp_path)
