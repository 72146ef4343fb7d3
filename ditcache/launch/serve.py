"""``ditcache serve``: a model behind HTTP on Ray Serve, loaded once per replica group, many requests.

    ditcache serve --model reference                                  # http://127.0.0.1:8000
    ditcache serve --model wan --model-dir /models/Wan2.1-T2V-1.3B-Diffusers --replicas 2 \
        --cfg-parallel 2 --host 0.0.0.0 --port 8080
    curl -s localhost:8000/v1/images/generations -d '{"prompt": "a handwritten 3", "steps": 8}'
    curl -s localhost:8000/v1/videos/generations -d '{"prompt": "a handwritten 3", "frames": 5}'
    curl -s localhost:8000/health

The application has two deployments:

* ``ModelGroup`` (:mod:`ditcache.launch.serve_group`), one Serve replica per replica group
  (``--replicas``): the replica reserves one placement group bundle per rank (Serve's
  ``placement_group_bundles``, packed on one node) and runs ``cfg x ulysses x ring`` rank actors
  in it (:mod:`ditcache.launch.ray_cluster`), which load the model once. A group takes one request at a time (``max_ongoing_requests=1``), so Serve's
  router sends each request to a free group and queues the rest. No batching: a request is one
  prompt.
* ``Api``, the FastAPI ingress: checks the JSON (a bad field is a 4xx whose message names it),
  hands the request to a group and answers with the image (PNG) or video (MP4) as base64, or as a
  path under ``--output-dir`` (``"response_format": "path"``), and the request's cache telemetry.

A rank that raises, dies or overruns ``--request-timeout`` fails that request (500, or 504 for the
deadline, naming the rank); its group then kills its ranks and starts new ones in the same
placement group (the model reloads) while the other groups go on serving, and its next request
waits for that load. A request every rank rejects alike (say, a size the model cannot take) is a
400 and the group stays as it is. A group that cannot reload fails Serve's health check, so Serve
replaces it. ``GET /health`` is 200 while every group is up and 503 otherwise.
"""


import argparse
import asyncio
import json
import re
import signal
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from copy import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from ditcache.errors import DitCacheError, ParamsError
from ditcache.families import family as family_record
from ditcache.launch import generate
from ditcache.launch.cache_options import add_cache_arguments, cache_from_args
from ditcache.launch.models import DTYPES, model_help, resolve_model
from ditcache.launch.outputs import check_writable_dir
from ditcache.launch.ray_cluster import DEFAULT_ENTRY, RayJobError
from ditcache.launch.ray_connect import DEFAULT_CONNECT_TIMEOUT_S, connect, disconnect
from ditcache.launch.serve_group import GroupReply, ModelGroup, ServiceSettings
from ditcache.launch.session import add_parallel_arguments, guidance_scale, positive_seconds

APP = "ditcache"
DEFAULT_PORT = 8000
SIZE = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")


class GenerationRequest(BaseModel):
    """The JSON body of both generation endpoints; unset values take the model's (or the server's) defaults."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    steps: int | None = Field(default=None, ge=1, le=1000)
    guidance: float | None = Field(default=None, description=">= 1, or 0/1 for no classifier-free guidance")
    seed: int = Field(default=0, ge=0, lt=2**63)
    size: str | None = Field(default=None, description="WIDTHxHEIGHT in pixels, e.g. 16x16")
    frames: int | None = Field(default=None, ge=1, description="videos only")
    cache: str | None = Field(default=None, description="a registered cache (default: the server's --cache)")
    cache_options: dict[str, Any] | None = Field(default=None, description="fields of the cache's config")
    model_type: str | None = Field(default=None, description="params of a params-driven cache")
    response_format: Literal["b64_json", "path"] = "b64_json"

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, value: float | None) -> float | None:
        if value is not None:
            try:
                guidance_scale(str(value))
            except argparse.ArgumentTypeError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not SIZE.match(value):
            raise ValueError(f"{value!r} must be WIDTHxHEIGHT, e.g. 16x16")
        return value


class BadRequest(Exception):
    """A request value the service refuses before any rank sees it (400, naming the field)."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")


def request_args(settings: ServiceSettings, body: GenerationRequest, video: bool) -> argparse.Namespace:
    """Generate's arguments for one request: the server's, overridden by the body's values."""
    args = copy(settings.base)
    args.prompt, args.prompts_file = [body.prompt], None
    args.negative_prompt, args.steps, args.guidance_scale, args.seed = (
        body.negative_prompt, body.steps, body.guidance, body.seed
    )
    if body.size is not None:
        args.width, args.height = (int(side) for side in body.size.split("x"))  # the validator checked the form
    if video:
        if settings.image_only:
            raise BadRequest("frames", f"--model {args.model} makes images; use POST /v1/images/generations")
        args.num_frames = body.frames
    elif body.frames not in (None, 1):
        raise BadRequest("frames", "an image has one frame; use POST /v1/videos/generations for a video")
    else:
        args.num_frames = None if settings.image_only else 1
    if body.model_type is not None:
        args.model_type = body.model_type
    if body.cache is not None or body.cache_options is not None:
        # The request's cache settings replace the server's (whose shorthands may not suit this cache).
        args.cache = body.cache or settings.base.cache
        args.cache_option = [f"{k}={json.dumps(v)}" for k, v in (body.cache_options or {}).items()]
        args.order = args.taylor_threshold = None
    try:
        cache_from_args(args)
    except DitCacheError as exc:
        raise BadRequest("cache_options" if body.cache is None else "cache", str(exc)) from None
    # As ray-generate's --format: what the group encodes rank 0's frames as.
    args.format = "mp4" if video else "png"
    if body.response_format == "path":
        if settings.output_dir is None:
            raise BadRequest("response_format", "'path' needs the server started with --output-dir")
        args.output = settings.output_dir / f"{uuid.uuid4().hex}.{args.format}"
    else:
        args.output = None
    args.overwrite = True
    args.no_progress = True
    return args


app = FastAPI(title="ditcache", description="feature-cached diffusion-transformer generation")


@app.exception_handler(RequestValidationError)
async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A schema error as one line per field (``"steps: Input should be greater than or equal to 1"``)."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        lines.append(f"{where}: {error['msg']}")
    return JSONResponse({"detail": "; ".join(lines)}, status_code=422)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(app)
class Api:
    """The HTTP face of the groups: checks requests, hands them to a free group, answers."""

    def __init__(self, groups: DeploymentHandle, settings: ServiceSettings, replicas: int) -> None:
        self.groups = groups
        self.settings = settings
        self.replicas = replicas

    @app.post("/v1/images/generations")
    async def images(self, body: GenerationRequest) -> JSONResponse:
        return await self._generate(body, video=False)

    @app.post("/v1/videos/generations")
    async def videos(self, body: GenerationRequest) -> JSONResponse:
        return await self._generate(body, video=True)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        status = await asyncio.to_thread(serve.status)
        groups = status.applications[APP].deployments[ModelGroup.name]
        running = groups.replica_states.get("RUNNING", 0)
        healthy = groups.status == "HEALTHY" and running == self.replicas
        body = {
            "status": "ok" if healthy else "degraded",
            "model": self.settings.base.model,
            "groups": {"running": running, "wanted": self.replicas, "status": groups.status.value},
            "ranks_per_group": self.settings.ranks_per_group,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def _generate(self, body: GenerationRequest, video: bool) -> JSONResponse:
        try:
            args = request_args(self.settings, body, video)
        except BadRequest as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        reply: GroupReply = await self.groups.generate.remote(args)
        if reply.error is not None:
            return JSONResponse({"detail": reply.error}, status_code=reply.status)
        return JSONResponse({"created": int(time.time()), "model": self.settings.base.model, **reply.body})


def build_parser(prog: str = "ditcache serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="reference", help=model_help())
    model.add_argument("--model-dir", type=Path, help="diffusers-format folder (overrides a bundled model's)")
    model.add_argument("--device", help="default: cuda when the cluster has GPUs, else cpu")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    model.add_argument("--model-type", help="params model_type of a params-driven cache (default: the model's)")
    add_cache_arguments(parser)
    add_parallel_arguments(parser)
    service = parser.add_argument_group("service")
    service.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    service.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"HTTP port (default {DEFAULT_PORT})")
    service.add_argument("--replicas", type=int, default=1, help="replica groups, each cfg x ulysses x ring ranks")
    service.add_argument("--address", help="join this Ray cluster ('auto', 'ray://host:10001'); default: start one")
    service.add_argument(
        "--connect-timeout", type=positive_seconds, default=DEFAULT_CONNECT_TIMEOUT_S,
        help="seconds to wait for the cluster at --address (or RAY_ADDRESS) to answer",
    )
    service.add_argument(
        "--cpus-per-rank", type=float, default=1.0, help="CPUs Ray reserves per rank actor (fractions share cores)"
    )
    service.add_argument(
        "--request-timeout", type=positive_seconds, default=600.0, help="seconds one request (on all its ranks) may take"
    )
    service.add_argument(
        "--load-timeout", type=positive_seconds, default=600.0, help="seconds for a group to (re)load its model"
    )
    service.add_argument("--output-dir", type=Path, help="where requests with \"response_format\": \"path\" are written")
    service.add_argument(
        "--entry", default=DEFAULT_ENTRY,
        help="per-rank server factory: 'package.module:name' or 'file.py:name' (see ray_cluster.load_entry)",
    )
    return parser


def service_settings(args: argparse.Namespace) -> ServiceSettings:
    """Check the arguments (before any cluster starts) and turn them into the deployments' settings."""
    if args.replicas < 1:
        raise ParamsError(f"--replicas must be >= 1, got {args.replicas}")
    if not 0 < args.port < 65536:
        raise ParamsError(f"--port must be in 1..65535, got {args.port}")
    family, _ = resolve_model(args.model, args.model_dir)
    cache_from_args(args)
    output_dir = None
    if args.output_dir is not None:
        check_writable_dir(args.output_dir, "--output-dir")
        output_dir = args.output_dir.resolve()
    base = generate.build_parser().parse_args([])
    for name, value in vars(args).items():
        if hasattr(base, name):
            setattr(base, name, value)
    return ServiceSettings(
        base=base,
        ranks_per_group=args.cfg_parallel * args.sp * args.ring,
        image_only=family_record(family).image_model,
        entry=args.entry,
        cpus_per_rank=args.cpus_per_rank,
        request_timeout_s=args.request_timeout,
        load_timeout_s=args.load_timeout,
        output_dir=output_dir,
    )


@dataclass
class Service:
    """A running service: its URL, and whether stopping it should also disconnect from Ray."""

    url: str
    settings: ServiceSettings
    replicas: int
    connected: bool

    def stop(self) -> None:
        serve.shutdown()
        if self.connected:
            disconnect()


def start(args: argparse.Namespace) -> Service:
    """Start (or join) the cluster, deploy the groups and the ingress, and return once every group has
    loaded its model. Raises :class:`ditcache.errors.DitCacheError` for bad arguments and
    :class:`RayJobError` when the groups cannot be placed or loaded."""
    settings = service_settings(args)
    cpus = args.replicas * settings.ranks_per_group * args.cpus_per_rank
    connected = connect(args.address, cpus, args.connect_timeout)
    try:
        # Resolved once connected: the driver may run on a node without the GPUs the ranks get.
        settings.base.device = args.device or ("cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu")
        bundle = {"CPU": args.cpus_per_rank, "GPU": 1.0} if settings.use_gpus else {"CPU": args.cpus_per_rank}
        groups = ModelGroup.options(
            num_replicas=args.replicas,
            placement_group_bundles=[bundle] * settings.ranks_per_group,
            # Ulysses all-to-alls and CFG exchanges run every step: a group's ranks share a node.
            placement_group_strategy="STRICT_PACK" if settings.ranks_per_group > 1 else "PACK",
        ).bind(settings)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            serve.run(Api.bind(groups, settings, args.replicas), name=APP, route_prefix="/")
        except RuntimeError as exc:  # Serve's "deploying the application failed", with the replica's error
            serve.shutdown()
            raise RayJobError(f"the model groups did not start: {str(exc).strip().splitlines()[-1]}") from None
    except BaseException:
        if connected:
            disconnect()
        raise
    return Service(f"http://{args.host}:{args.port}", settings, args.replicas, connected)


def main(argv: Sequence[str] | None = None, prog: str = "ditcache serve") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        service = start(args)
    except RayJobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except DitCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"serving {args.model} at {service.url} on {args.replicas} group(s) x {service.settings.ranks_per_group} "
        "rank(s): POST /v1/images/generations, POST /v1/videos/generations, GET /health; Ctrl-C stops",
        flush=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # `ray job stop` and service managers send it
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
