"""WanPipeline / Wan22Pipeline end to end on tiny random models (CPU, fp32).

The caches here are real: AdaTaylorCache with explicit params, the Calibrator, and a test-local
fixed-schedule cache (residual reuse on a given step list) that implements the contract itself.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.none import NoCache
from ditcache.cache.calibrator import Calibrator
from ditcache.errors import CacheConfigError, ParamsError, StepSyncError, UnknownModelError
from ditcache.runtime.loading import ModelSettings, load_model_dir
from ditcache.families import load_pipeline
from ditcache.families.wan.pipeline import Wan22Pipeline, WanPipeline, pipeline_for

STEPS = 8
SETTINGS = ModelSettings(
    latent_space="pixel",
    height=8,
    width=8,
    num_frames=1,
    default_steps=STEPS,
    default_shift=1.0,
    default_guidance_scale=4.0,
    model_type=None,
    boundary_ratio=None,
)
# With shift 1 the timesteps are 1000, 875, ..., 125: a 0.6 boundary switches experts at step 4.
BOUNDARY, SWITCH = 0.6, 4


class FixedScheduleCache(BaseFeatureCache):
    """Computes on ``compute_steps``, reuses the last residual elsewhere; counts from ``init_step``."""

    def __init__(self, compute_steps, init_step: int = 0) -> None:
        self.compute_steps = set(compute_steps)
        self.init_step = init_step
        self.reset()

    def reset(self) -> None:
        self.step = {True: self.init_step - 1, False: self.init_step - 1}
        self.residual: dict[bool, torch.Tensor] = {}
        self.log: dict[bool, list[tuple[int, bool]]] = {True: [], False: []}

    def should_compute(self, is_cond):
        self.step[is_cond] += 1
        decision = self.step[is_cond] in self.compute_steps
        self.log[is_cond].append((self.step[is_cond], decision))
        return decision

    def update(self, output, ori_input, is_cond):
        self.residual[is_cond] = output - ori_input

    def approximate(self, input, is_cond):
        return input + self.residual[is_cond]

    def current_step(self, is_cond):
        return self.step[is_cond]


def ada_taylor(num_steps=STEPS, init_step=0, n_derivatives=1) -> AdaTaylorCache:
    # Ratios close to 1 let the schedule skip; the uncond curve differs so the plans differ.
    return AdaTaylorCache(
        num_inference_steps=num_steps,
        init_step=init_step,
        n_derivatives=n_derivatives,
        cond_mag_ratios=[1.0] + [0.98] * (num_steps - 1),
        uncond_mag_ratios=[1.0] + [0.96] * (num_steps - 1),
        K=3,
        thresh=0.15,
        retention_ratio=0.2,
    )


@pytest.fixture
def pipe(make_tiny_wan, prompt_encoder) -> WanPipeline:
    return WanPipeline({"transformer": make_tiny_wan()}, prompt_encoder, SETTINGS)


@pytest.fixture
def pipe22(make_tiny_wan, prompt_encoder) -> Wan22Pipeline:
    experts = {"transformer": make_tiny_wan(seed=0), "transformer_2": make_tiny_wan(seed=1)}
    return Wan22Pipeline(experts, prompt_encoder, replace(SETTINGS, boundary_ratio=BOUNDARY))


def run(pipe, **kw):
    """A quiet request; the cache is off unless a test asks for one (an explicit cache wins anyway)."""
    kw.setdefault("prompt", ["a seven", "a two"])
    if "feature_cache" not in kw and "calibrator" not in kw:
        kw.setdefault("enable_ada_taylor_cache", False)
    return pipe(progress=False, **kw)


def test_block_passes_equal_planned_compute_steps(pipe):
    cache = ada_taylor()
    out = run(pipe, cache=cache)
    for is_cond, name in ((True, "cond"), (False, "uncond")):
        planned = cache.planned_compute_steps(is_cond)
        assert len(planned) < STEPS  # the plan does skip
        assert out.stack_passes["transformer"][name] == len(planned)
        assert out.cache_stats["transformer"][name]["computed_steps"] == planned
    assert out.branch_steps == {"cond": STEPS, "uncond": STEPS}
    assert out.frames.shape == (2, 4, 1, 8, 8)
    assert 0.0 <= out.frames.min() and out.frames.max() <= 1.0
    assert out.cache_memory_bytes["transformer"] > 0
    assert "skipped" in out.summary()


def test_every_step_computed_equals_uncached_exactly(pipe):
    uncached = run(pipe)
    cached = run(pipe, cache=FixedScheduleCache(range(STEPS)))
    assert torch.equal(uncached.frames, cached.frames)
    skipping = run(pipe, cache=FixedScheduleCache([0, 1, 4, STEPS - 1]))
    assert not torch.equal(uncached.frames, skipping.frames)
    assert skipping.total_stack_passes() == {"cond": 4, "uncond": 4}


def test_back_to_back_requests_match_fresh_runs(pipe, make_tiny_wan, prompt_encoder):
    cache = ada_taylor()
    first = run(pipe, cache=cache, seed=3)
    run(pipe, cache=cache, seed=9, prompt="something else", num_inference_steps=STEPS)
    again = run(pipe, cache=cache, seed=3)
    fresh_pipe = WanPipeline({"transformer": make_tiny_wan()}, prompt_encoder, SETTINGS)
    fresh = run(fresh_pipe, cache=ada_taylor(), seed=3)
    assert torch.equal(first.frames, again.frames)
    assert torch.equal(first.frames, fresh.frames)
    assert again.cache_stats == first.cache_stats
    assert again.stack_passes == first.stack_passes


def test_guidance_off_runs_no_uncond_pass(pipe):
    calls = []
    hook = pipe._model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    out = run(pipe, guidance_scale=1.0, cache=NoCache())
    hook.remove()
    assert len(calls) == STEPS
    assert out.stack_passes == {"transformer": {"cond": STEPS}}
    assert out.branch_steps == {"cond": STEPS}
    assert set(out.cache_stats["transformer"]) == {"cond"}


def _expert_trace(pipe22):
    """Record which expert's blocks ran, in order."""
    trace = []
    hooks = [
        pipe22.adapters[name].transformer.blocks[0].register_forward_hook(lambda *a, n=name: trace.append(n))
        for name in ("transformer", "transformer_2")
    ]
    return trace, hooks


def test_wan22_switches_experts_at_the_boundary(pipe22):
    trace, hooks = _expert_trace(pipe22)
    out = run(pipe22, guidance_scale=1.0)
    for hook in hooks:
        hook.remove()
    assert out.expert_steps == {"transformer": list(range(SWITCH)), "transformer_2": list(range(SWITCH, STEPS))}
    assert trace == ["transformer"] * SWITCH + ["transformer_2"] * (STEPS - SWITCH)
    assert out.stack_passes == {"transformer": {"cond": SWITCH}, "transformer_2": {"cond": STEPS - SWITCH}}


def test_wan22_low_noise_cache_forces_compute_at_the_switch(pipe22):
    # Without init_step this schedule would skip the switch step (step 4 is mid-run).
    assert SWITCH not in ada_taylor().planned_compute_steps(True)
    caches = {"transformer": ada_taylor(), "transformer_2": ada_taylor(init_step=SWITCH)}
    out = run(pipe22, cache=caches)
    low = out.cache_stats["transformer_2"]
    high = out.cache_stats["transformer"]
    for name, is_cond in (("cond", True), ("uncond", False)):
        assert low[name]["computed_steps"][0] == SWITCH
        assert min(low[name]["computed_steps"] + low[name]["skipped_steps"]) == SWITCH
        assert max(high[name]["computed_steps"] + high[name]["skipped_steps"]) == SWITCH - 1
        assert out.stack_passes["transformer_2"][name] == len(caches["transformer_2"].planned_compute_steps(is_cond))


@pytest.fixture
def tiny_params(tmp_path, monkeypatch):
    """A user params file "Tiny-Test" (the ada_taylor() curves, calibrated at 2N steps with sigmas)."""
    from ditcache.params.loader import PARAMS_DIR_ENV
    from ditcache.runtime.scheduler import wan_schedule

    cal = 2 * STEPS
    data = {
        "model_type": "Tiny-Test",
        "K": 3,
        "thresh": 0.15,
        "retention_ratio": 0.2,
        "cond_mag_ratios": [1.0] + [0.98] * (cal - 1),
        "uncond_mag_ratios": [1.0] + [0.96] * (cal - 1),
        "num_inference_steps": cal,
        "sigma_shift": 1.0,
        "sigmas": wan_schedule(cal, 1.0).sigmas[:-1].tolist(),
    }
    (tmp_path / "Tiny-Test.json").write_text(json.dumps(data))
    monkeypatch.setenv(PARAMS_DIR_ENV, str(tmp_path))
    return "Tiny-Test"


def test_enable_ada_taylor_resamples_the_curve_by_the_runs_sigmas(pipe, tiny_params):
    from ditcache.runtime.scheduler import wan_schedule

    out = run(pipe, enable_ada_taylor_cache=True, model_type=tiny_params, sigma_shift=2.0)
    assert out.sigmas == wan_schedule(STEPS, 2.0).sigmas.tolist()
    expected = AdaTaylorCache(
        model_type=tiny_params, num_inference_steps=STEPS, sigmas=wan_schedule(STEPS, 2.0).sigmas[:-1].tolist()
    )
    assert expected.resample_rule == "sigma"
    for is_cond, name in ((True, "cond"), (False, "uncond")):
        assert out.cache_stats["transformer"][name]["computed_steps"] == expected.planned_compute_steps(is_cond)


def test_wan22_enable_ada_taylor_builds_one_cache_per_expert(pipe22, tiny_params):
    out = run(pipe22, enable_ada_taylor_cache=True, model_type=tiny_params)
    assert out.cache_stats["transformer_2"]["cond"]["computed_steps"][0] == SWITCH
    assert sum(out.total_stack_passes().values()) < 2 * STEPS


def test_wan22_shared_calibrator_gives_one_curve_of_n_entries(pipe22, tmp_path):
    calibrator = Calibrator(num_inference_steps=STEPS, sigma_shift=1.0, model_name="tiny-moe")
    out = run(pipe22, cache=calibrator)
    assert out.stack_passes == {
        "transformer": {"cond": SWITCH, "uncond": SWITCH},
        "transformer_2": {"cond": STEPS - SWITCH, "uncond": STEPS - SWITCH},
    }
    result = calibrator.result()
    assert len(result["cond_mag_ratios"]) == len(result["uncond_mag_ratios"]) == STEPS
    assert "uncond_from" not in result["provenance"]
    path = calibrator.write(tmp_path / "tiny.json")
    assert json.loads(path.read_text())["num_inference_steps"] == STEPS


def test_wan22_cache_counting_from_zero_is_a_step_sync_error(pipe22):
    caches = {"transformer": FixedScheduleCache(range(STEPS)), "transformer_2": FixedScheduleCache(range(STEPS))}
    with pytest.raises(StepSyncError, match="init_step"):
        run(pipe22, cache=caches)


def test_bad_requests_raise_clear_errors(pipe, pipe22):
    with pytest.raises(ParamsError, match="height=9 is not divisible by 2"):
        run(pipe, height=9)
    with pytest.raises(ParamsError, match="num_inference_steps must be an integer >= 1"):
        run(pipe, num_inference_steps=0)
    with pytest.raises(ParamsError, match="3 negative prompts for 2 prompts"):
        run(pipe, negative_prompt=["x", "y", "z"])
    with pytest.raises(ParamsError, match="non-empty list"):
        run(pipe, prompt=[])
    with pytest.raises(CacheConfigError, match="needs model_type"):
        run(pipe, enable_ada_taylor_cache=True)
    with pytest.raises(UnknownModelError, match="No-Such-Model"):
        run(pipe, enable_ada_taylor_cache=True, model_type="No-Such-Model")
    with pytest.raises(CacheConfigError, match="either cache= or enable_ada_taylor_cache"):
        run(pipe, cache=NoCache(), enable_ada_taylor_cache=True)
    with pytest.raises(CacheConfigError, match="built for 5 steps"):
        run(pipe, cache=Calibrator(num_inference_steps=5))
    with pytest.raises(CacheConfigError, match="residual must not cross the switch"):
        run(pipe22, cache=NoCache())
    with pytest.raises(CacheConfigError, match="unknown cache 'no-such'; known caches: .*ada_taylor"):
        run(pipe, cache="no-such")
    with pytest.raises(CacheConfigError, match="cache must be a cache config"):
        run(pipe, cache=3)
    with pytest.raises(UnknownModelError, match="no adapter for transformer class Linear"):
        WanPipeline({"transformer": torch.nn.Linear(2, 2)}, pipe.text_encoder, SETTINGS)


# -- a diffusers-format directory: tiny Wan + UMT5 + tokenizer + AutoencoderKLWan ---------------------


def _write_model_dir(root, make_tiny_wan):
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    make_tiny_wan().save_pretrained(root / "transformer")
    torch.manual_seed(0)
    AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=2, scale_factor_spatial=2,
    ).save_pretrained(root / "vae")
    UMT5EncoderModel(
        UMT5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    ).save_pretrained(root / "text_encoder")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(root / "tokenizer")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 3.0}))
    index = {
        "_class_name": "WanPipeline",
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "ditcache": {"height": 8, "width": 8, "num_frames": 3, "default_steps": 3},
    }
    (root / "model_index.json").write_text(json.dumps(index))
    return index


def test_vae_model_dir_loads_and_generates_video(tmp_path, make_tiny_wan):
    _write_model_dir(tmp_path, make_tiny_wan)
    loaded = load_model_dir(tmp_path)
    assert loaded.settings.latent_space == "vae" and loaded.settings.default_shift == 3.0
    pipe = pipeline_for(loaded)
    assert type(pipe) is WanPipeline
    out = run(pipe, prompt="a cat", cache=NoCache())
    assert out.frames.shape == (1, 3, 3, 8, 8)  # 2 latent frames -> 3 video frames, RGB
    half = load_model_dir(tmp_path, dtype=torch.bfloat16).transformers["transformer"]
    assert half.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    # Modules diffusers keeps in fp32 (time embedder, norms, modulation tables, rope) stay fp32.
    assert half.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert half.scale_shift_table.dtype == half.rope.freqs_cos.dtype == torch.float32
    assert torch.equal(half.scale_shift_table, loaded.transformers["transformer"].scale_shift_table)
    half_out = run(load_pipeline(tmp_path, dtype=torch.bfloat16), prompt="a cat", num_inference_steps=2)
    assert half_out.frames.shape == (1, 3, 3, 8, 8) and torch.isfinite(half_out.frames).all()
    with pytest.raises(ParamsError, match="num_frames - 1 must be divisible by the VAE's temporal scale 2"):
        run(pipe, prompt="a cat", num_frames=4)
    with pytest.raises(ParamsError, match="height=6 is not divisible by 4"):
        run(pipe, prompt="a cat", height=6)


def test_missing_or_unknown_model_dir_parts(tmp_path, make_tiny_wan):
    index = _write_model_dir(tmp_path, make_tiny_wan)
    with pytest.raises(ParamsError, match="does not exist"):
        load_model_dir(tmp_path / "nowhere")
    (tmp_path / "vae" / "config.json").unlink()
    with pytest.raises(ParamsError, match=r"missing vae/config.json: vae/ should contain an AutoencoderKLWan"):
        load_model_dir(tmp_path)
    (tmp_path / "transformer" / "config.json").rename(tmp_path / "transformer" / "moved.json")
    with pytest.raises(ParamsError, match=r"missing transformer/config.json"):
        load_model_dir(tmp_path)
    index["text_encoder"] = ["transformers", "CLIPTextModel"]
    index["vae"] = None
    index["ditcache"]["latent_space"] = "pixel"
    (tmp_path / "transformer" / "moved.json").rename(tmp_path / "transformer" / "config.json")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnknownModelError, match="unsupported text_encoder transformers.CLIPTextModel"):
        load_model_dir(tmp_path)
    index["transformer"] = ["diffusers", "NoSuchTransformer"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnknownModelError, match="diffusers.NoSuchTransformer"):
        load_model_dir(tmp_path)


def test_generate_cli_writes_output_and_reports_errors(tmp_path, make_tiny_wan, capsys):
    from ditcache.launch import generate

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    _write_model_dir(model_dir, make_tiny_wan)
    common = ["--model", "wan", "--model-dir", str(model_dir), "--steps", "2", "--no-progress"]
    out = tmp_path / "cat.mp4"
    assert generate.main([*common, "--prompt", "a cat", "--prompt", "a dog", "--cache", "none", "--output", str(out)]) == 0
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "cond: 2 computed / 0 skipped" in printed and f"wrote {out}" in printed

    png = tmp_path / "still.png"
    assert generate.main([*common, "--prompt", "a cat", "--num-frames", "1", "--cache", "none", "--output", str(png)]) == 0
    assert png.stat().st_size > 0

    assert generate.main(["--model", "sd15", "--prompt", "x"]) == 2
    assert "unknown --model 'sd15'" in capsys.readouterr().err
    assert generate.main([*common, "--prompt", "a cat"]) == 2  # cache on, but no params model_type
    assert "needs model_type" in capsys.readouterr().err
    assert generate.main(["--model", "wan", "--prompt", "x", "--model-dir", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_schedule_is_wans_unipc_flow_grid():
    from diffusers import UniPCMultistepScheduler

    from ditcache.runtime.scheduler import wan_schedule

    schedule = wan_schedule(4, 3.0)
    assert schedule.scheduler_name == "UniPCMultistepScheduler" and schedule.shift == 3.0
    reference = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    reference.set_timesteps(4)
    assert torch.equal(schedule.sigmas, reference.sigmas.float()) and torch.equal(schedule.timesteps, reference.timesteps)
    # The flow grid: linspace(1, 1/1000, N + 1)[:-1], shifted (the first just under 1), then exactly 0.
    base = torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)[:-1]
    assert torch.allclose(schedule.sigmas[:-1].double(), 3 * base / (1 + 2 * base), atol=2e-6)
    assert schedule.sigmas[-1] == 0.0
    # UniPC (predicting x_0 = x - sigma v) is exact on a straight path: constant velocity v carries
    # x_1 = noise to x_0 = noise - v.
    noise, velocity = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    x = noise * 1.0
    for i in range(schedule.num_steps):
        x = schedule.step(x, velocity, i)
    assert torch.allclose(x, noise - (1 - schedule.sigmas[0]) * noise - schedule.sigmas[0] * velocity, atol=1e-5)
    with pytest.raises(RuntimeError, match="once each, in order"):
        schedule.step(x, velocity, 0)
    with pytest.raises(ParamsError, match="sigma_shift must be a number > 0"):
        wan_schedule(4, 0.0)


@torch.no_grad()
def test_uncached_pipeline_equals_a_hand_written_cfg_euler_loop(pipe, prompt_encoder):
    """The whole loop (encode, noise, CFG combine, scheduler step) against diffusers' forward and
    scheduler, written out."""
    from diffusers import UniPCMultistepScheduler

    out = run(pipe, prompt=["a seven", "a two"], negative_prompt="blurry", seed=5, guidance_scale=3.0, sigma_shift=2.0)
    model = pipe._model
    cond = prompt_encoder.encode(["a seven", "a two"])
    uncond = prompt_encoder.encode(["blurry", "blurry"])
    x = torch.randn((2, 4, 1, 8, 8), generator=torch.Generator().manual_seed(5))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=2.0)
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        v_c = model(x, t.expand(2), cond, return_dict=False)[0]
        v_u = model(x, t.expand(2), uncond, return_dict=False)[0]
        x = scheduler.step(v_u + 3.0 * (v_c - v_u), t, x, return_dict=False)[0]
    assert torch.allclose(out.frames, (x / 2 + 0.5).clamp(0, 1), atol=1e-5)


def test_png_grid_layout_and_video_frames(tmp_path):
    import imageio.v2 as imageio
    from PIL import Image

    from ditcache.runtime.io import save_frames

    digits = torch.ones(5, 1, 1, 16, 16)  # 5 images -> 3 columns x 2 rows, upscaled 8x to 128 px
    with Image.open(save_frames(digits, tmp_path / "grid.png")) as image:
        assert image.size == (3 * 130 + 2, 2 * 130 + 2)
        assert image.getpixel((0, 0)) == (128, 128, 128) and image.getpixel((5, 5)) == (255, 255, 255)
    reader = imageio.get_reader(save_frames(torch.rand(2, 3, 4, 16, 16), tmp_path / "clip.mp4"), format="FFMPEG")
    assert reader.count_frames() == 4
    with pytest.raises(ParamsError, match="must end in one of"):
        save_frames(digits, tmp_path / "grid.jpg")


def test_two_expert_model_dir_loads_as_wan22(tmp_path, make_tiny_wan):
    index = _write_model_dir(tmp_path, make_tiny_wan)
    make_tiny_wan(seed=1).save_pretrained(tmp_path / "transformer_2")
    index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.5)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    pipe = load_pipeline(tmp_path)
    assert type(pipe) is Wan22Pipeline and pipe.boundary_ratio == 0.5
    with pytest.raises(ParamsError, match=r"experts \['transformer_2'\] that WanPipeline would ignore"):
        WanPipeline.from_pretrained(tmp_path)
    index.pop("boundary_ratio")
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ParamsError, match="Wan2.2 needs boundary_ratio"):
        load_pipeline(tmp_path)
