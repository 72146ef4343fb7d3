"""Ring attention (sequence parallelism = ulysses x ring) equals one process.

Two layouts, each one gloo world: ring 2 (2 ranks) and ulysses 2 x ring 2 (4 ranks). In each, every
rank runs

- real diffusers blocks of every family (as in test_ulysses: 7 image tokens, so the last shard is
  padded; HunyuanVideo with a text key mask, Qwen-Image with its text mask);
- whole pipelines with a cache whose plan skips steps: the bundled Wan reference model under ring 2
  (3 heads: no SP degree of 2 is possible with Ulysses alone), a 4-head Wan and a 4-head Qwen-Image
  (joint text attention) under both layouts (15 image tokens: padded);

and the test process runs the same on one process. Tolerance (fp32): ``TOL`` = 1e-5 on block
outputs and on the denoised latents/frames; the computed steps must be the same.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TinyPromptEncoder, tiny_wan

from ditcache.cache import cache_config
from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.errors import CacheConfigError, LayoutMismatchError
from ditcache.families import adapter_for
from ditcache.families.qwen_image.pipeline import QwenImagePipeline, QwenPromptEmbeds
from ditcache.families.wan.pipeline import WanPipeline
from ditcache.parallel import (
    Group,
    ParallelConfig,
    ParallelGroups,
    UlyssesContext,
    apply_ulysses,
    init_parallel,
    remove_ulysses,
)
from ditcache.parallel.testing import run_ranks, values_or_raise
from ditcache.runtime.loading import ModelSettings

TOL = 1e-5
STEPS = 6
B, TXT = 2, 5
TXT_VALID = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # sample 1 has a padded text suffix
TEXT_DIM = 16
SETTINGS = ModelSettings(
    latent_space="pixel", height=6, width=10, num_frames=1, default_steps=STEPS, default_shift=1.0,
    default_guidance_scale=4.0, model_type=None, boundary_ratio=None,
)  # 3 x 5 = 15 image tokens


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# -- blocks ------------------------------------------------------------------------------------------


def _wan_blocks(sp: Group) -> float:
    model = tiny_wan(0, num_attention_heads=4, text_dim=32)
    rope = model.rope(torch.zeros(B, 4, 7, 2, 2))  # one token per frame
    x, text, temb = torch.randn(B, 7, 32), torch.randn(B, TXT, 32), torch.randn(B, 6, 32) * 0.1

    def blocks(h, rotary):
        for block in model.blocks:
            h = block(h, text, temb, rotary)
        return h

    ref = blocks(x, rope)
    ctx = apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    out = ctx.gather(blocks(ctx.shard(x), tuple(ctx.shard_like(r, dim=1) for r in rope)))
    remove_ulysses(model)
    return _max_diff(out, ref)


def _hunyuan_blocks(sp: Group) -> dict[str, float]:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    ).eval()
    rope = model.rope(torch.zeros(B, 4, 7, 1, 1))
    x, text, temb = torch.randn(B, 7, 32), torch.randn(B, TXT, 32), torch.randn(B, 32)
    mask = torch.cat([torch.ones(B, 7, dtype=torch.bool), TXT_VALID], dim=1)[:, None, None, :]

    def blocks(h, rotary):
        t = text
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            h, t = block(h, t, temb, mask, rotary)
        return h, t

    ref_img, ref_txt = blocks(x, rope)
    ctx = apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    img, txt = blocks(ctx.shard(x), tuple(ctx.shard_like(r, dim=0) for r in rope))
    remove_ulysses(model)
    return {"img": _max_diff(ctx.gather(img), ref_img), "txt": _max_diff(txt[TXT_VALID], ref_txt[TXT_VALID])}


def _qwen_model() -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
        joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6),
    ).eval()


def _qwen_blocks(sp: Group) -> dict[str, float]:
    model = _qwen_model()
    img_freqs, txt_freqs = model.pos_embed([(1, 7, 1)], max_txt_seq_len=TXT, device="cpu")
    x, text, temb = torch.randn(B, 7, 64), torch.randn(B, TXT, 64), torch.randn(B, 64)

    def blocks(h, freqs):
        t = text
        for block in model.transformer_blocks:
            t, h = block(h, t, TXT_VALID, temb, freqs)
        return h, t

    ref_img, ref_txt = blocks(x, (img_freqs, txt_freqs))
    ctx = apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    img, txt = blocks(ctx.shard(x), (ctx.shard_like(img_freqs, dim=0), txt_freqs))
    remove_ulysses(model)
    return {"img": _max_diff(ctx.gather(img), ref_img), "txt": _max_diff(txt[TXT_VALID], ref_txt[TXT_VALID])}


# -- pipelines -----------------------------------------------------------------------------------------


def skipping_cache() -> AdaTaylorCache:
    """Flat curves: the plan skips (K=2 in a row), and cond and uncond plans differ."""
    return AdaTaylorCache(
        cond_mag_ratios=[1.0] * STEPS, uncond_mag_ratios=[1.0] + [1.05] * (STEPS - 1), K=2, thresh=0.3,
        retention_ratio=0.2, num_inference_steps=STEPS, n_derivatives=1,
    )


def _reference(parallel: ParallelGroups | None) -> tuple[Any, dict]:
    from ditcache.families import load_pipeline
    from ditcache.models import REFERENCE_DIGITS

    return load_pipeline(REFERENCE_DIGITS, parallel=parallel), dict(prompt=["a handwritten 3", "seven"])


def _wan(parallel: ParallelGroups | None) -> tuple[Any, dict]:
    torch.manual_seed(0)  # the encoder's linear layer draws from the global generator
    encoder = TinyPromptEncoder(text_dim=TEXT_DIM)
    model = tiny_wan(0, num_attention_heads=4, text_dim=TEXT_DIM)
    return WanPipeline({"transformer": model}, encoder, SETTINGS, parallel=parallel), dict(
        prompt=["a seven", "a two"], negative_prompt="blurry"
    )


def _qwen(parallel: ParallelGroups | None) -> tuple[Any, dict]:
    def text(seed: int, length: int) -> QwenPromptEmbeds:
        return QwenPromptEmbeds(torch.randn(1, length, TEXT_DIM, generator=torch.Generator().manual_seed(seed)))

    return QwenImagePipeline(_qwen_model(), parallel=parallel), dict(
        prompt_embeds=text(1, 5), negative_prompt_embeds=text(2, 3), height=48, width=80, output_type="latent",
    )  # 3 x 5 = 15 image tokens


# name -> (build(parallel) -> (pipeline, call kwargs), cache); FirstBlockCache decides on a statistic of
# the first block's output, which every rank must reduce over the whole SP group (ulysses x ring).
PIPELINES = {
    "reference": (_reference, skipping_cache),
    "reference_first_block": (_reference, lambda: cache_config("first_block", threshold=0.08)),
    "wan": (_wan, skipping_cache),
    "qwen": (_qwen, skipping_cache),
}


def _pipelines(parallel: ParallelGroups | None, names: list[str]) -> dict[str, dict[str, Any]]:
    results = {}
    for name in names:
        build, cache = PIPELINES[name]
        pipe, call = build(parallel)
        with torch.no_grad():
            out = pipe(num_inference_steps=STEPS, cache=cache(), progress=False, **call)
        results[name] = {
            "frames": out.frames, "stack_passes": out.stack_passes, "layout": out.layout,
            "decisions": _computed_steps(out.cache_stats),
        }
    return results


def _computed_steps(cache_stats: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, list[int]]]:
    return {expert: {branch: stats["computed_steps"] for branch, stats in branches.items()}
            for expert, branches in cache_stats.items()}


# name -> (sp degree = world, ring degree, pipelines); the 3-head reference model has no Ulysses 2
LAYOUTS = {"ring2": (2, 2, list(PIPELINES)), "ulysses2_ring2": (4, 2, ["wan", "qwen"])}


# -- the ranks -----------------------------------------------------------------------------------------


CLI = ["--steps", "3", "--cache", "none", "--no-progress", "--prompt", "a handwritten 3"]


def _generate(*flags: str) -> dict[str, Any]:
    """``ditcache generate`` as the launchers run it: parse, then ``run`` (under torchrun's environment)."""
    from ditcache.launch import generate

    result = generate.run(generate.build_parser().parse_args([*CLI, *flags]))
    return {"frames": result.output.frames, "summary": result.output.summary(), "wrote": result.path is not None}


def _layout_mismatch(rank: int) -> str:
    try:
        init_parallel(1, 2, ring_degree=2 if rank == 0 else 1, timeout_s=60)
    except LayoutMismatchError as exc:
        return str(exc)
    return "no error"


def _job(rank: int, world: int, ring: int, pipelines: list[str], out_dir: str) -> dict[str, Any]:
    result: dict[str, Any] = {}
    two_ranks = world == ring == 2  # the checks below run once, on the 2-rank layout
    if two_ranks:
        result["layout_mismatch"] = _layout_mismatch(rank)
    groups = init_parallel(1, world, ring_degree=ring, timeout_s=180)
    result["groups"] = {
        "ulysses": groups.sp.ulysses.ranks, "ring": groups.sp.ring.ranks, "layout": groups.config.layout,
    }
    with torch.no_grad():
        result["wan_blocks"] = _wan_blocks(groups.sp)
        result["hunyuan_blocks"] = _hunyuan_blocks(groups.sp)
        result["qwen_blocks"] = _qwen_blocks(groups.sp)
    result["pipelines"] = _pipelines(groups, pipelines)
    if two_ranks:
        model = _reference(None)[0].adapters["transformer"].transformer
        try:  # the 3-head reference model on Ulysses 2 alone (the ring's two ranks as a plain group)
            apply_ulysses(model, UlyssesContext(groups.sp.ring), adapter_for(model).ulysses_processors)
        except CacheConfigError as exc:
            result["heads_error"] = str(exc)
        result["cli"] = _generate("--ring", "2", "--output", f"{out_dir}/ring2.png")
    return result


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    out_dir = str(tmp_path_factory.mktemp("ring"))
    return {
        name: values_or_raise(run_ranks(_job, world, ring, pipelines, out_dir, timeout_s=420))
        for name, (world, ring, pipelines) in LAYOUTS.items()
    }


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, Any]]:
    return _pipelines(None, list(PIPELINES))


# -- tests -----------------------------------------------------------------------------------------------


def test_config_factors_the_sequence_group_into_ulysses_and_ring():
    config = ParallelConfig(cfg_degree=2, sp_degree=4, world_size=8, ring_degree=2)
    assert config.ulysses_degree == 2
    assert config.layout == "cfg 2 x sp 4 (ulysses 2 x ring 2) x dp 1 (8 ranks)"
    assert config.ulysses_group_ranks() == [(0, 1), (2, 3), (4, 5), (6, 7)]  # Ulysses innermost
    assert config.ring_group_ranks() == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert ParallelConfig(sp_degree=2, world_size=2).layout == "cfg 1 x sp 2 x dp 1 (2 ranks)"  # ring 1: unchanged
    with pytest.raises(CacheConfigError, match=r"ring_degree 3 does not divide sp_degree 4.*--ulysses U --ring R"):
        ParallelConfig(sp_degree=4, world_size=4, ring_degree=3)


def test_cli_parallel_flags():
    from ditcache.launch import generate

    parser = generate.build_parser()
    args = parser.parse_args(["--ulysses", "4", "--ring", "2"])
    assert (args.sp, args.ring) == (4, 2)
    assert parser.parse_args(["--sp", "3"]).sp == 3  # the old spelling of --ulysses
    with pytest.raises(SystemExit):
        parser.parse_args(["--ring", "0"])


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_groups(layouts, name):
    world, ring, _ = LAYOUTS[name]
    for rank, result in enumerate(layouts[name]):
        groups = result["groups"]
        assert len(groups["ring"]) == ring and rank in groups["ring"] and rank in groups["ulysses"]
        assert len(groups["ulysses"]) == world // ring
        assert groups["layout"] == f"cfg 1 x sp {world} (ulysses {world // ring} x ring {ring}) x dp 1 ({world} ranks)"


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_blocks_of_every_family_match_single_process(layouts, name):
    for rank, result in enumerate(layouts[name]):
        assert result["wan_blocks"] <= TOL, (name, rank, result["wan_blocks"])
        for family in ("hunyuan_blocks", "qwen_blocks"):  # joint attention: text rows too
            assert max(result[family].values()) <= TOL, (name, rank, family, result[family])


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_pipelines_match_single_process(layouts, single_process, name):
    worst: dict[str, float] = {}
    for rank, result in enumerate(layouts[name]):
        for pipeline, got in result["pipelines"].items():
            ref = single_process[pipeline]
            worst[pipeline] = max(worst.get(pipeline, 0.0), _max_diff(got["frames"], ref["frames"]))
            assert got["stack_passes"] == ref["stack_passes"], (name, pipeline, rank)  # the same plan
            assert got["decisions"] == ref["decisions"], (name, pipeline, rank)
            assert "ring 2" in got["layout"]
    for pipeline in result["pipelines"]:  # every cache does skip
        passes = single_process[pipeline]["stack_passes"]
        assert sum(n for branch in passes.values() for n in branch.values()) < 2 * STEPS
    print(f"{name}: max abs diff " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) <= TOL, (name, worst)


@pytest.mark.distributed
def test_heads_not_divisible_by_ulysses_suggest_ring(layouts):
    for result in layouts["ring2"]:
        message = result["heads_error"]
        assert "has 3 heads, which the Ulysses degree 2 (SP degree 2 = ulysses 2 x ring 1)" in message
        assert message.endswith("--ulysses 1 --ring 2")


@pytest.mark.distributed
def test_generate_runs_the_ring_flag(layouts, tmp_path):
    single = _generate("--output", str(tmp_path / "single.png"))
    for rank, result in enumerate(layouts["ring2"]):
        assert "sp 2 (ulysses 1 x ring 2)" in result["cli"]["summary"]
        assert result["cli"]["wrote"] == (rank == 0)
        assert _max_diff(result["cli"]["frames"], single["frames"]) <= TOL


@pytest.mark.distributed
def test_ranks_that_disagree_on_the_ring_fail_together(layouts):
    messages = [r["layout_mismatch"] for r in layouts["ring2"]]
    assert messages[0] == messages[1]
    assert "ring_degree differs (rank 0: 2; rank 1: 1)" in messages[0]
    assert messages[0].endswith(
        "same cfg_degree, sp_degree and ring_degree (--cfg-parallel, --ulysses, --ring) under one torchrun"
    )
