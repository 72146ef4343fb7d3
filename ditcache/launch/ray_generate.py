"""``ditcache ray-generate``: a batch of requests on Ray, one actor per rank, one output file per prompt.

    ditcache ray-generate --ranks 2 --prompts-file prompts.txt --output-dir out/
    ditcache ray-generate --address auto --ranks 8 --cfg-parallel 2 --sp 2 --model wan \
        --model-dir /models/Wan2.1-T2V-1.3B-Diffusers --model-type Wan2.1-T2V-1.3B --prompts-file p.txt
    ray job submit --working-dir . -- ditcache ray-generate --ranks 2 --output-dir /shared/out

Takes every argument of ``ditcache generate``. The ranks (``--ranks`` = dp x cfg x sp) form
``--ranks / (cfg x sp)`` replicas; each request (one prompt, seed ``--seed``, so it matches
``ditcache generate --prompt ...``) goes to every rank of one replica, which runs generate's ``run``
exactly as under ``torchrun``. Without ``--address`` a local Ray cluster is started, unless the
command runs as a Ray job (``RAY_ADDRESS`` is set), which joins the job's cluster. Rank 0 of each
replica writes ``<output-dir>/NNN-<prompt>.png|mp4`` on its node; the driver prints one summary per
request and writes ``<output-dir>/results.json``. ``--timeout`` bounds each collective (as in
generate), ``--request-timeout`` each request as seen by the driver: a rank that raises, dies or
overruns fails the job with its rank and message (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from ditcache.errors import DitCacheError, ParamsError
from ditcache.launch import generate
from ditcache.launch.cache_options import cache_from_args
from ditcache.launch.models import IMAGE_MODELS, resolve_model
from ditcache.launch.ray_cluster import DEFAULT_ENTRY, RayJobError, RayRanks, Request, RequestResult, connect
from ditcache.parallel.config import ParallelConfig


@dataclass
class JobResult:
    """Every request's result (in prompt order), the results.json written, the job's wall time."""

    results: list[RequestResult]
    results_file: Path
    wall_time_s: float


def build_parser(prog: str = "ditcache ray-generate") -> argparse.ArgumentParser:
    parser = generate.build_parser(prog)
    parser.description = __doc__
    # Resolved once connected: the driver may run on a node without the GPUs the ranks get.
    parser.set_defaults(device=None)
    ray_group = parser.add_argument_group("ray")
    ray_group.add_argument("--ranks", "--num-ranks", dest="ranks", type=int, help="default: cfg x sp")
    ray_group.add_argument("--address", help="join this Ray cluster ('auto', 'ray://host:10001'); default: start one")
    ray_group.add_argument("--output-dir", type=Path, default=Path("outputs") / "ray")
    ray_group.add_argument("--format", choices=("png", "mp4"), help="default: png for image models or --num-frames 1")
    ray_group.add_argument(
        "--request-timeout", type=float, default=600.0,
        help="seconds a request (on all its ranks) may take, and the limit for placing and starting the ranks",
    )
    ray_group.add_argument(
        "--entry", default=DEFAULT_ENTRY, help="per-rank function: 'package.module:function' or 'file.py:function'"
    )
    return parser


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt: ``"A handwritten 7!"`` -> ``"a-handwritten-7"``."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].rstrip("-") or "prompt"


def output_suffix(args: argparse.Namespace) -> str:
    if args.format is not None:
        return f".{args.format}"
    image = args.num_frames == 1 or (args.num_frames is None and args.model in IMAGE_MODELS)
    return ".png" if image else ".mp4"


def make_requests(args: argparse.Namespace, prompts: Sequence[str]) -> list[Request]:
    """One request per prompt: generate's arguments with that prompt and its own output file."""
    suffix = output_suffix(args)
    output_dir = args.output_dir.resolve()  # the driver's working directory, not each actor's
    requests = []
    for i, prompt in enumerate(prompts):
        rank_args = copy(args)
        rank_args.prompt, rank_args.prompts_file = [prompt], None
        rank_args.output = output_dir / f"{i:03d}-{slug(prompt)}{suffix}"
        rank_args.no_progress = True  # the driver shows progress over requests; rank bars would interleave
        requests.append(Request(prompt, rank_args))
    return requests


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """``--ranks`` (default: one replica) split into replicas of generate's ``--cfg-parallel x --sp``."""
    return ParallelConfig(args.cfg_parallel, args.sp, world_size=args.ranks or args.cfg_parallel * args.sp)


def run(args: argparse.Namespace, *, keep_frames: bool = False) -> JobResult:
    """Start (or join) the cluster, run every prompt, write results.json; tears everything down.

    Raises :class:`RayJobError` naming the rank when a rank raises, dies or overruns the timeout.
    """
    if args.output is not None:
        raise ParamsError("--output names one file; under Ray every prompt gets its own file in --output-dir")
    config = parallel_config(args)
    prompts = generate.read_prompts(args)
    resolve_model(args.model, args.model_dir)  # a wrong --model or cache fails here, before any cluster
    cache_from_args(args)
    started = time.monotonic()
    connected = connect(args.address, config.world_size)
    try:
        if args.device is None:
            args.device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        requests = make_requests(args, prompts)
        with (
            tqdm(total=len(requests), desc="requests", unit="req", disable=args.no_progress) as bar,
            RayRanks(config, entry=args.entry, use_gpus=args.device.startswith("cuda")) as ranks,
        ):

            def report(result: RequestResult) -> None:
                bar.update()
                bar.write(f"[{result.index:03d}] {result.label!r}: {result.output.summary()} -> {result.path}")

            ranks.start(args.request_timeout)
            results = ranks.run(requests, timeout_s=args.request_timeout, keep_frames=keep_frames, on_result=report)
    finally:
        if connected:
            ray.shutdown()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results_file = args.output_dir / "results.json"
    results_file.write_text(json.dumps([r.to_json() for r in results], indent=2))
    return JobResult(results, results_file, time.monotonic() - started)


def main(argv: Sequence[str] | None = None, prog: str = "ditcache ray-generate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        job = run(args)
    except RayJobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DitCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = parallel_config(args)
    print(
        f"{len(job.results)} request(s) on {config.dp_degree} replica(s) x {config.model_parallel_size} rank(s) "
        f"in {job.wall_time_s:.1f} s ({job.wall_time_s / max(1, len(job.results)):.2f} s/request); "
        f"wrote {job.results_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
