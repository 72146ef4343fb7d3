"""Requests on replicas: one queue, a free replica takes the next request, a failed attempt is retried.

The rules, all driven from one :func:`ray.wait` loop with the nearest deadline:

* A replica is loading (its model, once per start), free, or running one attempt of one request.
  Replicas load and serve side by side; a free replica takes the first queued request it may run.
* An attempt fails when a rank raises, dies, or the attempt overruns ``request_timeout_s``. The
  failure closest to the root cause names the rank. The replica is then killed whole and started
  again (the model reloads) in its placement group, while the other replicas go on serving. The
  job ends only once every replica has loaded again: a restart that cannot load is a failed job,
  not a silent loss of capacity, and the record shows each restart's load.
* A failed request goes back to the front of the queue while it has retries left, and is not run
  again on a replica it failed on while there is one it has not; otherwise it is recorded failed.
  A request is only ever in flight on one replica, and a killed replica's processes are gone before
  its request is retried, so no two attempts write the same output.
* A replica that fails to load, or overruns ``load_timeout_s``, fails the job (:class:`RayJobError`):
  loading is the same on every attempt, so retrying it would only fail again more slowly.
"""

from __future__ import annotations

import argparse
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
from ray.exceptions import RayError

from ditcache.launch.ray_cluster import (
    ROOT_CAUSE_GRACE_S,
    LoadReport,
    RankResult,
    RayJobError,
    Replica,
    collect_failures,
    failure_message,
)
from ditcache.runtime.denoise import GenerationOutput


@dataclass
class Request:
    """One request: a label for messages (the prompt) and the arguments every rank's server gets."""

    label: str
    args: argparse.Namespace


@dataclass
class RequestResult:
    """One finished request: replica rank 0's output path and telemetry, per-rank times, memory and
    model-load counts (1 on every rank of a replica that loaded its model once)."""

    index: int
    label: str
    replica: int
    path: str | None
    output: GenerationOutput
    wall_time_s: float  # this attempt, from dispatch to the last rank's answer
    job_elapsed_s: float  # from the job's start (placing and loading included) to this request's end
    rank_wall_time_s: dict[int, float] = field(default_factory=dict)
    rank_cache_memory_bytes: dict[int, dict[str, int]] = field(default_factory=dict)
    rank_model_loads: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = self.output
        return {
            "path": self.path,
            "replica": self.replica,
            "summary": out.summary(),
            "wall_time_s": round(self.wall_time_s, 4),
            "job_elapsed_s": round(self.job_elapsed_s, 4),
            "generation_wall_time_s": round(out.wall_time_s, 4),
            "rank_wall_time_s": {str(r): round(t, 4) for r, t in self.rank_wall_time_s.items()},
            "telemetry": out.telemetry(),
            "stack_passes": out.stack_passes,
            "rank_cache_memory_bytes": {str(r): m for r, m in self.rank_cache_memory_bytes.items()},
            "rank_model_loads": {str(r): n for r, n in self.rank_model_loads.items()},
        }


class Listener(Protocol):
    """What the dispatcher reports, as it happens (the job record implements it)."""

    def loaded(self, replica: int, reports: list[LoadReport]) -> None: ...

    def started(self, index: int, replica: int) -> None: ...

    def attempt_failed(self, index: int, replica: int, error: str, retry: bool) -> None: ...

    def finished(self, result: RequestResult) -> None: ...


@dataclass
class _Work:
    """What a replica is doing: loading (``request`` None) or one attempt of a request."""

    request: int | None
    started: float
    deadline: float
    pending: dict[Any, int]  # object ref -> global rank
    done: dict[int, Any] = field(default_factory=dict)  # global rank -> LoadReport | RankResult


class Dispatcher:
    """Runs requests on ``replicas`` by the rules in this module's docstring; see :meth:`run`."""

    def __init__(
        self,
        replicas: Sequence[Replica],
        requests: Sequence[Request],
        listener: Listener,
        *,
        load_args: argparse.Namespace,
        request_timeout_s: float,
        load_timeout_s: float,
        retries: int,
        job_started: float,
        keep_frames: bool = False,
    ) -> None:
        self.replicas = list(replicas)
        self.requests = requests
        self.listener = listener
        self.load_args = load_args
        self.request_timeout_s = request_timeout_s
        self.load_timeout_s = load_timeout_s
        self.retries = retries
        self.job_started = job_started  # time.monotonic() when the job began
        self.keep_frames = keep_frames
        self.queue: deque[int] = deque()
        self.work: dict[int, _Work] = {}  # replica index -> what it is doing; absent: free
        self.attempts: dict[int, int] = {}
        self.failed_on: dict[int, set[int]] = {}

    def run(self, todo: Sequence[int]) -> None:
        """Load every replica, then run the requests ``todo`` (indices into ``requests``) until each is
        done or failed. Raises :class:`RayJobError` when a replica cannot load."""
        self.queue.extend(todo)
        for replica in self.replicas:
            self._start(replica)
        while self.queue or self.work:
            for replica in self.replicas:
                if replica.index not in self.work:
                    self._dispatch(replica)
            owner = {ref: index for index, work in self.work.items() for ref in work.pending}
            deadline = min(work.deadline for work in self.work.values())
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                now = time.monotonic()
                for index, work in list(self.work.items()):
                    if work.deadline <= now:
                        self._overran(self.replicas[index], work)
                continue
            replica = self.replicas[owner[ready[0]]]
            work = self.work[replica.index]
            rank = work.pending.pop(ready[0])
            try:
                work.done[rank] = ray.get(ready[0])
            except RayError as exc:
                grace = min(ROOT_CAUSE_GRACE_S, work.deadline - time.monotonic())
                self._failed(replica, work, collect_failures(work.pending, (rank, exc), grace))
                continue
            if not work.pending:
                self._completed(replica, work)

    def _start(self, replica: Replica) -> None:
        now = time.monotonic()
        self.work[replica.index] = _Work(None, now, now + self.load_timeout_s, replica.start(self.load_args))

    def _dispatch(self, replica: Replica) -> None:
        """Send ``replica`` the first queued request it may run, if any."""
        for index in self.queue:
            tried = self.failed_on.get(index, set())
            if replica.index not in tried or len(tried) >= len(self.replicas):
                self.queue.remove(index)
                self.attempts[index] = self.attempts.get(index, 0) + 1
                now = time.monotonic()
                refs = replica.serve(self.requests[index].args, self.keep_frames)
                self.work[replica.index] = _Work(index, now, now + self.request_timeout_s, refs)
                self.listener.started(index, replica.index)
                return

    def _completed(self, replica: Replica, work: _Work) -> None:
        del self.work[replica.index]
        ranked = [work.done[r] for r in replica.ranks]
        if work.request is None:
            self.listener.loaded(replica.index, ranked)
            return
        self.listener.finished(self._result(work.request, replica, work.started, ranked))

    def _result(self, index: int, replica: Replica, started: float, ranked: list[RankResult]) -> RequestResult:
        return RequestResult(
            index=index,
            label=self.requests[index].label,
            replica=replica.index,
            # Telemetry is the whole request's on every rank (the cfg pair exchanges it), and rank 0
            # is the one that saved the output.
            path=ranked[0].path,
            output=ranked[0].output,
            wall_time_s=time.monotonic() - started,
            job_elapsed_s=time.monotonic() - self.job_started,
            rank_wall_time_s={r.rank: r.output.wall_time_s for r in ranked},
            rank_cache_memory_bytes={r.rank: r.output.cache_memory_bytes for r in ranked},
            rank_model_loads={r.rank: r.model_loads for r in ranked},
        )

    def _failed(self, replica: Replica, work: _Work, failures: dict[int, BaseException]) -> None:
        if work.request is None:
            raise RayJobError(failure_message(f"failed to load on replica {replica.index}", failures))
        label = self.requests[work.request].label
        what = f"failed on request {work.request} ({label!r}) on replica {replica.index}"
        self._retry_elsewhere(replica, work, failure_message(what, failures, list(work.pending.values())))

    def _overran(self, replica: Replica, work: _Work) -> None:
        running = sorted(work.pending.values())
        if work.request is None:
            raise RayJobError(
                f"replica {replica.index} did not load within {self.load_timeout_s:g} s: rank(s) {running} still loading"
            )
        done = f", rank(s) {sorted(work.done)} done" if work.done else ""
        self._retry_elsewhere(
            replica,
            work,
            f"request {work.request} ({self.requests[work.request].label!r}) did not finish within "
            f"{self.request_timeout_s:g} s on replica {replica.index}: rank(s) {running} still running{done}",
        )

    def _retry_elsewhere(self, replica: Replica, work: _Work, message: str) -> None:
        """Restart ``replica`` and requeue (or fail) the request of its failed attempt."""
        index = work.request
        assert index is not None
        del self.work[replica.index]
        replica.kill(list(work.pending))
        self.failed_on.setdefault(index, set()).add(replica.index)
        retry = self.attempts[index] <= self.retries
        self.listener.attempt_failed(index, replica.index, message, retry)
        if retry:
            self.queue.appendleft(index)
        self._start(replica)
