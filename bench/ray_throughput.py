"""Ray throughput: 1 vs 2 replicas, cache off vs on, 16 requests each, through ``ray-generate``.

Every configuration is one ``ditcache ray-generate`` job (the library call, ``ray_generate.run``)
on one local Ray cluster started once: replicas of one rank each (one CPU per rank), the bundled
reference model at its default steps, one prompt per request. Per job it reports requests/minute
over the whole job (placing and loading included) and over the steady state (from the first
request's end to the last's), the first request's latency from the job's start (it includes
starting the rank processes and loading the model) against the median of the later requests' own
times, and the models loaded per rank.

What 2 shared cores can show: whether a second replica doubles steady-state throughput when each
rank has a core of its own (it also shares them with Ray's own processes and this driver), and how
much of a short job is start-up. What they cannot: more replicas than cores, GPUs, several nodes, or
the model sizes where one request takes minutes and loading tens of seconds.

    python bench/ray_throughput.py [--requests 16] [--steps N] [--out bench/results/ray_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import ray
import torch

from ditcache.launch import ray_generate
from ditcache.runtime.io import atomic_target

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [(replicas, cache) for replicas in (1, 2) for cache in ("none", "ada_taylor")]


def run_job(replicas: int, cache: str, prompts: list[str], steps: int | None, out: Path) -> dict:
    """One ray-generate job; its timings from the job's own record."""
    argv = ["--model", "reference", "--cache", cache, "--ranks", str(replicas), "--cpus-per-rank", "1",
            "--output-dir", str(out), "--overwrite", "--no-progress", "--load-timeout", "300",
            *(["--steps", str(steps)] if steps else []), *(a for p in prompts for a in ("--prompt", p))]
    job = ray_generate.run(ray_generate.build_parser().parse_args(argv))
    results = sorted(job.results, key=lambda r: r.job_elapsed_s)
    first, later = results[0], results[1:]
    steady_s = results[-1].job_elapsed_s - first.job_elapsed_s
    return {
        "replicas": replicas,
        "cache": cache,
        "requests": len(results),
        "job_wall_s": round(job.wall_time_s, 2),
        "requests_per_min_job": round(60 * len(results) / job.wall_time_s, 1),
        "requests_per_min_steady": round(60 * len(later) / steady_s, 1) if steady_s > 0 else None,
        "first_request_latency_s": round(first.job_elapsed_s, 2),
        "later_request_median_s": round(statistics.median(r.wall_time_s for r in later), 3),
        "later_request_max_s": round(max(r.wall_time_s for r in later), 3),
        "block_passes": first.output.total_stack_passes(),
        "model_loads_per_rank": job.record.model_loads(),
        "summary": first.output.summary(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, help="default: the reference model's")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ray_throughput.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    prompts = [f"a handwritten {i % 10}" for i in range(args.requests)]
    temp = tempfile.mkdtemp(prefix="rb_", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as out:
            for replicas, cache in CONFIGS:
                rows.append(run_job(replicas, cache, prompts, args.steps, Path(out) / f"{replicas}-{cache}"))
                print(f"{replicas} replica(s), cache {cache}: {rows[-1]['job_wall_s']} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    print(f"\nreference model, {args.requests} requests of one prompt, 1 rank per replica, 1 CPU per rank")
    print(f"{'replicas':>8} {'cache':<10} {'req/min job':>11} {'req/min steady':>14} {'first s':>8} "
          f"{'later median s':>14} {'passes':>7} {'loads/rank':>10}")  # fmt: skip
    for r in rows:
        passes = sum(r["block_passes"].values())
        loads = ",".join(str(n) for n in r["model_loads_per_rank"].values())
        print(f"{r['replicas']:>8} {r['cache']:<10} {r['requests_per_min_job']:>11} "
              f"{r['requests_per_min_steady']:>14} {r['first_request_latency_s']:>8} "
              f"{r['later_request_median_s']:>14} {passes:>7} {loads:>10}")  # fmt: skip
    report = json.dumps({
        "rows": rows,
        "env": {"torch": torch.__version__, "ray": ray.__version__, "cpu_count": os.cpu_count(),
                "platform": platform.platform(), "load_average": list(os.getloadavg()),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "steps": args.steps or "model default"},
    }, indent=1) + "\n"  # fmt: skip
    with atomic_target(args.out) as tmp:
        tmp.write_text(report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
