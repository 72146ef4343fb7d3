"""Wan2.1-T2V-1.3B on one GPU: uncached vs AdaTaylorCache (order 1) vs order 1 + torch.compile.

The transformer has the published Wan2.1-T2V-1.3B config (30 layers, 12 heads x 128, dim 1536, ffn
8960, 16 -> 16 channels, patch (1, 2, 2), text_dim 4096, freq_dim 256) with random bf16 weights
built on the device (nothing is downloaded). It runs through ditcache's real WanPipeline and
denoising loop: 480p (832x480) x 33 frames, i.e. latents 16 x 9 x 60 x 104 (14,040 tokens), 30
steps, CFG (two branches, batch 1), with fixed random prompt embeddings ([1, 512, 4096]) standing
in for UMT5 (the latents are the pipeline's input grid: no VAE, ``output_type="latent"``).
AdaTaylorCache uses the shipped params of ``Wan2.1-T2V-1.3B`` (its skip plan depends on the params
and the schedule only, so random weights skip the same steps real ones would).

Rows: uncached (eager), AdaTaylor order 1 (eager), then after ``ditcache.compile_pipeline`` and a
2-step warm-up that pays the compile: AdaTaylor order 1 + compile and uncached + compile. Each row
reports wall time, measured speedup over uncached eager, the block-pass ratio (passes uncached /
passes run: the speedup if only the stack cost time), peak GPU memory and the cache's memory, and
the max abs difference of the final latents from the matching eager run. Writes
``bench/results/gpu_wan.json`` (atomically). Sized for one run of well under 8 minutes on an
H100/H200.

    python -m bench.gpu_wan                 # needs a CUDA GPU
    python -m bench.gpu_wan --smoke         # CPU, tiny config, same code path -> gpu_wan_smoke.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import WanTransformer3DModel

from bench.wan_config import WAN21_T2V_1_3B
from ditcache.cache import AdaTaylorConfig
from ditcache.families.wan.pipeline import WanPipeline
from ditcache.runtime.compile import compile_pipeline, uncompile_pipeline
from ditcache.runtime.io import atomic_target
from ditcache.runtime.loading import ModelSettings

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_TYPE = "Wan2.1-T2V-1.3B"

SMOKE_CONFIG = dict(
    WAN21_T2V_1_3B,
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
    rope_max_seq_len=32,
)


@dataclass
class Workload:
    """What one bench run generates; the latent grid is the pipeline's input grid (pixel space)."""

    config: dict[str, Any]
    frames: int  # latent frames
    height: int  # latent height
    width: int  # latent width
    text_tokens: int
    steps: int = 30
    guidance_scale: float = 5.0
    shift: float = 3.0  # Wan2.1 480p
    device: str = "cuda"
    dtype: str = "bfloat16"


GPU = Workload(WAN21_T2V_1_3B, frames=9, height=60, width=104, text_tokens=512)  # 832x480, 33 frames
SMOKE = Workload(SMOKE_CONFIG, frames=3, height=8, width=8, text_tokens=8, device="cpu", dtype="float32")


class FixedEmbeddings:
    """The pipeline's text encoder, replaced by fixed random embeddings: one ``[1, T, D]`` per
    distinct prompt string (so the negative prompt gets its own), made on first use from a seed."""

    def __init__(self, tokens: int, dim: int) -> None:
        self.tokens, self.dim = tokens, dim
        self.table: dict[str, torch.Tensor] = {}

    def encode(self, prompts: list[str]) -> torch.Tensor:
        for prompt in prompts:
            if prompt not in self.table:
                generator = torch.Generator().manual_seed(len(self.table))
                self.table[prompt] = torch.randn(1, self.tokens, self.dim, generator=generator)
        return torch.cat([self.table[p] for p in prompts])


def cast_like_from_pretrained(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast as ``from_pretrained(torch_dtype=dtype)`` does: the model's ``_keep_in_fp32_modules``
    (Wan: time embedder, scale-shift tables, norms) stay float32, the rest becomes ``dtype``."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keep & set(name.split(".")) else dtype)


def build_pipeline(work: Workload) -> WanPipeline:
    """Random weights created directly on the device, then cast; a single-process WanPipeline."""
    torch.manual_seed(0)
    with torch.device(work.device):
        model = WanTransformer3DModel(**work.config)
    cast_like_from_pretrained(model.eval().requires_grad_(False), getattr(torch, work.dtype))
    settings = ModelSettings(
        latent_space="pixel",
        height=work.height,
        width=work.width,
        num_frames=work.frames,
        default_steps=work.steps,
        default_shift=work.shift,
        default_guidance_scale=work.guidance_scale,
        model_type=MODEL_TYPE,
        boundary_ratio=None,
    )
    return WanPipeline({"transformer": model}, FixedEmbeddings(work.text_tokens, work.config["text_dim"]), settings)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_request(pipe: WanPipeline, work: Workload, cache: Any, steps: int | None = None) -> dict[str, Any]:
    """One request; wall time (device synchronised), peak device memory, the pipeline's telemetry."""
    cuda = work.device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    synchronize(work.device)
    start = time.perf_counter()
    out = pipe("a bench prompt", cache=cache, num_inference_steps=steps, output_type="latent", progress=False)
    synchronize(work.device)
    wall = time.perf_counter() - start
    telemetry = out.telemetry()
    return {
        "latents": out.frames.float(),
        "wall_s": wall,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cache_memory_bytes": telemetry["cache_memory_bytes"],
        "block_passes": sum(out.total_stack_passes().values()),
        "asked_passes": sum(out.branch_steps.values()),
        "pass_ratio_speedup": telemetry["block_pass_speedup"],
        "summary": out.summary(),
    }


def run(work: Workload) -> dict[str, Any]:
    started = time.perf_counter()
    pipe = build_pipeline(work)
    build_s = time.perf_counter() - started
    ada = AdaTaylorConfig(model_type=MODEL_TYPE, n_derivatives=1)

    timed_request(pipe, work, None, steps=2)  # eager warm-up: kernels, allocator
    results = {"uncached": timed_request(pipe, work, None), "ada_taylor_o1": timed_request(pipe, work, ada)}

    compile_pipeline(pipe)
    warm = time.perf_counter()
    timed_request(pipe, work, None, steps=2)  # pays the compile (one graph for every block)
    compile_warmup_s = time.perf_counter() - warm
    results["ada_taylor_o1_compile"] = timed_request(pipe, work, ada)
    results["uncached_compile"] = timed_request(pipe, work, None)
    uncompile_pipeline(pipe)

    eager_of = {"ada_taylor_o1_compile": "ada_taylor_o1", "uncached_compile": "uncached"}
    base = results["uncached"]["wall_s"]
    rows = []
    for name, r in results.items():
        reference = results[eager_of.get(name, "uncached")]["latents"]
        rows.append({
            "method": name,
            "wall_s": r["wall_s"],
            "measured_speedup": base / r["wall_s"],
            "pass_ratio_speedup": r["pass_ratio_speedup"],
            "block_passes": f"{r['block_passes']}/{r['asked_passes']}",
            "peak_memory_bytes": r["peak_memory_bytes"],
            "cache_memory_bytes": r["cache_memory_bytes"],
            "max_abs_diff_vs_eager": (r["latents"] - reference).abs().max().item() if name in eager_of else None,
            "summary": r["summary"],
        })
    device_name = torch.cuda.get_device_name() if work.device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "workload": {**asdict(work), "latent_shape": [work.config["out_channels"], work.frames, work.height, work.width],
                     "tokens": work.frames * work.height * work.width // 4, "batch": 1, "cfg": True},
        "model_type": MODEL_TYPE,
        "device": device_name,
        "torch": torch.__version__,
        "build_s": build_s,
        "compile_warmup_s": compile_warmup_s,
        "total_s": time.perf_counter() - started,
        "rows": rows,
    }


def print_table(report: dict[str, Any]) -> None:
    def mib(value: int | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value / 2**20:.{digits}f}"

    work = report["workload"]
    print(f"{report['device']} | torch {report['torch']} | latents {work['latent_shape']} ({work['tokens']} tokens), "
          f"{work['steps']} steps, CFG, {work['dtype']} | build {report['build_s']:.1f} s, "
          f"compile warm-up {report['compile_warmup_s']:.1f} s, total {report['total_s']:.1f} s")
    print(f"{'method':<22} {'wall s':>8} {'speedup':>8} {'pass-ratio':>10} {'passes':>7} "
          f"{'peak MiB':>9} {'cache MiB':>9} {'max|diff|':>9}")
    for r in report["rows"]:
        diff = "-" if r["max_abs_diff_vs_eager"] is None else f"{r['max_abs_diff_vs_eager']:.1e}"
        print(f"{r['method']:<22} {r['wall_s']:>8.2f} {r['measured_speedup']:>7.2f}x {r['pass_ratio_speedup']:>9.2f}x "
              f"{r['block_passes']:>7} {mib(r['peak_memory_bytes']):>9} {mib(r['cache_memory_bytes'], 2):>9} {diff:>9}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny config (2 layers, 3x8x8 latents), same path")
    parser.add_argument("--steps", type=int, help="denoising steps (default 30)")
    parser.add_argument("--out", type=Path, help="default bench/results/gpu_wan.json (gpu_wan_smoke.json with --smoke)")
    args = parser.parse_args(argv)
    work = SMOKE if args.smoke else GPU
    if args.steps is not None:
        work.steps = args.steps
    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run on a GPU, or use --smoke for the CPU check", file=sys.stderr)
        return 2
    out = args.out or RESULTS / ("gpu_wan_smoke.json" if args.smoke else "gpu_wan.json")
    with torch.inference_mode():
        report = run(work)
    report["mode"] = "smoke" if args.smoke else "gpu"
    print_table(report)
    with atomic_target(out) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
