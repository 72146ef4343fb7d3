"""Joining the job's process group with a deadline that names the ranks that never came.

``init_process_group`` alone waits in the store's rendezvous and, when a rank never starts, fails
with a ``DistStoreError`` that says neither which rank is missing nor what to do. Here each rank
first connects to the job's TCP store (the one ``torchrun``'s agent hosts, or rank 0's otherwise,
exactly as torch's ``env://`` rendezvous would), leaves a mark, and waits for every other rank's
mark; on the deadline it reports the ranks that left none. The process group is then built on that
same store, so this adds one key per rank and no second rendezvous.

A process may join more than once (two ``ditcache calibrate`` runs in one worker, a library user who
sets groups up per request). Torch's ``env://`` path is not built for that: rank 0's store server
may still hold the port when it binds again, and a later group would read the earlier one's keys
(gloo's peer addresses among them). So the store is made once per process and address and kept, and
every join draws a ticket from it: the ``world_size`` ranks of the n-th join share generation n,
their marks and their process group's keys live under that generation's prefix, and a rank that
arrives early waits for its own generation's peers, never matching stale marks.
"""

from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist

from ditcache.errors import RendezvousError

_POLL_S = 0.05


_stores: dict[tuple[str, int], dist.Store] = {}


def _job_store(rank: int, address: str, port: int, timeout_s: float) -> dist.Store:
    """This process's connection to the job's store (rank 0 serves it unless torchrun's agent does),
    made on the first join and kept for later ones."""
    key = (address, port)
    if key not in _stores:
        # torchrun's agent already serves the store on MASTER_PORT; without it rank 0 serves it.
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        _stores[key] = dist.TCPStore(
            address, port, is_master=rank == 0 and not agent_store,
            timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False,
        )
    return _stores[key]


def join_store(rank: int, world_size: int, timeout_s: float) -> dist.Store:
    """A store for this join's process group once all ``world_size`` ranks have reached the job's
    store; raises :class:`RendezvousError` naming the missing ranks (or the unreachable address)
    after ``timeout_s``."""
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    where = f"{address}:{port}"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for fresh in (address, port) not in _stores, True:
        try:
            store = _job_store(rank, address, port, timeout_s)
            generation = (store.add(f"ditcache/{attempt}/tickets", 1) - 1) // world_size
            break
        except (RuntimeError, OSError) as exc:  # DistStoreError is a RuntimeError
            _stores.pop((address, port), None)  # a kept connection whose server is gone: one fresh try
            if fresh:
                first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
                raise RendezvousError(
                    f"rank {rank}: cannot reach the job's rendezvous at {where} within {timeout_s:g} s ({first}); "
                    "check that rank 0 is running and MASTER_ADDR/MASTER_PORT point at it"
                ) from None
    prefix = f"ditcache/{attempt}/{generation}"
    keys = [f"{prefix}/joined/{r}" for r in range(world_size)]
    store.set(keys[rank], "1")
    deadline = time.monotonic() + timeout_s
    while not store.check(keys):
        if time.monotonic() > deadline:
            missing = [r for r, key in enumerate(keys) if not store.check([key])]
            listed = ", ".join(map(str, missing))
            raise RendezvousError(
                f"rank {rank}: {'rank' if len(missing) == 1 else 'ranks'} {listed} of {world_size} did not join "
                f"the job at {where} within {timeout_s:g} s; start every rank (or raise --timeout)"
            )
        time.sleep(_POLL_S)
    return dist.PrefixStore(f"{prefix}/pg", store)
