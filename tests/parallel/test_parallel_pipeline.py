"""CFG-parallel, Ulysses SP and CFG x SP runs of every family equal the single-process run.

Each layout is one gloo world (``run_ranks``) in which every rank builds the same tiny models (same
seeds) and runs every case with ``parallel=`` its groups; the test process runs the same cases on
one process and compares. Token counts are odd (15 or 9 image tokens), so the last SP shard is
padded. The caches are NoCache and an AdaTaylorCache whose plan skips steps, so the skipped steps
(cache on the local shard, no attention communication) are compared too.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from conftest import TinyPromptEncoder, tiny_wan, torchrun, write_tiny_digit_model

from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.none import NoCache
from ditcache.errors import CacheConfigError, StepSyncError
from ditcache.parallel import ParallelGroups, init_parallel
from ditcache.parallel.testing import run_ranks, values_or_raise
from ditcache.families.hunyuan_video.pipeline import HunyuanPromptEmbeds, HunyuanVideoPipeline
from ditcache.runtime.loading import ModelSettings
from ditcache.families.wan.pipeline import Wan22Pipeline, WanPipeline
from ditcache.families.qwen_image.pipeline import QwenImagePipeline, QwenPromptEmbeds
from ditcache.runtime.scheduler import wan_schedule

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # every test runs several ranks

TOL = 1e-4
STEPS = 6
SWITCH = 3  # shift 1, boundary 0.6: timesteps 1000 .. 500 run the high-noise expert
SETTINGS = ModelSettings(
    latent_space="pixel", height=6, width=10, num_frames=1, default_steps=STEPS, default_shift=1.0,
    default_guidance_scale=4.0, model_type=None, boundary_ratio=None,
)  # 3 x 5 = 15 image tokens
TEXT_DIM = 16


def skipping_cache(init_step: int = 0) -> AdaTaylorCache:
    """Flat curves: the plan skips (K=2 in a row), and cond and uncond plans differ."""
    return AdaTaylorCache(
        cond_mag_ratios=[1.0] * STEPS, uncond_mag_ratios=[1.0] + [1.05] * (STEPS - 1), K=2, thresh=0.3,
        retention_ratio=0.2, num_inference_steps=STEPS, n_derivatives=1, init_step=init_step,
    )


def _hunyuan_text(seed: int, length: int) -> HunyuanPromptEmbeds:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, length, TEXT_DIM, generator=g)
    return HunyuanPromptEmbeds(embeds, torch.ones(1, length, dtype=torch.long), torch.randn(1, 8, generator=g))


def _qwen_text(seed: int, length: int) -> QwenPromptEmbeds:
    return QwenPromptEmbeds(torch.randn(1, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))


def _wan(parallel: ParallelGroups | None, two_experts: bool) -> tuple[Any, dict]:
    torch.manual_seed(0)  # the encoder's linear layer draws from the global generator
    encoder = TinyPromptEncoder(text_dim=TEXT_DIM)
    config = dict(num_attention_heads=4, text_dim=TEXT_DIM)
    call = dict(prompt=["a seven", "a two"], negative_prompt="blurry", enable_ada_taylor_cache=False)
    if not two_experts:
        return WanPipeline({"transformer": tiny_wan(0, **config)}, encoder, SETTINGS, parallel=parallel), call
    experts = {"transformer": tiny_wan(0, **config), "transformer_2": tiny_wan(1, **config)}
    settings = replace(SETTINGS, boundary_ratio=0.6)
    return Wan22Pipeline(experts, encoder, settings, parallel=parallel), call


def _hunyuan(parallel: ParallelGroups | None, kind: str | None, num_frames: int = 9) -> tuple[Any, dict]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4), image_condition_type=kind,
    ).eval()
    call = dict(
        prompt_embeds=_hunyuan_text(1, 6), negative_prompt_embeds=_hunyuan_text(2, 4),
        num_inference_steps=STEPS, guidance_scale=3.0, height=16, width=48, num_frames=num_frames,
        output_type="latent", enable_ada_taylor_cache=False,
    )  # 9 frames: 3 latent frames of 1 x 3 tokens = 9 image tokens
    if kind == "token_replace":
        call["image_latents"] = torch.randn(1, 4, 1, 2, 6, generator=torch.Generator().manual_seed(9))
    return HunyuanVideoPipeline(model, parallel=parallel), call


def _qwen(parallel: ParallelGroups | None, edit: bool) -> tuple[Any, dict]:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), zero_cond_t=edit,
    ).eval()
    call = dict(
        prompt_embeds=_qwen_text(1, 5), negative_prompt_embeds=_qwen_text(2, 3),
        num_inference_steps=STEPS, height=48, width=80, output_type="latent", enable_ada_taylor_cache=False,
    )  # 3 x 5 = 15 noisy tokens
    if edit:  # Edit-Plus: reference tokens appended (6 + 4), modulated with t=0 (modulate_index)
        g = torch.Generator().manual_seed(3)
        call["reference_latents"] = [torch.randn(1, 4, 1, 4, 6, generator=g), torch.randn(1, 4, 1, 4, 4, generator=g)]
    return QwenImagePipeline(model, parallel=parallel), call


# case -> (build(parallel) -> (pipeline, call kwargs), caches to run)
CASES = {
    "wan": (lambda p: _wan(p, False), ("none", "ada_taylor")),
    "wan22": (lambda p: _wan(p, True), ("none", "ada_taylor")),
    "hunyuan": (lambda p: _hunyuan(p, None), ("none", "ada_taylor")),
    "hunyuan_token_replace": (lambda p: _hunyuan(p, "token_replace"), ("ada_taylor",)),
    # 2 latent frames = 6 tokens: on SP 4 (shards of 2, 2 padding) the 3 first-frame tokens span
    # ranks 0 and 1, and rank 3 holds padding only (its cache sees no token at all).
    "hunyuan_token_replace_short": (lambda p: _hunyuan(p, "token_replace", num_frames=5), ("none", "ada_taylor")),
    "qwen": (lambda p: _qwen(p, False), ("none", "ada_taylor")),
    "qwen_edit_zero_cond_t": (lambda p: _qwen(p, True), ("ada_taylor",)),
}


def _run_case(name: str, cache: str, parallel: ParallelGroups | None) -> dict[str, Any]:
    pipe, call = CASES[name][0](parallel)  # the calls turn the params cache off: "none" is NoCache
    if cache == "ada_taylor":
        call["cache"] = (
            {"transformer": skipping_cache(), "transformer_2": skipping_cache(SWITCH)} if name == "wan22"
            else skipping_cache()
        )
    out = pipe(progress=False, **call)
    return {"frames": out.frames, "stack_passes": out.stack_passes, "layout": out.layout, "summary": out.summary()}


def _all_cases(parallel: ParallelGroups | None, names: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    with torch.no_grad():
        return {(name, cache): _run_case(name, cache, parallel) for name in names for cache in CASES[name][1]}


class RankDependentCache(NoCache):
    """Skips step 3 on global rank 1 only: a cache whose decision depends on the rank."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def should_compute(self, is_cond: bool) -> bool:
        super().should_compute(is_cond)
        return not (self.rank == 1 and self.current_step(is_cond) == 3)

    def approximate(self, input: torch.Tensor, is_cond: bool) -> torch.Tensor:
        return input


def _wan_per_token_timestep(groups: ParallelGroups) -> float:
    """Wan2.2 TI2V-style per-token timesteps: the [B, S, 6, D] modulation is sharded with the tokens."""
    from ditcache.parallel import UlyssesContext, apply_ulysses
    from ditcache.families import adapter_for

    adapter = adapter_for(tiny_wan(0, num_attention_heads=4, text_dim=TEXT_DIM))
    g = torch.Generator().manual_seed(4)
    latents, text = torch.randn(2, 4, 1, 6, 10, generator=g), torch.randn(2, 5, TEXT_DIM, generator=g)
    timestep = torch.rand(2, 15, generator=g) * 1000
    expected = adapter(latents, timestep, text)
    ctx = apply_ulysses(adapter.transformer, UlyssesContext(groups.sp), adapter.ulysses_processors)
    return (adapter(latents, timestep, text, sp=ctx) - expected).abs().max().item()


def _count_all_to_all(groups: ParallelGroups) -> dict[str, int]:
    """All-to-alls of a skipping Wan run vs. those its computed passes need (2 per attention layer)."""
    from ditcache.parallel.groups import Group

    calls = []
    original = Group.all_to_all

    def counting(self, tensor, op="all_to_all"):
        calls.append(op)
        return original(self, tensor, op)

    Group.all_to_all = counting
    try:
        with torch.no_grad():
            out = _run_case("wan", "ada_taylor", groups)
    finally:
        Group.all_to_all = original
    passes = sum(out["stack_passes"]["transformer"].values())
    return {"all_to_all": len(calls), "needed": passes * 2 * 2}  # 2 blocks, 2 exchanges per attention


def _layout_job(rank: int, world: int, cfg_degree: int, sp_degree: int, names: list[str]) -> dict[str, Any]:
    groups = init_parallel(cfg_degree, sp_degree, timeout_s=180)
    result: dict[str, Any] = {"cases": _all_cases(groups, names)}
    if cfg_degree == 2:
        pipe, call = _wan(groups, False)
        try:
            pipe(progress=False, **{**call, "guidance_scale": 1.0})
        except CacheConfigError as exc:
            result["guidance_off_error"] = str(exc)
    if sp_degree == 2 and cfg_degree == 1:
        result["communication"] = _count_all_to_all(groups)
        result["per_token_timestep_diff"] = _wan_per_token_timestep(groups)
        pipe, call = _wan(groups, False)
        try:
            with torch.no_grad():
                pipe(progress=False, **{**call, "cache": RankDependentCache(groups.rank)})
        except StepSyncError as exc:
            result["step_sync_error"] = str(exc)
    return result


EVERY_FAMILY = [name for name in CASES if name != "hunyuan_token_replace_short"]
# layout -> (cfg degree, sp degree, cases)
LAYOUTS = {
    "cfg2": (2, 1, EVERY_FAMILY),
    "sp2": (1, 2, EVERY_FAMILY),
    "cfg2_sp2": (2, 2, EVERY_FAMILY),
    "sp4": (1, 4, ["hunyuan_token_replace_short"]),
}


@pytest.fixture(scope="module")
def single_process() -> dict[tuple[str, str], dict[str, Any]]:
    return _all_cases(None, list(CASES))


@pytest.fixture(scope="module")
def ranks_of():
    """``ranks_of(layout)``: every rank's results for a layout, run once per module."""
    done: dict[str, list[dict[str, Any]]] = {}

    def run(name: str) -> list[dict[str, Any]]:
        if name not in done:
            cfg_degree, sp_degree, names = LAYOUTS[name]
            outcomes = run_ranks(_layout_job, cfg_degree * sp_degree, cfg_degree, sp_degree, names, timeout_s=420)
            done[name] = values_or_raise(outcomes)
        return done[name]

    return run


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_family_and_cache_matches_single_process(name, ranks_of, single_process):
    ranks = ranks_of(name)
    worst: dict[str, float] = {}
    for key in ranks[0]["cases"]:
        ref = single_process[key]
        for rank, result in enumerate(ranks):
            got = result["cases"][key]
            assert got["frames"].shape == ref["frames"].shape, (name, key)
            diff = (got["frames"] - ref["frames"]).abs().max().item()
            worst[key[0]] = max(worst.get(key[0], 0.0), diff)
            assert diff <= TOL, (name, key, rank, diff)
            # The same steps were computed for each branch (under CFG-parallel: exchanged by the pair).
            assert got["stack_passes"] == ref["stack_passes"], (name, key, rank)
            assert got["layout"].startswith("cfg {} x sp {}".format(*LAYOUTS[name]))
        computed = sum(n for per_branch in ref["stack_passes"].values() for n in per_branch.values())
        assert (computed < 2 * STEPS) == (key[1] == "ada_taylor"), key  # the cached runs do skip
    print(f"{name}: max abs diff per family " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))


def test_guidance_off_with_cfg_parallel_is_a_clear_error(ranks_of):
    for result in ranks_of("cfg2"):
        assert "CFG-parallel (cfg_degree=2) needs classifier-free guidance" in result["guidance_off_error"]


def test_skipped_steps_do_no_attention_communication(ranks_of):
    for result in ranks_of("sp2"):
        assert result["communication"]["all_to_all"] == result["communication"]["needed"] > 0


def test_per_token_timestep_modulation_is_sharded_with_the_tokens(ranks_of):
    for result in ranks_of("sp2"):
        assert result["per_token_timestep_diff"] <= TOL


def test_a_rank_dependent_cache_fails_on_every_rank_with_a_readable_message(ranks_of):
    for result in ranks_of("sp2"):
        message = result["step_sync_error"]
        assert "ranks diverged at step 3" in message and "disagrees on compute/skip" in message
        assert "rank 0 (cfg 0, sp 0): cond step 3 compute" in message
        assert "rank 1 (cfg 0, sp 1): cond step 3 skip" in message


# -- torchrun: launch/generate.py (ditcache generate) on 2 ranks ----------------------------------------------------------


def test_torchrun_generate_cfg_parallel_writes_the_single_process_png(tmp_path):
    from PIL import Image

    model = write_tiny_digit_model(tmp_path / "model")
    common = ["--model", "wan", "--model-dir", str(model), "--steps", "3", "--cache", "none", "--no-progress",
              "--prompt", "a handwritten 3", "--prompt", "seven"]
    run = torchrun("generate.py", 2, *common, "--cfg-parallel", "2", "--output", str(tmp_path / "cfg2.png"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote") == 1 and "cfg 2 x sp 1 x dp 1 (2 ranks)" in run.stdout
    assert "cond: 3 computed / 0 skipped | uncond: 3 computed / 0 skipped" in run.stdout

    from ditcache.launch import generate

    assert generate.main([*common, "--output", str(tmp_path / "single.png")]) == 0
    with Image.open(tmp_path / "cfg2.png") as parallel, Image.open(tmp_path / "single.png") as single:
        assert parallel.tobytes() == single.tobytes()


# -- the bundled reference model (3 heads: CFG-parallel 2, or SP 3) ------------------------------------


def _reference_runs(parallel: ParallelGroups | None) -> dict[tuple[str, str], torch.Tensor]:
    from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
    from ditcache.families import load_pipeline

    frames = {}
    for model in (REFERENCE_DIGITS, REFERENCE_DIGITS_MOE):
        pipe = load_pipeline(model, parallel=parallel)
        for cache in ("none", "ada_taylor"):
            call = dict(prompt=["a handwritten 3", "seven"], num_inference_steps=STEPS, progress=False)
            if cache == "none":
                call["enable_ada_taylor_cache"] = False
            elif isinstance(pipe, Wan22Pipeline):
                switch = pipe._experts_per_step(wan_schedule(STEPS, pipe.settings.default_shift)).count(
                    "transformer"
                )
                call["cache"] = {"transformer": skipping_cache(), "transformer_2": skipping_cache(switch)}
            else:
                call["cache"] = skipping_cache()
            with torch.no_grad():
                frames[(model.name, cache)] = pipe(**call).frames
    return frames


def _reference_job(rank: int, world: int, cfg_degree: int, sp_degree: int) -> dict[tuple[str, str], torch.Tensor]:
    return _reference_runs(init_parallel(cfg_degree, sp_degree, timeout_s=180))


@pytest.mark.parametrize("cfg_degree, sp_degree", [(2, 1), (1, 3)], ids=["cfg2", "sp3"])
def test_reference_model_layouts_match_single_process(cfg_degree, sp_degree):
    from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE

    if not (REFERENCE_DIGITS / "model_index.json").is_file() or not (REFERENCE_DIGITS_MOE / "model_index.json").is_file():
        pytest.skip("the bundled reference models are not present")
    single = _reference_runs(None)
    ranks = values_or_raise(run_ranks(_reference_job, cfg_degree * sp_degree, cfg_degree, sp_degree, timeout_s=420))
    for key, expected in single.items():
        diff = max((r[key] - expected).abs().max().item() for r in ranks)
        print(f"reference cfg{cfg_degree} x sp{sp_degree} {key}: max abs diff {diff:.1e}")
        assert diff <= TOL, (key, diff)
