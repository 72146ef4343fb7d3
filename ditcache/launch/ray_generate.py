"""``ditcache ray-generate``: a batch of prompts on Ray, served by replicas that load the model once.

    ditcache ray-generate --ranks 2 --prompts-file prompts.txt --output-dir out/
    ditcache ray-generate --address auto --ranks 8 --cfg-parallel 2 --sp 2 --model wan \
        --model-dir /models/Wan2.1-T2V-1.3B-Diffusers --model-type Wan2.1-T2V-1.3B --prompts-file p.txt
    ditcache ray-generate --ranks 4 --cfg-parallel 2 --prompts-file p.txt --output-dir out/ --resume
    ray job submit --working-dir . -- ditcache ray-generate --ranks 2 --output-dir /shared/out

Takes every argument of ``ditcache generate``. The ranks (``--ranks`` = dp x cfg x sp) form
``--ranks / (cfg x sp)`` replicas, each a Ray placement group of rank actors with its own
``torch.distributed`` world. Every rank loads the model once; the replicas then take requests from
one queue, a free replica the next request. No batching: a request is one prompt with the job's
settings and seed ``--seed``, so it matches ``ditcache generate --prompt ...``; rank 0 of its
replica writes ``<output-dir>/NNN-<prompt>.png|mp4``.

A rank that raises, dies or overruns ``--request-timeout`` fails that attempt with its rank and
message; the replica is killed and restarted (the model reloads) and the request retried on
another replica, up to ``--retries`` times. ``<output-dir>/results.json`` records every request's
status and attempts and is replaced atomically after each change, so a job killed midway leaves a
valid record; ``--resume`` then runs only the requests not recorded done with their output present.
Exit code 1 when a request failed (or the ranks could not be placed or loaded), 2 for bad arguments.
Without ``--address`` a local Ray cluster is started, unless the command runs as a Ray job
(``RAY_ADDRESS`` is set), which joins the job's cluster.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from ditcache.errors import DitCacheError, ParamsError
from ditcache.launch import generate
from ditcache.launch.cache_options import cache_from_args
from ditcache.launch.models import IMAGE_MODELS, resolve_model
from ditcache.launch.outputs import check_writable_dir
from ditcache.launch.ray_cluster import DEFAULT_ENTRY, RayJobError, release_replicas, reserve_replicas
from ditcache.launch.ray_connect import DEFAULT_CONNECT_TIMEOUT_S, connect, disconnect
from ditcache.launch.ray_dispatch import Dispatcher, Request, RequestResult
from ditcache.launch.ray_record import RESULTS_FILE, JobRecord, done_before
from ditcache.launch.session import positive_seconds
from ditcache.parallel.config import ParallelConfig

# Options that change where and how the job runs, not what it generates: --resume accepts a record
# written with other values of these.
RUN_OPTIONS = frozenset({
    "prompt", "prompts_file", "output", "output_dir", "overwrite", "no_progress", "telemetry", "timeout", "ranks",
    "address", "connect_timeout", "request_timeout", "load_timeout", "retries", "resume", "cpus_per_rank",
})


@dataclass
class JobResult:
    """The requests this run finished (in prompt order), the job's record and its file, the wall time."""

    results: list[RequestResult]
    record: JobRecord
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
    ray_group.add_argument(
        "--connect-timeout", type=positive_seconds, default=DEFAULT_CONNECT_TIMEOUT_S,
        help="seconds to wait for the cluster at --address (or RAY_ADDRESS) to answer",
    )
    ray_group.add_argument("--output-dir", type=Path, default=Path("outputs") / "ray")
    ray_group.add_argument("--format", choices=("png", "mp4"), help="default: png for image models or --num-frames 1")
    ray_group.add_argument(
        "--request-timeout", type=positive_seconds, default=600.0,
        help="seconds one attempt of a request (on all its ranks) may take",
    )
    ray_group.add_argument(
        "--load-timeout", type=positive_seconds, default=600.0,
        help="seconds to place the ranks, and for a replica to (re)start and load its model",
    )
    ray_group.add_argument("--retries", type=int, default=1, help="times a failed request is tried again (default 1)")
    ray_group.add_argument(
        "--resume", action="store_true", help="skip the requests results.json records done whose output exists"
    )
    ray_group.add_argument(
        "--cpus-per-rank", type=float, default=1.0, help="CPUs Ray reserves per rank actor (fractions share cores)"
    )
    ray_group.add_argument(
        "--entry", default=DEFAULT_ENTRY,
        help="per-rank server factory: 'package.module:name' or 'file.py:name' (see ray_cluster.load_entry)",
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
        requests.append(Request(prompt, rank_args))
    return requests


def job_settings(args: argparse.Namespace) -> dict[str, str]:
    """The options that shape the outputs, as text (what --resume compares)."""
    return {k: str(v) for k, v in sorted(vars(args).items()) if k not in RUN_OPTIONS}


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    """``--ranks`` (default: one replica) split into replicas of generate's ``--cfg-parallel x --ulysses
    x --ring``."""
    sp = args.sp * args.ring
    return ParallelConfig(args.cfg_parallel, sp, world_size=args.ranks or args.cfg_parallel * sp, ring_degree=args.ring)


def check_outputs(args: argparse.Namespace, requests: Sequence[Request], done: dict[int, Any]) -> None:
    """Before any rank starts: the output directory is writable and no request would replace a file
    that is not this job's own leftover (--resume) or that the user gave up (--overwrite)."""
    check_writable_dir(args.output_dir, "--output-dir")
    if not (args.resume or args.overwrite):
        existing = [r.args.output for r in requests if r.args.output.exists()]
        if existing:
            raise ParamsError(
                f"{existing[0]} already exists ({len(existing)} output(s) in all); pass --resume to skip the "
                f"requests results.json records done, --overwrite to redo them, or choose another --output-dir"
            )
    for i, request in enumerate(requests):
        # Decided here for the whole job: ranks replace what they write (a retry, a resumed leftover).
        request.args.overwrite = i not in done


def run(args: argparse.Namespace, *, keep_frames: bool = False) -> JobResult:
    """Start (or join) the cluster, serve every prompt not done yet, keep results.json; tears down.

    Raises :class:`RayJobError` naming the rank when the ranks cannot be placed or a replica cannot
    load; a failed request is recorded, not raised (see ``JobResult.record``).
    """
    if args.output is not None:
        raise ParamsError("--output names one file; under Ray every prompt gets its own file in --output-dir")
    if args.retries < 0:
        raise ParamsError(f"--retries must be >= 0, got {args.retries}")
    config = parallel_config(args)
    prompts = generate.read_prompts(args)
    resolve_model(args.model, args.model_dir)  # a wrong --model or cache fails here, before any cluster
    cache_from_args(args)
    settings = job_settings(args)
    requests = make_requests(args, prompts)
    results_file = args.output_dir / RESULTS_FILE
    done = done_before(results_file, settings, requests) if args.resume else {}
    check_outputs(args, requests, done)
    started = time.monotonic()
    connected = connect(args.address, config.world_size * args.cpus_per_rank, args.connect_timeout)
    record: JobRecord | None = None
    try:
        if args.device is None:
            args.device = "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"
        for request in requests:
            request.args.device = args.device
        layout = {
            "replicas": config.dp_degree, "ranks_per_replica": config.model_parallel_size,
            "cfg": config.cfg_degree, "sp": config.sp_degree, "ring": config.ring_degree,
        }
        bar = tqdm(total=len(requests), initial=len(done), unit="request", disable=args.no_progress, file=sys.stdout)
        record = JobRecord(results_file, requests, settings=settings, layout=layout, done=done, progress=bar)
        todo = record.todo()
        if todo:
            replicas = reserve_replicas(
                config, entry=args.entry, cpus_per_rank=args.cpus_per_rank, use_gpus=args.device.startswith("cuda"),
                timeout_s=args.load_timeout,
            )
            try:
                Dispatcher(
                    replicas, requests, record, load_args=args, request_timeout_s=args.request_timeout,
                    load_timeout_s=args.load_timeout, retries=args.retries, job_started=started,
                    keep_frames=keep_frames,
                ).run(todo)
            finally:
                release_replicas(replicas)
        bar.close()
        record.close()
    except RayJobError as exc:
        if record is not None:
            record.close(str(exc))
        raise
    finally:
        if connected:
            disconnect()
    results = [record.results[i] for i in sorted(record.results)]
    return JobResult(results, record, results_file, time.monotonic() - started)


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
    skipped = sum(r.resumed for r in job.record.requests)
    failures = job.record.failures()
    print(
        f"{len(job.results)} request(s) done on {config.dp_degree} replica(s) x {config.model_parallel_size} rank(s) "
        f"in {job.wall_time_s:.1f} s" + (f", {skipped} done before" if skipped else "")
        + (f", {len(failures)} failed" if failures else "") + f"; wrote {job.results_file}"
    )
    for failure in failures:
        print(f"error: request {failure.index} ({failure.prompt!r}) failed: {failure.error}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
