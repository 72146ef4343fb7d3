"""Run a function on N local CPU ranks the way ``torchrun`` would, and collect what each rank did.

For tests: every rank gets the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free port) and one CPU thread; the function sets up its process
group itself (normally through :func:`ditcache.parallel.init_parallel`, so the real entry path is
tested). Ranks are forked from a forkserver that has imported torch and the diffusers transformer
modules once, so a test pays seconds for imports once per session, not once per rank.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Modules the forkserver imports before forking ranks (missing ones are skipped). Only the first
# run_ranks call of a process starts the server, so later preload arguments add nothing.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "torch",
    "torch.distributed",
    "ditcache.parallel",
    "diffusers.models.transformers.transformer_wan",
    "diffusers.models.transformers.transformer_hunyuan_video",
    "diffusers.models.transformers.transformer_qwenimage",
)


@dataclass
class RankOutcome:
    """What one rank returned, or the error it raised (type name, message, traceback)."""

    rank: int
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and read what the OS chose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        payload: tuple = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the parent
        payload = ("err", type(exc).__name__, str(exc), traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # plain pickle copies tensor data; torch's shared-memory reduction would die with this process
    results.put((rank, pickle.dumps(payload)))


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 60.0,
    preload: Sequence[str] = DEFAULT_PRELOAD,
) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; outcomes in rank order.

    ``fn`` and ``args`` must be picklable (a module-level function). A rank that has not reported
    after ``timeout_s`` is killed and reported with ``error_type == "Timeout"``; one that died without
    reporting gets ``error_type == "Died"``.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < world_size and time.monotonic() < deadline:
        # once every process has exited, one more short wait drains a message still in the pipe
        everyone_exited = not any(p.is_alive() for p in procs)
        try:
            rank, blob = results.get(timeout=1.0 if everyone_exited else 0.2)
        except queue_mod.Empty:
            if everyone_exited:
                break
            continue
        payload = pickle.loads(blob)
        if payload[0] == "ok":
            outcomes[rank] = RankOutcome(rank, value=payload[1])
        else:
            outcomes[rank] = RankOutcome(rank, error_type=payload[1], error=payload[2], traceback=payload[3])
    for r, p in enumerate(procs):
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        still_running = p.is_alive()
        if still_running:
            p.kill()
            p.join()
        if r not in outcomes:
            outcomes[r] = RankOutcome(
                r,
                error_type="Timeout" if still_running else "Died",
                error=f"rank {r} did not report within {timeout_s:g} s (exit code {p.exitcode})",
            )
    results.close()
    return [outcomes[r] for r in range(world_size)]


def values_or_raise(outcomes: list[RankOutcome]) -> list[Any]:
    """The per-rank values, or an AssertionError carrying every failed rank's traceback."""
    failed = [o for o in outcomes if not o.ok]
    if failed:
        report = "\n".join(f"--- rank {o.rank}: {o.error_type}: {o.error}\n{o.traceback or ''}" for o in failed)
        raise AssertionError(f"{len(failed)} of {len(outcomes)} ranks failed:\n{report}")
    return [o.value for o in outcomes]
