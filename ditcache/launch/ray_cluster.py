"""Ranks as persistent Ray actors: placement, the torchrun environment, loading once, serving, teardown.

Every rank is one actor that sets exactly the variables ``torchrun`` sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), then builds a server from
its entry (by default :class:`ditcache.launch.ray_rank.RankServer`, which forms the process groups
and loads the pipeline once) and serves requests until it is killed. Only the Ray launcher imports
this module, so Ray stays an optional dependency.

Each data-parallel replica (``cfg x sp`` ranks) is a :class:`Replica`: one placement group, reserved
for the whole job, and its own ``torch.distributed`` world, as if started by its own ``torchrun``.
Replicas serve different requests at their own pace and never communicate, so one shared world
would only make them wait on each other. A replica whose rank fails is killed whole and started
again inside the same placement group: its peers' process groups are broken anyway.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ditcache.errors import CollectiveError, DitCacheError, StepSyncError
from ditcache.launch.imports import import_user_module

if TYPE_CHECKING:  # torch-free at import: a Serve replica that only drives ranks starts them sooner
    from ditcache.parallel.config import ParallelConfig
    from ditcache.runtime.denoise import GenerationOutput

DEFAULT_ENTRY = "ditcache.launch.ray_rank:RankServer"
# After the first failure of a request, how long to wait for its other ranks: a peer of a dead rank
# often reports a CollectiveError/StepSyncError before Ray notices the death, the root cause.
ROOT_CAUSE_GRACE_S = 5.0
# How long a killed replica's unfinished calls may take to fail: once they have, its processes are
# gone and cannot write an output that a retry is about to write.
KILL_WAIT_S = 30.0


class RayJobError(DitCacheError, RuntimeError):
    """A Ray job could not place, start or load its ranks (the message names the rank)."""


def load_entry(spec: str) -> Callable[[argparse.Namespace], Any]:
    """The server factory ``"package.module:name"`` or ``"path/to/file.py:name"`` (relative to the
    working directory: under ``ray job submit --working-dir``, the job's copy on each node).

    A factory takes the job's arguments once per rank and returns an object whose ``serve(args)``
    runs one request and returns a :class:`ditcache.launch.generate.RunResult`.
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RayJobError(f"entry {spec!r} must look like 'package.module:name' or 'path/to/file.py:name'")
    try:
        module = import_user_module(target, option="entry")
    except DitCacheError as exc:
        raise RayJobError(str(exc)) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise RayJobError(f"entry {spec!r}: {target} has no callable {name!r}")
    return factory


@dataclass(frozen=True)
class NodeInfo:
    """Where a rank actor runs: its node's IP, the GPU ids Ray gave it, a port free on that node."""

    ip: str
    gpus: tuple[str, ...]
    port: int


@dataclass(frozen=True)
class LoadReport:
    """A rank that is ready to serve: its process and how many models that process has loaded."""

    rank: int
    pid: int
    model_loads: int
    seconds: float


@dataclass
class RankResult:
    """One rank's share of a request: where it wrote the output (None: another rank did), the output
    (frames dropped unless kept), and its process's model-load count."""

    rank: int
    path: str | None
    output: GenerationOutput
    pid: int
    model_loads: int


def rank_env(replica_rank: int, nodes: Sequence[NodeInfo], use_gpus: bool) -> dict[str, str]:
    """The torchrun variables for ``replica_rank`` of a replica whose ranks run on ``nodes``
    (rank 0's node hosts the rendezvous, on the port it found free)."""
    ip = nodes[replica_rank].ip
    same_node = [r for r, node in enumerate(nodes) if node.ip == ip]
    env = {
        "RANK": str(replica_rank),
        "LOCAL_RANK": str(same_node.index(replica_rank)),
        "WORLD_SIZE": str(len(nodes)),
        "LOCAL_WORLD_SIZE": str(len(same_node)),
        "MASTER_ADDR": nodes[0].ip,
        "MASTER_PORT": str(nodes[0].port),
    }
    if use_gpus:
        # Ray shows each actor only its own GPU, but the per-rank code (like under torchrun) uses
        # cuda:LOCAL_RANK; showing the node's replica GPUs in local-rank order makes that index right.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(nodes[r].gpus[0] for r in same_node)
    return env


@ray.remote
class RankActor:
    """One rank for the life of its replica: loads the entry at start, the model once, then serves."""

    def __init__(self, rank: int, entry: str) -> None:
        self.rank = rank
        # Loaded here so a bad entry (or an import error in it) fails at startup, not on a request.
        self.factory = load_entry(entry)
        self.server: Any = None

    def node(self) -> NodeInfo:
        from ditcache.parallel.testing import free_port

        gpus = ray.get_runtime_context().get_accelerator_ids().get("GPU", [])
        return NodeInfo(ray.util.get_node_ip_address(), tuple(gpus), free_port())

    def load(self, replica_rank: int, args: argparse.Namespace, *nodes: NodeInfo) -> LoadReport:
        """Take the torchrun environment and build the server (process groups and model)."""
        from ditcache.launch.ray_rank import model_loads

        os.environ.update(rank_env(replica_rank, nodes, use_gpus=str(args.device).startswith("cuda")))
        started = time.monotonic()
        self.server = self.factory(args)
        return LoadReport(self.rank, os.getpid(), model_loads(), time.monotonic() - started)

    def serve(self, args: argparse.Namespace, keep_frames: bool) -> RankResult:
        from ditcache.launch.ray_rank import model_loads

        result = self.server.serve(args)
        frames = result.output.frames
        # The driver needs telemetry, not pixels (a video is hundreds of MB); rank 0 has saved them.
        frames = frames.detach().cpu() if keep_frames else frames[:0].detach().cpu()
        path = None if result.path is None else str(result.path)
        output = dataclasses.replace(result.output, frames=frames)
        return RankResult(self.rank, path, output, os.getpid(), model_loads())


def describe_error(exc: BaseException) -> str:
    """One line for a rank's failure: the exception it raised, or how its actor died."""
    if isinstance(exc, RayTaskError) and exc.cause is not None:
        return f"{type(exc.cause).__name__}: {exc.cause}"
    if isinstance(exc, RayActorError):
        # Ray's text: a header, "\tpid: ..."/"\tip: ..." lines, then a paragraph of generic advice.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        where = ", ".join(line for line in lines if line.startswith(("pid:", "ip:")))
        reason = ". ".join(lines[-1].split(". ")[:2]).rstrip(".") if lines else type(exc).__name__
        return f"its actor process died ({reason}{'; ' + where if where else ''})"
    return f"{type(exc).__name__}: {exc}"


def _root_cause_order(exc: BaseException) -> int:
    """Lower is closer to the root cause: a death, then an exception, then a failed collective or step
    check (what the peers of a rank that raised or died see)."""
    if isinstance(exc, RayActorError):
        return 0
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, (CollectiveError, StepSyncError)):
        return 2
    return 1


def failure_message(what: str, failures: dict[int, BaseException], silent: Sequence[int] = ()) -> str:
    """``"rank R <what>: <cause>"`` for the failure closest to the root cause (``failures`` in arrival
    order), then the other ranks' different causes.

    ``silent`` are the ranks that neither finished nor failed in the grace period. When every
    failure is a peer giving up on a collective or step check, a silent rank (stopped or hung) is
    the cause, not the ranks that waited for it, so the message names it first.
    """
    silent = sorted(r for r in silent if r not in failures)
    if silent and all(_root_cause_order(e) == 2 for e in failures.values()):
        prefix = (
            f"rank(s) {silent} stopped responding (neither finished nor failed while the other ranks "
            "timed out waiting for them); "
        )
        return prefix + failure_message(what, failures)
    # min() keeps arrival order among equals, so the first of the most basic failures wins.
    first = min(failures, key=lambda r: _root_cause_order(failures[r]))
    described = {r: describe_error(e) for r, e in failures.items()}
    message = f"rank {first} {what}: {described[first]}"
    same = sorted(r for r, text in described.items() if r != first and text == described[first])
    if same:  # e.g. a configuration error that every rank hits
        message += f" (so did rank(s) {same})"
    others = [f"rank {r}: {text}" for r, text in described.items() if text != described[first]]
    if others:
        message += "; then " + "; ".join(others)
    return message


def collect_failures(pending: dict[Any, int], first: tuple[int, BaseException], grace_s: float) -> dict[int, BaseException]:
    """The first failure and those of ``pending`` (ref -> rank) that fail within ``grace_s``."""
    failures = {first[0]: first[1]}
    if pending and grace_s > 0:
        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=grace_s)
        for ref in ready:
            try:
                ray.get(ref)
            except RayError as other:
                failures[pending[ref]] = other
    return failures


class RanksFailed(RayJobError):
    """Calls on one replica's ranks failed or overran: ``failures`` (global rank -> error, empty on a
    timeout) and ``unfinished``, the calls still running."""

    def __init__(self, message: str, failures: dict[int, BaseException], unfinished: list[Any]) -> None:
        super().__init__(message)
        self.failures = failures
        self.unfinished = unfinished


def gather(pending: dict[Any, int], timeout_s: float, call: str) -> dict[int, Any]:
    """Every call's value (global rank -> value) within ``timeout_s``, for a caller that waits on one
    replica at a time. Raises :class:`RanksFailed`: ``"rank R failed on <call>: <cause>"`` for the
    failure closest to the root cause, or ``"<call> did not finish within T s: rank(s) [...] still
    running"``."""
    pending = dict(pending)
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            done = f", rank(s) {sorted(values)} done" if values else ""
            raise RanksFailed(
                f"{call} did not finish within {timeout_s:g} s: rank(s) {sorted(pending.values())} still running{done}",
                {}, list(pending),
            )
        rank = pending.pop(ready[0])
        try:
            values[rank] = ray.get(ready[0])
        except RayError as exc:
            grace = min(ROOT_CAUSE_GRACE_S, max(0.0, deadline - time.monotonic()))
            failures = collect_failures(pending, (rank, exc), grace)
            unfinished = [ref for ref, r in pending.items() if r not in failures]
            message = failure_message(f"failed on {call}", failures, list(pending.values()))
            raise RanksFailed(message, failures, unfinished) from None
    return values


class Replica:
    """One data-parallel replica: its placement group (held for the job) and its rank actors (replaced
    on every restart). Starting and serving return ``{object ref: global rank}`` for the caller to
    wait on with its own deadline, so that replicas load and serve side by side."""

    def __init__(
        self, index: int, ranks: list[int], group: PlacementGroup, *, entry: str, cpus_per_rank: float, use_gpus: bool
    ) -> None:
        self.index = index
        self.ranks = ranks  # global ranks, in replica-rank order
        self.group = group
        self.entry = entry
        self.cpus_per_rank = cpus_per_rank
        self.use_gpus = use_gpus
        self.actors: list[Any] = []
        self.starts = 0

    def start(self, args: argparse.Namespace) -> dict[Any, int]:
        """New actors in the group's bundles, each loading the model; returns the load calls."""
        self.actors = [
            RankActor.options(
                num_cpus=self.cpus_per_rank,
                num_gpus=1 if self.use_gpus else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=i),
            ).remote(rank, self.entry)
            for i, rank in enumerate(self.ranks)
        ]
        self.starts += 1
        # Ray resolves the node refs before each load runs, so no driver round trip is needed.
        nodes = [actor.node.remote() for actor in self.actors]
        return {actor.load.remote(i, args, *nodes): rank for i, (actor, rank) in enumerate(zip(self.actors, self.ranks))}

    def serve(self, args: argparse.Namespace, keep_frames: bool) -> dict[Any, int]:
        """Send one request to every rank; returns the serve calls. ``keep_frames``: rank 0 returns its
        frames (every rank of a replica holds the same ones)."""
        return {
            actor.serve.remote(args, keep_frames and i == 0): rank
            for i, (actor, rank) in enumerate(zip(self.actors, self.ranks))
        }

    def kill(self, unfinished: Sequence[Any] = ()) -> None:
        """Kill every actor, then wait (bounded) for ``unfinished`` calls to fail, i.e. for the processes
        that ran them to be gone."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
        if unfinished:
            ray.wait(list(unfinished), num_returns=len(unfinished), timeout=KILL_WAIT_S)


def reserve_replicas(
    config: ParallelConfig, *, entry: str, cpus_per_rank: float, use_gpus: bool, timeout_s: float
) -> list[Replica]:
    """One placement group per replica, ready within ``timeout_s``; on failure none is left behind.

    ``use_gpus`` reserves one GPU per rank. A replica of more than one rank is packed onto one node
    (``STRICT_PACK``): Ulysses does an all-to-all in every attention layer and CFG partners exchange
    a prediction every step.
    """
    size = config.model_parallel_size
    bundle = {"CPU": cpus_per_rank, "GPU": 1.0} if use_gpus else {"CPU": cpus_per_rank}
    strategy = "STRICT_PACK" if size > 1 else "PACK"
    groups = [placement_group([bundle] * size, strategy=strategy) for _ in range(config.dp_degree)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for group in groups:
            remove_placement_group(group)
        raise RayJobError(
            f"could not reserve {config.dp_degree} x {size} bundle(s) of {bundle} ({strategy}) within "
            f"{timeout_s:g} s; cluster resources: {ray.cluster_resources()}"
        )
    return [
        Replica(d, list(range(d * size, (d + 1) * size)), group, entry=entry, cpus_per_rank=cpus_per_rank,
                use_gpus=use_gpus)
        for d, group in enumerate(groups)
    ]


def release_replicas(replicas: Sequence[Replica]) -> None:
    """Kill every actor and remove every placement group."""
    for replica in replicas:
        replica.kill()
        remove_placement_group(replica.group)
