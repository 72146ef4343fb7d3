"""Cost of AdaTaylorCache's bookkeeping next to one block-stack pass of Wan2.1-1.3B's size.

Times should_compute + update + approximate per step for n_derivatives 0, 1, 2 on a
[1, 4096, 1536] fp32 residual, and one diffusers WanTransformerBlock (dim 1536, 12 heads, random
weights) at the same token count, multiplied by 30 blocks. Prints a table and writes JSON.

    python bench/cache_overhead.py [--tokens 4096] [--repeats 5] [--out bench/results/cache_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from ditcache.cache import AdaTaylorCache

DIM, HEADS, FFN, BLOCKS, TEXT_TOKENS = 1536, 12, 8960, 30, 512


def time_min(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def block_stack_seconds(tokens: int, repeats: int) -> float:
    block = WanTransformerBlock(DIM, FFN, HEADS, qk_norm="rms_norm_across_heads", cross_attn_norm=True).eval()
    x = torch.randn(1, tokens, DIM)
    ctx = torch.randn(1, TEXT_TOKENS, DIM)
    temb = torch.randn(1, 6, DIM)
    head_dim = DIM // HEADS
    freqs = torch.randn(1, tokens, 1, head_dim)
    with torch.inference_mode():
        per_block = time_min(lambda: block(x, ctx, temb, (freqs, freqs)), repeats)
    return per_block * BLOCKS


def cache_step_seconds(order: int, tokens: int, repeats: int) -> tuple[float, int]:
    """Seconds of one skipped step's bookkeeping (decide + approximate) amortised with a computed one."""
    steps = 50
    flat = [1.0] * steps
    cache = AdaTaylorCache(
        cond_mag_ratios=flat, uncond_mag_ratios=flat, K=1, thresh=1.0, retention_ratio=0.0,
        num_inference_steps=steps, n_derivatives=order, taylor_threshold=2,
    )
    x = torch.randn(1, tokens, DIM)
    out = x + 0.1

    def one_pair():
        # K=1 alternates compute/skip, so a pair is one update and one approximate
        cache.reset()
        for _ in range(steps):
            if cache.should_compute(True):
                cache.update(out, x, True)
            else:
                cache.approximate(x, True)

    with torch.inference_mode():
        seconds = time_min(one_pair, repeats) / steps
    return seconds, cache.memory_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    stack = block_stack_seconds(args.tokens, max(1, args.repeats // 2))
    rows = []
    for order in (0, 1, 2):
        per_step, mem = cache_step_seconds(order, args.tokens, args.repeats)
        rows.append({
            "n_derivatives": order,
            "cache_seconds_per_step": per_step,
            "fraction_of_stack_pass": per_step / stack,
            "cache_tensors_per_branch": order + 1,
            "cache_bytes_per_branch": mem,
        })
    print(f"block stack pass ({BLOCKS} x WanTransformerBlock, dim {DIM}, [1, {args.tokens}, {DIM}] fp32, "
          f"{args.threads} threads): {stack * 1e3:.1f} ms")
    print(f"{'order':>5} {'cache ms/step':>13} {'overhead':>9} {'tensors':>7} {'MiB/branch':>10}")
    for r in rows:
        print(f"{r['n_derivatives']:>5} {r['cache_seconds_per_step'] * 1e3:>13.3f} "
              f"{r['fraction_of_stack_pass'] * 100:>8.3f}% {r['cache_tensors_per_branch']:>7} "
              f"{r['cache_bytes_per_branch'] / 2**20:>10.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "block_stack_seconds": stack,
        "tokens": args.tokens,
        "rows": rows,
        "env": {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                "processor": platform.processor()},
    }, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
