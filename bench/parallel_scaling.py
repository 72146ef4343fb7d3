"""Per-request wall time: one rank vs CFG-parallel vs Ulysses SP, with and without the cache.

Runs the bundled reference model (50 steps, shift 5, CFG 4, one prompt per digit) on gloo CPU ranks
spawned like torchrun, times ``--reps`` requests per cache setting (interleaved, minimum quoted)
inside each layout, and prints a table of wall times and ratios against one uncached rank. The
reference model has 3 attention heads, so its SP layout is ``sp 3``. On this 2-core machine each
rank gets one core (3 SP ranks share 2 cores): the ratios say what the layouts cost and save on a
machine this small, not what they do on GPUs.

    python bench/parallel_scaling.py [--reps 3] [--out bench/results/parallel_scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PROMPTS = [f"a handwritten {k}" for k in range(10)]
LAYOUTS = {"1 rank": (1, 1), "cfg 2": (2, 1), "sp 3": (1, 3)}  # name -> (cfg_degree, sp_degree)
CACHES = ("none", "ada_taylor")


def time_layout(rank: int, world: int, cfg: int, sp: int, reps: int) -> dict:
    """One rank's share of the layout: the minimum request wall time per cache setting."""
    import ditcache
    from ditcache.models import REFERENCE_DIGITS

    torch.set_num_threads(1)
    groups = ditcache.init_parallel(cfg, sp, timeout_s=300)
    try:
        pipe = ditcache.load_pipeline(REFERENCE_DIGITS, parallel=groups)
        request = dict(prompt=PROMPTS, seed=0, progress=False)
        pipe(**request, num_inference_steps=4)  # warm-up: allocator, first all-to-alls
        best = {c: float("inf") for c in CACHES}
        passes = {}
        for _ in range(reps):
            for cache in CACHES:  # interleaved, so drift in machine load hits both alike
                out = pipe(**request, cache=cache)
                best[cache] = min(best[cache], out.wall_time_s)
                passes[cache] = sum(out.total_stack_passes().values())
        return {"wall_s": best, "block_passes": passes, "layout_detail": out.layout}
    finally:
        ditcache.destroy_parallel(groups)


def main(argv=None) -> int:
    from ditcache.parallel.testing import run_ranks, values_or_raise

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "parallel_scaling.json")
    args = parser.parse_args(argv)
    rows = []
    for name, (cfg, sp) in LAYOUTS.items():
        world = cfg * sp
        started = time.perf_counter()
        values = values_or_raise(run_ranks(time_layout, world, cfg, sp, args.reps, timeout_s=900))
        # every rank of a request finishes together (the last collective); rank 0 speaks for it
        rows.append({"layout": name, "ranks": world, **values[0],
                     "bench_seconds": round(time.perf_counter() - started, 1)})  # fmt: skip
        print(f"{name}: done in {rows[-1]['bench_seconds']} s", flush=True)
    base = rows[0]["wall_s"]["none"]
    print(f"\nreference model, 50 steps, 10 prompts; min of {args.reps} interleaved requests; "
          f"ratios vs 1 rank uncached ({base:.2f} s)")  # fmt: skip
    print(f"{'layout':<8} {'ranks':>5} {'uncached s':>10} {'cached s':>9} {'passes':>9} "
          f"{'x uncached':>10} {'x cached':>9} {'cache gain':>10}")  # fmt: skip
    for r in rows:
        none, cached = r["wall_s"]["none"], r["wall_s"]["ada_taylor"]
        r["speedup_uncached_vs_1rank"] = base / none
        r["speedup_cached_vs_1rank"] = base / cached
        r["cache_speedup_in_layout"] = none / cached
        print(f"{r['layout']:<8} {r['ranks']:>5} {none:>10.3f} {cached:>9.3f} "
              f"{r['block_passes']['ada_taylor']:>4}/{r['block_passes']['none']:<4} "
              f"{r['speedup_uncached_vs_1rank']:>10.2f} {r['speedup_cached_vs_1rank']:>9.2f} "
              f"{r['cache_speedup_in_layout']:>10.2f}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "rows": rows,
        "env": {"torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
                "threads_per_rank": 1, "load_average": list(os.getloadavg()), "reps": args.reps,
                "gpu": "none in this session: the Wan2.1-1.3B-sized GPU table was not run"},
    }, indent=1) + "\n")  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
