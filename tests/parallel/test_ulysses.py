"""Ulysses SP=2 on real diffusers blocks of every family equals the single-process result.

Each rank builds the same tiny transformer (same seed), runs its block stack once with the stock
processors on the full sequence (the reference), then installs the Ulysses processors, shards the
tokens (7 image tokens: padding on the last rank), runs the same blocks on its shard and gathers.
"""

from __future__ import annotations

import pytest
import torch

from ditcache.errors import CacheConfigError
from ditcache.families import adapter_for
from ditcache.parallel import Group, apply_ulysses, gather_tokens, init_parallel, remove_ulysses, shard_tokens
from ditcache.parallel.testing import run_ranks, values_or_raise

TOL = 1e-5
B, TXT = 2, 5
TXT_VALID = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])  # sample 1 has a padded text suffix


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _wan(sp: Group, frames: int) -> dict:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
    ).eval()
    rope = model.rope(torch.zeros(B, 4, frames, 2, 2))  # one token per frame
    x = torch.randn(B, frames, 32)
    text = torch.randn(B, TXT, 32)
    temb = torch.randn(B, 6, 32) * 0.1

    def blocks(h, rotary):
        for block in model.blocks:
            h = block(h, text, temb, rotary)
        return h

    ref = blocks(x, rope)
    ctx = apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    out = ctx.gather(blocks(ctx.shard(x), tuple(ctx.shard_like(r, dim=1) for r in rope)))
    stock_cross = all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    return {"img": _max_diff(out, ref), "restored": remove_ulysses(model), "cross_attn_untouched": stock_cross}


def _hunyuan(sp: Group, with_mask: bool) -> dict:
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=4, attention_head_dim=8, num_layers=2,
        num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4),
    ).eval()
    n_img = 7
    rope = model.rope(torch.zeros(B, 4, n_img, 1, 1))
    x, text, temb = torch.randn(B, n_img, 32), torch.randn(B, TXT, 32), torch.randn(B, 32)
    # what the unsharded model passes: a key mask over [all image tokens, text tokens]
    mask = None
    if with_mask:
        mask = torch.cat([torch.ones(B, n_img, dtype=torch.bool), TXT_VALID], dim=1)[:, None, None, :]

    def blocks(h, rotary):
        t = text
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            h, t = block(h, t, temb, mask, rotary)
        return h, t

    ref_img, ref_txt = blocks(x, rope)
    ctx = apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    img, txt = blocks(ctx.shard(x), tuple(ctx.shard_like(r, dim=0) for r in rope))
    img = ctx.gather(img)
    valid_txt = TXT_VALID if with_mask else torch.ones_like(TXT_VALID)  # masked text rows are garbage in both
    return {
        "img": _max_diff(img, ref_img),
        "txt": _max_diff(txt[valid_txt], ref_txt[valid_txt]),
        "restored": remove_ulysses(model),
        "refiner_untouched": type(model.context_embedder.token_refiner.refiner_blocks[0].attn.processor).__name__,
    }


def _qwen(sp: Group) -> dict:
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()
    n_img = 7
    img_freqs, txt_freqs = model.pos_embed([(1, n_img, 1)], max_txt_seq_len=TXT, device="cpu")
    x, text, temb = torch.randn(B, n_img, 32), torch.randn(B, TXT, 32), torch.randn(B, 32)

    def blocks(h, freqs):
        t = text
        for block in model.transformer_blocks:
            t, h = block(h, t, TXT_VALID, temb, freqs)
        return h, t

    ref_img, ref_txt = blocks(x, (img_freqs, txt_freqs))
    ctx = apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    img, txt = blocks(ctx.shard(x), (ctx.shard_like(img_freqs, dim=0), txt_freqs))
    return {
        "img": _max_diff(ctx.gather(img), ref_img),
        "txt": _max_diff(txt[TXT_VALID], ref_txt[TXT_VALID]),
        "restored": remove_ulysses(model),
    }


def _errors(sp: Group) -> dict:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
    )
    found = {}
    try:
        apply_ulysses(model, sp, adapter_for(model).ulysses_processors)
    except CacheConfigError as exc:
        found["heads"] = str(exc)
    try:
        apply_ulysses(torch.nn.Linear(2, 2), sp, adapter_for(model).ulysses_processors)
    except CacheConfigError as exc:
        found["unsupported"] = str(exc)
    return found


def _shard_roundtrip(sp: Group) -> dict:
    x = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)
    local, pad = shard_tokens(x, 1, sp)
    rope = torch.arange(7 * 4, dtype=torch.float32).reshape(7, 4)
    rope_local, rope_pad = shard_tokens(rope, 0, sp)
    return {
        "pad": pad,
        "local_len": local.shape[1],
        "roundtrip": torch.equal(gather_tokens(local, 1, sp, pad), x),
        "rope_roundtrip": torch.equal(gather_tokens(rope_local, 0, sp, rope_pad), rope),
    }


def _run_all(rank: int, world: int) -> dict:
    groups = init_parallel(1, world, timeout_s=90)
    with torch.no_grad():
        return {
            "shard": _shard_roundtrip(groups.sp),
            "wan_7": _wan(groups.sp, frames=7),
            "wan_8": _wan(groups.sp, frames=8),
            "hunyuan_masked": _hunyuan(groups.sp, with_mask=True),
            "hunyuan_nomask": _hunyuan(groups.sp, with_mask=False),
            "qwen": _qwen(groups.sp),
            "errors": _errors(groups.sp),
        }


@pytest.fixture(scope="module")
def sp2() -> list[dict]:
    return values_or_raise(run_ranks(_run_all, 2, timeout_s=240))


@pytest.mark.distributed
def test_shard_and_gather_roundtrip_with_padding(sp2):
    assert [r["shard"]["pad"] for r in sp2] == [1, 1]
    assert [r["shard"]["local_len"] for r in sp2] == [4, 4]
    assert all(r["shard"]["roundtrip"] and r["shard"]["rope_roundtrip"] for r in sp2)


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["wan_7", "wan_8"])
def test_wan_blocks_match_single_process(sp2, case):
    for rank, r in enumerate(sp2):
        assert r[case]["img"] <= TOL, (rank, r[case])
        assert r[case]["restored"] == 2  # one self-attention per block
        assert r[case]["cross_attn_untouched"]


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["hunyuan_masked", "hunyuan_nomask"])
def test_hunyuan_dual_and_single_stream_blocks_match_single_process(sp2, case):
    for rank, r in enumerate(sp2):
        assert r[case]["img"] <= TOL, (rank, r[case])
        assert r[case]["txt"] <= TOL, (rank, r[case])  # every rank holds the full text stream
        assert r[case]["restored"] == 4  # 2 dual-stream + 2 single-stream blocks
        assert r[case]["refiner_untouched"] == "AttnProcessor2_0"


@pytest.mark.distributed
def test_qwen_joint_attention_blocks_match_single_process(sp2):
    for rank, r in enumerate(sp2):
        assert r["qwen"]["img"] <= TOL, (rank, r["qwen"])
        assert r["qwen"]["txt"] <= TOL, (rank, r["qwen"])
        assert r["qwen"]["restored"] == 2


@pytest.mark.distributed
def test_clear_errors(sp2):
    for r in sp2:
        assert "has 3 heads" in r["errors"]["heads"] and "SP degree 2" in r["errors"]["heads"]
        assert "no attention module with a supported processor" in r["errors"]["unsupported"]


def test_world_one_installs_nothing_and_shards_are_identities():
    from diffusers import WanTransformer3DModel

    from ditcache.parallel import ParallelGroups

    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1,
    )
    ctx = apply_ulysses(model, ParallelGroups.single().sp, adapter_for(model).ulysses_processors)
    x = torch.randn(1, 7, 24)
    assert ctx.shard(x) is x and ctx.pad == 0 and ctx.gather(x) is x
    assert remove_ulysses(model) == 0
