"""``torch.compile`` of the block stack (``ditcache.compile_pipeline``, ``--compile``) on CPU with inductor.

The slow tests compile a tiny Wan transformer once (regional: one graph for every block) and run a
cached request compiled and eagerly: same latents, same skip plan, no recompilation after the first
step. The fast ones check the wiring: which modules compile, undoing it, and the one-line refusal of
``--compile`` with sequence parallelism before anything loads.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters

import ditcache
from conftest import TinyPromptEncoder, tiny_hunyuan, tiny_qwen, tiny_wan
from ditcache.cache.ada_taylor import AdaTaylorCache
from ditcache.cache.first_block import FirstBlockCacheConfig
from ditcache.errors import CacheConfigError, ParamsError
from ditcache.families.registry import adapter_for
from ditcache.families.wan.pipeline import WanPipeline
from ditcache.launch import generate
from ditcache.parallel import ParallelConfig
from ditcache.runtime.compile import check_compile_layout, compile_pipeline, uncompile_pipeline
from ditcache.runtime.loading import ModelSettings

STEPS = 8
SETTINGS = ModelSettings(
    latent_space="pixel",
    height=8,
    width=8,
    num_frames=3,
    default_steps=STEPS,
    default_shift=1.0,
    default_guidance_scale=4.0,
    model_type=None,
    boundary_ratio=None,
)


def ada_taylor() -> AdaTaylorCache:
    """Order 1; ratios close to 1 let the magnitude schedule skip (cond and uncond plans differ)."""
    return AdaTaylorCache(
        num_inference_steps=STEPS,
        n_derivatives=1,
        cond_mag_ratios=[1.0] + [0.98] * (STEPS - 1),
        uncond_mag_ratios=[1.0] + [0.96] * (STEPS - 1),
        K=3,
        thresh=0.15,
        retention_ratio=0.2,
    )


def make_pipe() -> WanPipeline:
    return WanPipeline({"transformer": tiny_wan()}, TinyPromptEncoder(), SETTINGS)


def request(pipe: WanPipeline, cache):
    return pipe("a cat", cache=cache, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def runs():
    """Eager then compiled runs of one pipeline: AdaTaylor (skips steps) and FirstBlockCache (probes
    the first block). The dynamo counters are snapshotted after every adapter call."""
    pipe = make_pipe()
    eager = {"ada": request(pipe, ada_taylor()), "fbc": request(pipe, FirstBlockCacheConfig(threshold=0.5))}
    torch._dynamo.reset()
    counters.clear()
    snapshots: list[dict[str, int]] = []
    adapter = pipe.adapters["transformer"]
    hook = adapter.register_forward_hook(
        lambda *_: snapshots.append({k: sum(v.values()) for k, v in counters.items()} | dict(counters["stats"]))
    )
    compile_pipeline(pipe)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = {"ada": request(pipe, ada_taylor())}
            ada_snapshots = list(snapshots)
            compiled["fbc"] = request(pipe, FirstBlockCacheConfig(threshold=0.5))
    finally:
        hook.remove()
        uncompile_pipeline(pipe)
    return SimpleNamespace(eager=eager, compiled=compiled, ada_snapshots=ada_snapshots, snapshots=snapshots)


@pytest.mark.slow
def test_compiled_cached_run_equals_eager(runs):
    for name in ("ada", "fbc"):
        diff = (runs.compiled[name].frames - runs.eager[name].frames).abs().max().item()
        assert diff < 1e-4, (name, diff)


@pytest.mark.slow
def test_compiled_cache_still_skips(runs):
    for name in ("ada", "fbc"):
        eager, compiled = runs.eager[name], runs.compiled[name]
        assert compiled.stack_passes == eager.stack_passes
        assert compiled.telemetry()["branches"] == eager.telemetry()["branches"]
    passes = runs.compiled["ada"].total_stack_passes()
    assert sum(passes.values()) < 2 * STEPS, passes  # AdaTaylor skipped steps, compiled too


@pytest.mark.slow
def test_no_recompilation_after_the_first_step(runs):
    snapshots = runs.ada_snapshots
    assert len(snapshots) == 2 * STEPS  # one per branch per step
    first = snapshots[0]
    assert first["unique_graphs"] == 1  # both blocks share one graph
    assert all(s == first for s in snapshots[1:]), [s for s in snapshots if s != first][:1]
    # the probe cache (another request, same shapes) reuses the graph too
    assert runs.snapshots[-1]["unique_graphs"] == 1
    assert counters["recompiles"] == {} or sum(counters["recompiles"].values()) == 0


def test_compile_stack_compiles_every_block_and_undoes_it():
    adapter = adapter_for(tiny_wan())
    blocks = list(adapter.transformer.blocks)
    assert adapter.stack_modules() == blocks
    assert not adapter.is_compiled
    adapter.compile_stack(mode="default")
    assert adapter.is_compiled and adapter.compile_kwargs == {"fullgraph": True, "mode": "default"}
    assert all(b._compiled_call_impl is not None for b in blocks)
    adapter.uncompile_stack()
    assert not adapter.is_compiled and all(b._compiled_call_impl is None for b in blocks)


def test_stack_modules_cover_every_family():
    hunyuan = tiny_hunyuan()
    qwen = tiny_qwen()
    assert len(adapter_for(hunyuan).stack_modules()) == len(hunyuan.transformer_blocks) + len(
        hunyuan.single_transformer_blocks
    )
    assert adapter_for(qwen).stack_modules() == list(qwen.transformer_blocks)


def test_compile_pipeline_is_exported_and_refuses_sequence_parallel():
    assert ditcache.compile_pipeline is compile_pipeline
    adapter = adapter_for(tiny_wan())
    sp_pipe = SimpleNamespace(adapters={"transformer": adapter}, parallel=SimpleNamespace(
        config=ParallelConfig(cfg_degree=1, sp_degree=4, world_size=4, ring_degree=2)
    ))
    with pytest.raises(ParamsError, match="--compile does not support sequence parallelism"):
        compile_pipeline(sp_pipe)
    assert not adapter.is_compiled
    with pytest.raises(ParamsError):
        compile_pipeline(object())
    check_compile_layout(True, 1, 1)  # cfg-parallel / data-parallel layouts are fine
    check_compile_layout(False, 4, 2)


def test_compiled_adapter_refuses_a_multi_rank_sp_context():
    adapter = adapter_for(tiny_wan())
    adapter.compile_stack()
    sp = SimpleNamespace(group=SimpleNamespace(size=2))
    with pytest.raises(CacheConfigError, match="sequence-parallel"):
        adapter(torch.randn(1, 4, 1, 4, 4), torch.tensor([500.0]), torch.randn(1, 3, 8), sp=sp)


@pytest.mark.parametrize("flags", [["--ulysses", "2"], ["--ring", "2"]])
def test_generate_compile_with_sequence_parallel_is_a_one_line_error(flags, monkeypatch, capsys):
    def no_load(*args, **kwargs):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(generate, "load_pipeline", no_load)
    assert generate.main(["--compile", "--no-progress", "--cache", "none", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--compile does not support sequence parallelism" in err


def test_generate_parser_has_compile_flag():
    assert generate.build_parser().parse_args(["--compile"]).compile is True
    assert generate.build_parser().parse_args([]).compile is False


@pytest.mark.slow
def test_generate_compile_runs_the_reference_model(tmp_path, capsys):
    """``ditcache generate --compile`` end to end (one process): compiled blocks, cache on, output written."""
    out = tmp_path / "digit.png"
    argv = ["--compile", "--no-progress", "--steps", "6", "--prompt", "a handwritten 3", "--output", str(out)]
    assert generate.main(argv) == 0
    assert out.is_file() and "block passes" in capsys.readouterr().out
