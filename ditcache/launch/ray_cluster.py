"""Ranks as Ray actors: placement, the torchrun environment, a batch of requests, clean failure.

Every rank is one actor that sets exactly the variables ``torchrun`` sets (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and then calls the same
per-rank entry function ``torchrun`` would run (by default ``ditcache.launch.generate:run``), so the
Ray path adds no code path of its own to the generation. Only the Ray launcher imports this module,
so Ray stays an optional dependency.

Each data-parallel replica (``cfg x sp`` ranks) gets its own placement group and its own
``torch.distributed`` world, as if started by its own ``torchrun``: replicas serve different
requests at their own pace and never communicate (see :class:`ParallelConfig`), so one shared world
would only make them wait on each other's process-group setup.

Failure is bounded: the driver waits on every rank's future with :func:`ray.wait` and a deadline, and
the first rank that raises, dies or overruns fails the job with that rank's message.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ditcache.errors import CollectiveError, DitCacheError, StepSyncError
from ditcache.launch.imports import import_user_module
from ditcache.parallel.config import ParallelConfig
from ditcache.runtime.denoise import GenerationOutput

DEFAULT_ENTRY = "ditcache.launch.generate:run"
# After the first failure of a request, how long to wait for its other ranks: a peer of a dead rank
# often reports a CollectiveError/StepSyncError before Ray notices the death, the root cause.
ROOT_CAUSE_GRACE_S = 5.0


class RayJobError(DitCacheError, RuntimeError):
    """A rank of a Ray job raised, died or did not finish in time (the message names the rank)."""


def load_entry(spec: str) -> Callable[[argparse.Namespace], Any]:
    """``"package.module:function"`` or ``"path/to/file.py:function"`` (relative to the working
    directory: under ``ray job submit --working-dir``, the job's copy on each node)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise RayJobError(f"entry {spec!r} must look like 'package.module:function' or 'path/to/file.py:function'")
    try:
        module = import_user_module(target, option="entry")
    except DitCacheError as exc:
        raise RayJobError(str(exc)) from None
    function = getattr(module, name, None)
    if not callable(function):
        raise RayJobError(f"entry {spec!r}: {target} has no function {name!r}")
    return function


@dataclass
class Request:
    """One request: a label for messages (the prompt) and the arguments every rank's entry gets."""

    label: str
    args: argparse.Namespace


@dataclass
class RankResult:
    """What one rank's entry returned: where it wrote the output (None: another rank did) and the
    output itself (frames dropped unless kept)."""

    rank: int
    path: str | None
    output: GenerationOutput


@dataclass
class RequestResult:
    """One finished request: replica rank 0's output path and telemetry, per-rank times and memory."""

    index: int
    label: str
    replica: int
    path: str | None
    output: GenerationOutput
    wall_time_s: float
    rank_wall_time_s: dict[int, float] = field(default_factory=dict)
    rank_cache_memory_bytes: dict[int, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = self.output
        return {
            "index": self.index,
            "prompt": self.label,
            "path": self.path,
            "replica": self.replica,
            "summary": out.summary(),
            "wall_time_s": round(self.wall_time_s, 4),
            "generation_wall_time_s": round(out.wall_time_s, 4),
            "rank_wall_time_s": {str(r): round(t, 4) for r, t in self.rank_wall_time_s.items()},
            "telemetry": out.telemetry(),
            "stack_passes": out.stack_passes,
            "rank_cache_memory_bytes": {str(r): m for r, m in self.rank_cache_memory_bytes.items()},
        }


@ray.remote
class RankActor:
    """One rank: loads the entry once, takes the torchrun environment, runs requests."""

    def __init__(self, rank: int, entry: str) -> None:
        self.rank = rank
        # Loaded here so a bad entry (or an import error in it) fails at startup, not on a request.
        self.entry = load_entry(entry)

    def node(self) -> tuple[str, list[str]]:
        """This actor's node IP and the GPU ids Ray assigned to it."""
        return ray.util.get_node_ip_address(), list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))

    def free_port(self) -> int:
        from ditcache.parallel.testing import free_port

        return free_port()

    def setup(self, env: dict[str, str]) -> None:
        os.environ.update(env)

    def run(self, args: argparse.Namespace, keep_frames: bool, master_port: int) -> RankResult:
        # A new rendezvous port per request: torch keeps a process's TCPStore server per port, so a
        # process group re-formed on the old port would read the previous request's (stale) addresses.
        os.environ["MASTER_PORT"] = str(master_port)
        result = self.entry(args)
        frames = result.output.frames
        # The driver needs telemetry, not pixels (a video is hundreds of MB); rank 0 has saved them.
        frames = frames.detach().cpu() if keep_frames else frames[:0].detach().cpu()
        path = None if result.path is None else str(result.path)
        return RankResult(self.rank, path, dataclasses.replace(result.output, frames=frames))


@dataclass
class _Replica:
    index: int
    ranks: list[int]  # global ranks, in replica-rank order
    actors: list[Any]
    group: PlacementGroup


@dataclass
class _InFlight:
    index: int
    started: float
    pending: dict[Any, int]  # object ref -> global rank
    done: dict[int, RankResult] = field(default_factory=dict)


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


def _root_cause_rank(exc: BaseException) -> int:
    """Lower is closer to the root cause: a death, then an exception, then a failed collective or step
    check (what the peers of a rank that raised or died see)."""
    if isinstance(exc, RayActorError):
        return 0
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, (CollectiveError, StepSyncError)):
        return 2
    return 1


class RayRanks:
    """Placement groups and one actor per rank for ``config``; use as a context manager.

    ``use_gpus`` reserves one GPU per rank (bundles ``{"CPU": 1, "GPU": 1}``), else one CPU.
    A replica of more than one rank is packed onto one node (``STRICT_PACK``): Ulysses does an
    all-to-all in every attention layer and CFG partners exchange a prediction every step.
    """

    def __init__(self, config: ParallelConfig, *, entry: str = DEFAULT_ENTRY, use_gpus: bool = False) -> None:
        self.config = config
        self.entry = entry
        self.use_gpus = use_gpus
        self.replicas: list[_Replica] = []

    def __enter__(self) -> RayRanks:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self, timeout_s: float) -> None:
        """Reserve the bundles, start the actors, give every rank its torchrun environment."""
        size = self.config.model_parallel_size
        bundle = {"CPU": 1.0, "GPU": 1.0} if self.use_gpus else {"CPU": 1.0}
        strategy = "STRICT_PACK" if size > 1 else "PACK"
        groups = [placement_group([bundle] * size, strategy=strategy) for _ in range(self.config.dp_degree)]
        # Registered before waiting so that close() removes them even if the wait fails.
        self.replicas = [
            _Replica(d, list(range(d * size, (d + 1) * size)), [], group) for d, group in enumerate(groups)
        ]
        ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
        if len(ready) < len(groups):
            raise RayJobError(
                f"could not reserve {self.config.dp_degree} x {size} bundle(s) of {bundle} ({strategy}) within "
                f"{timeout_s:g} s; cluster resources: {ray.cluster_resources()}"
            )
        for replica in self.replicas:
            replica.actors = [
                RankActor.options(
                    num_cpus=1,
                    num_gpus=1 if self.use_gpus else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(replica.group, placement_group_bundle_index=i),
                ).remote(rank, self.entry)
                for i, rank in enumerate(replica.ranks)
            ]
        nodes = self._get_all(
            {a.node.remote(): r for rep in self.replicas for a, r in zip(rep.actors, rep.ranks)}, timeout_s, "start"
        )
        setups = {}
        for replica in self.replicas:
            for actor, rank in zip(replica.actors, replica.ranks):
                setups[actor.setup.remote(self._rank_env(replica, rank, nodes))] = rank
        self._get_all(setups, timeout_s, "start")

    def _rank_env(self, replica: _Replica, rank: int, nodes: dict[int, tuple[str, list[str]]]) -> dict[str, str]:
        """The torchrun variables but MASTER_PORT, which every request gets anew (see RankActor.run)."""
        ip = nodes[rank][0]
        same_node = [r for r in replica.ranks if nodes[r][0] == ip]
        env = {
            "RANK": str(replica.ranks.index(rank)),
            "LOCAL_RANK": str(same_node.index(rank)),
            "WORLD_SIZE": str(len(replica.ranks)),
            "LOCAL_WORLD_SIZE": str(len(same_node)),
            "MASTER_ADDR": nodes[replica.ranks[0]][0],
        }
        if self.use_gpus:
            # Ray shows each actor only its own GPU, but the per-rank code (like under torchrun) uses
            # cuda:LOCAL_RANK; showing the node's replica GPUs in local-rank order makes that index right.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(nodes[r][1][0] for r in same_node)
        return env

    def run(
        self,
        requests: Sequence[Request],
        *,
        timeout_s: float,
        keep_frames: bool = False,
        on_result: Callable[[RequestResult], None] | None = None,
    ) -> list[RequestResult]:
        """Run every request on every rank of one replica (replicas take the next request when free).

        A request that has not finished ``timeout_s`` after it was sent fails the job, as does the
        first rank that raises or dies; :class:`RayJobError` names the rank and the request.
        """
        todo = deque(range(len(requests)))
        inflight: dict[int, _InFlight] = {}
        results: list[RequestResult] = []

        def send(replica: _Replica) -> None:
            if todo:
                i = todo.popleft()
                # found on rank 0's node; Ray hands the port to every rank's run without a driver round trip
                port = replica.actors[0].free_port.remote()
                refs = {
                    a.run.remote(requests[i].args, keep_frames, port): r for a, r in zip(replica.actors, replica.ranks)
                }
                inflight[replica.index] = _InFlight(i, time.monotonic(), refs)

        for replica in self.replicas:
            send(replica)
        while inflight:
            owner = {ref: d for d, job in inflight.items() for ref in job.pending}
            oldest = min(inflight.values(), key=lambda job: job.started)
            remaining = oldest.started + timeout_s - time.monotonic()
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=max(0.0, remaining))
            if not ready:
                done = f", rank(s) {sorted(oldest.done)} done" if oldest.done else ""
                raise RayJobError(
                    f"request {oldest.index} ({requests[oldest.index].label!r}) did not finish within {timeout_s:g} s: "
                    f"rank(s) {sorted(oldest.pending.values())} still running{done}"
                )
            replica = self.replicas[owner[ready[0]]]
            job = inflight[replica.index]
            rank = job.pending.pop(ready[0])
            try:
                job.done[rank] = ray.get(ready[0])
            except RayError as exc:
                raise self._failure(job, requests[job.index], rank, exc, timeout_s) from None
            if job.pending:
                continue
            del inflight[replica.index]
            result = self._finish(job, requests[job.index], replica)
            results.append(result)
            if on_result is not None:
                on_result(result)
            send(replica)
        return sorted(results, key=lambda r: r.index)

    def _finish(self, job: _InFlight, request: Request, replica: _Replica) -> RequestResult:
        ranked = [job.done[r] for r in replica.ranks]
        return RequestResult(
            index=job.index,
            label=request.label,
            replica=replica.index,
            # Telemetry is the whole request's on every rank (the cfg pair exchanges it), and rank 0
            # is the one that saved the output.
            path=ranked[0].path,
            output=ranked[0].output,
            wall_time_s=time.monotonic() - job.started,
            rank_wall_time_s={r.rank: r.output.wall_time_s for r in ranked},
            rank_cache_memory_bytes={r.rank: r.output.cache_memory_bytes for r in ranked},
        )

    def _failure(
        self, job: _InFlight, request: Request, rank: int, exc: RayError, timeout_s: float
    ) -> RayJobError:
        failures = {rank: exc}
        grace = min(ROOT_CAUSE_GRACE_S, job.started + timeout_s - time.monotonic())
        if job.pending and grace > 0:
            ready, _ = ray.wait(list(job.pending), num_returns=len(job.pending), timeout=grace)
            for ref in ready:
                try:
                    ray.get(ref)
                except RayError as other:
                    failures[job.pending[ref]] = other
        # min() keeps arrival order among equals, so the first of the most basic failures wins.
        first = min(failures, key=lambda r: _root_cause_rank(failures[r]))
        described = {r: describe_error(e) for r, e in failures.items()}
        message = f"rank {first} failed on request {job.index} ({request.label!r}): {described[first]}"
        same = sorted(r for r, text in described.items() if r != first and text == described[first])
        if same:  # e.g. a configuration error that every rank hits
            message += f" (so did rank(s) {same})"
        others = [f"rank {r}: {text}" for r, text in described.items() if text != described[first]]
        if others:
            message += "; then " + "; ".join(others)
        return RayJobError(message)

    def _get_all(self, refs: dict[Any, int], timeout_s: float, what: str) -> dict[int, Any]:
        """``{rank: value}`` of ``refs`` (ref -> rank), or the first failure/timeout as a RayJobError."""
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        values: dict[int, Any] = {}
        for ref in ready:
            try:
                values[refs[ref]] = ray.get(ref)
            except RayError as exc:
                raise RayJobError(f"rank {refs[ref]} failed to {what}: {describe_error(exc)}") from None
        if pending:
            raise RayJobError(f"rank(s) {sorted(refs[r] for r in pending)} did not {what} within {timeout_s:g} s")
        return values

    def close(self) -> None:
        """Kill every actor and remove every placement group (safe to call more than once)."""
        for replica in self.replicas:
            for actor in replica.actors:
                ray.kill(actor, no_restart=True)
            remove_placement_group(replica.group)
        self.replicas = []


def connect(address: str | None, num_ranks: int) -> bool:
    """Join a Ray cluster, or start a local one; returns whether this call connected (so the caller
    should ``ray.shutdown()``).

    ``address`` (``"auto"``, ``"ray://host:10001"``, ...) joins that cluster. Without it: an existing
    connection is reused (a caller that already ran ``ray.init``), ``RAY_ADDRESS`` (set for a driver
    run by ``ray job submit``) is joined, else a local cluster is started.
    """
    if address is not None:
        ray.init(address=address)
        return True
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return True
    # At least one CPU per rank, so that a many-rank CPU run on a small machine can be placed at all
    # (the ranks then share cores, which is what a CPU test of a parallel layout needs).
    ray.init(num_cpus=max(os.cpu_count() or 1, num_ranks), include_dashboard=False)
    return True
