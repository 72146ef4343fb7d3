"""The model half of ``ditcache serve``: one Serve replica per replica group, driving its rank actors.

A :class:`ModelGroup` replica runs in a placement group that Serve reserves for it (one bundle per
rank, ``placement_group_bundles``); it starts ``cfg x ulysses x ring`` rank actors in those bundles
(:class:`ditcache.launch.ray_cluster.Replica`), waits for them to load the model once, then hands
each request to all of them. This module does not import torch, so a replica starts its ranks without
first paying for it (the first answer does): a group's start is two process starts in a row.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import RayTaskError

from ditcache.errors import CollectiveError, DitCacheError, StepSyncError
from ditcache.launch.ray_cluster import RankResult, RanksFailed, RayJobError, Replica, gather


@dataclass(frozen=True)
class ServiceSettings:
    """What every deployment replica needs: generate's arguments that each request starts from
    (model, device, layout, cache defaults) and the service's limits."""

    base: argparse.Namespace
    ranks_per_group: int
    image_only: bool  # the family makes single images: /v1/videos/generations is refused
    entry: str
    cpus_per_rank: float
    request_timeout_s: float
    load_timeout_s: float
    output_dir: Path | None

    @property
    def use_gpus(self) -> bool:
        """One GPU per rank: the device, resolved once connected, is CUDA."""
        return str(self.base.device).startswith("cuda")


@dataclass
class GroupReply:
    """A group's answer: an HTTP status, and the response body or the error's one line."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def rejection(failure: RanksFailed, ranks: int) -> str | None:
    """The message when every rank refused the request with the same ditcache error (a value the
    model checks, like a size it cannot take): the ranks stopped at the same check, so the group's
    process groups are intact and it need not restart."""
    causes = [e.cause for e in failure.failures.values() if isinstance(e, RayTaskError)]
    if len(causes) != ranks or failure.unfinished:
        return None
    peer_errors = (CollectiveError, StepSyncError)
    if not all(isinstance(c, DitCacheError) and not isinstance(c, peer_errors) for c in causes):
        return None
    return str(causes[0]) if len({str(c) for c in causes}) == 1 else None


def encode(frames: Any, suffix: str) -> str:
    """Frames as the base64 text of a PNG grid or an MP4, written by the same writer as ``generate``."""
    from ditcache.runtime.io import save_frames  # torch: imported by the first answer, not at start

    with tempfile.TemporaryDirectory(prefix="ditcache-serve-") as tmp:
        path = save_frames(frames, Path(tmp) / f"output{suffix}")
        return base64.b64encode(path.read_bytes()).decode("ascii")


@serve.deployment(max_ongoing_requests=1, ray_actor_options={"num_cpus": 0}, max_constructor_retry_count=2)
class ModelGroup:
    """One replica group: its rank actors in this Serve replica's placement group, loaded once, one
    request at a time (failures: see :mod:`ditcache.launch.serve`)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        rank = serve.get_replica_context().rank
        self.index = int(getattr(rank, "rank", rank))
        self.replica = Replica(
            self.index, list(range(settings.ranks_per_group)), ray.util.get_current_placement_group(),
            entry=settings.entry, cpus_per_rank=settings.cpus_per_rank, use_gpus=settings.use_gpus,
        )
        self.broken: str | None = None
        self.loading: dict[Any, int] = self.replica.start(settings.base)
        self._finish_loading()  # a failure fails the constructor: Serve retries it, then reports the app failed

    def check_health(self) -> None:
        """Serve's health check: a group that could not reload is replaced whole."""
        if self.broken is not None:
            raise RayJobError(self.broken)

    async def generate(self, args: argparse.Namespace) -> GroupReply:
        # In a thread: the event loop stays free for Serve's health checks while the ranks work.
        return await asyncio.to_thread(self._generate, args)

    def _finish_loading(self) -> None:
        gather(self.loading, self.settings.load_timeout_s, f"loading the model on group {self.index}")
        self.loading = {}

    def _generate(self, args: argparse.Namespace) -> GroupReply:
        if self.loading:
            try:
                self._finish_loading()
            except RanksFailed as exc:
                self.broken = f"group {self.index} could not reload its model: {exc}"
                return GroupReply(503, error=self.broken)
        started = time.monotonic()
        call = f"request {args.prompt[0]!r} on group {self.index}"
        try:
            ranked: dict[int, RankResult] = gather(
                self.replica.serve(args, keep_frames=args.output is None), self.settings.request_timeout_s, call
            )
        except RanksFailed as exc:
            refused = rejection(exc, self.settings.ranks_per_group)
            if refused is not None:
                return GroupReply(400, error=refused)
            self.replica.kill(exc.unfinished)
            self.loading = self.replica.start(self.settings.base)
            status = 500 if exc.failures else 504
            return GroupReply(status, error=f"{exc}; group {self.index} is restarting (its model reloads)")
        first = ranked[0]
        out = first.output
        data = {"path": first.path} if args.output is not None else {"b64_json": encode(out.frames, f".{args.format}")}
        telemetry = {
            "summary": out.summary(),
            "cache": out.telemetry(),
            "stack_passes": out.stack_passes,
            "generation_wall_time_s": round(out.wall_time_s, 4),
            "wall_time_s": round(time.monotonic() - started, 4),
            "group": self.index,
            "group_starts": self.replica.starts,
            "rank_pids": {str(r): res.pid for r, res in sorted(ranked.items())},
            "rank_model_loads": {str(r): res.model_loads for r, res in sorted(ranked.items())},
        }
        return GroupReply(200, {"data": [{**data, "format": args.format}], "telemetry": telemetry})
