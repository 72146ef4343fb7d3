"""Process groups for one rank (cfg, sp and its ulysses x ring factors, replica) and the timed
collectives run over them.

Every collective in ditcache goes through a :class:`Group` method, which waits with a deadline and
turns a timeout into a :class:`CollectiveError` that names the operation, the group and the ranks,
so a rank that diverged or died shows up as an error instead of a hang. Collectives that torch runs
itself (its ring attention) are wrapped in :meth:`Group.failures`, which does the same translation;
their deadline is the process group's timeout, created with the same value. Groups of size 1 never
touch ``torch.distributed``: a world-1 run (no ``torchrun``) takes the same code path with no
process group.
"""

from __future__ import annotations

import datetime
import os
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ditcache.errors import CacheConfigError, CollectiveError
from ditcache.parallel.config import ParallelConfig, RankCoords
from ditcache.parallel.fingerprint import check_layout
from ditcache.parallel.rendezvous import join_store

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Group:
    """One process group as seen from this rank, with timed collectives.

    ``ranks`` are global ranks in group-rank order; ``rank`` is this process's index in it.
    ``pg`` is ``None`` exactly when the group has one member (no communication needed).
    """

    name: str
    ranks: tuple[int, ...]
    rank: int
    pg: dist.ProcessGroup | None
    timeout: datetime.timedelta

    def __post_init__(self) -> None:
        if (self.pg is None) != (len(self.ranks) == 1):
            raise ValueError(f"group {self.name!r}: a process group is needed exactly when size > 1")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def global_rank(self) -> int:
        return self.ranks[self.rank]

    def describe(self) -> str:
        return f"{self.name} group (global ranks {list(self.ranks)})"

    def all_gather(self, tensor: torch.Tensor, op: str = "all_gather") -> list[torch.Tensor]:
        """Every member's ``tensor`` (same shape on all members), in group-rank order."""
        if self.pg is None:
            return [tensor]
        tensor = tensor.contiguous()
        out = [torch.empty_like(tensor) for _ in self.ranks]
        self._wait(op, lambda: dist.all_gather(out, tensor, group=self.pg, async_op=True))
        return out

    def all_gather_object(self, obj: Any, device: torch.device, op: str = "all_gather_object") -> list[Any]:
        """Every member's picklable ``obj``, in group-rank order. Sent as bytes through the timed
        :meth:`all_gather` (``device`` must suit the backend), so a missing peer is an error, not a hang."""
        if self.pg is None:
            return [obj]
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather(torch.tensor([data.numel()], device=device), op=f"{op} (sizes)")
        lengths = [int(s) for s in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
        padded[: data.numel()] = data.to(device)
        chunks = self.all_gather(padded, op=op)
        return [pickle.loads(chunk[:n].cpu().numpy().tobytes()) for chunk, n in zip(chunks, lengths)]

    def all_reduce_sum(self, tensor: torch.Tensor, op: str = "all_reduce") -> torch.Tensor:
        """Sum of every member's ``tensor`` (a new tensor; the input is left unchanged)."""
        if self.pg is None:
            return tensor.clone()
        out = tensor.clone().contiguous()
        self._wait(op, lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.pg, async_op=True))
        return out

    def all_to_all(self, tensor: torch.Tensor, op: str = "all_to_all") -> torch.Tensor:
        """Chunk ``i`` of dim 0 goes to member ``i``; chunk ``j`` of the result came from member ``j``."""
        if self.pg is None:
            return tensor
        if tensor.shape[0] != self.size:
            raise ValueError(f"{op}: dim 0 must equal the group size {self.size}, got {tuple(tensor.shape)}")
        tensor = tensor.contiguous()
        out = torch.empty_like(tensor)
        self._wait(op, lambda: dist.all_to_all_single(out, tensor, group=self.pg, async_op=True))
        return out

    @contextmanager
    def failures(self, op: str) -> Iterator[None]:
        """Turn a backend failure of collectives run inside the block into a :class:`CollectiveError`."""
        try:
            yield
        except RuntimeError as exc:  # gloo/nccl timeouts and peer failures are RuntimeErrors
            cause = failure_cause(exc, self.timeout.total_seconds())
            raise CollectiveError(
                f"{op} over the {self.describe()} failed on global rank {self.global_rank}: {cause}; "
                "another rank of this group raised, died, or is waiting in a different collective",
                cause,
            ) from exc

    def _wait(self, op: str, start: Callable[[], dist.Work]) -> None:
        with self.failures(op):
            start().wait(self.timeout)


@dataclass(frozen=True)
class SequenceGroup(Group):
    """The SP group (every rank sharing one token sequence) and its ``ulysses x ring`` factors.

    Sharding, gathering and cache statistics run over the whole group; attention runs the
    all-to-all over ``ulysses`` (this rank's ring position) and passes key/value chunks around
    ``ring`` (this rank's ulysses position). A factor of size 1 is a group without a process group;
    the other factor is then the SP group itself under its own name (same process group).
    """

    ulysses: Group
    ring: Group

    @classmethod
    def of(cls, sp: Group, ulysses: Group, ring: Group) -> SequenceGroup:
        """``sp`` with its factors, named ``ulysses`` and ``ring`` in messages."""
        return cls(
            sp.name, sp.ranks, sp.rank, sp.pg, sp.timeout,
            ulysses=replace(ulysses, name="ulysses"), ring=replace(ring, name="ring"),
        )


def failure_cause(exc: BaseException, timeout_s: float) -> str:
    """A backend's collective error in words: timed out, or lost a peer (gloo and nccl spell both
    in their error text), else the first line of the backend's own message."""
    text = str(exc)
    lowered = text.lower()
    if "timed out" in lowered or "timeout" in lowered:
        return f"timed out after {timeout_s:g} s"
    if any(word in lowered for word in ("connection closed", "connection reset", "broken pipe", "remote process")):
        return "a peer closed its connection: it exited or crashed"
    return text.splitlines()[0][:200] if text.strip() else "no detail from the backend"


def _single_group(name: str, rank: int, timeout: datetime.timedelta) -> Group:
    return Group(name=name, ranks=(rank,), rank=0, pg=None, timeout=timeout)


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the ``(dp, cfg, sp)`` mesh and its groups.

    ``cfg``: the ranks running the other CFG branch of the same tokens (size ``cfg_degree``).
    ``sp``: the ranks sharing one token sequence (size ``sp_degree``); a :class:`SequenceGroup`
    that also holds its ``ulysses`` and ``ring`` factors.
    ``replica``: all ranks serving one request (``cfg x sp``), over which steps are checked.
    ``world``: every rank (e.g. to pool calibration statistics over replicas and nodes).
    """

    config: ParallelConfig
    rank: int
    coords: RankCoords
    cfg: Group
    sp: SequenceGroup
    replica: Group
    world: Group
    device: torch.device

    @property
    def dp_rank(self) -> int:
        """Index of the replica this rank belongs to."""
        return self.coords.dp_rank

    @property
    def branch(self) -> bool | None:
        """Under CFG-parallel the one branch this rank runs (cfg rank 0: cond = True, 1: uncond =
        False); ``None`` when ``cfg_degree`` is 1 and the rank runs both."""
        if self.config.cfg_degree == 1:
            return None
        return self.coords.cfg_rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.config.world_size > 1

    def describe(self) -> str:
        c = self.coords
        return f"rank {self.rank} (dp {c.dp_rank}, cfg {c.cfg_rank}, sp {c.sp_rank})"

    @classmethod
    def single(cls, device: torch.device | str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelGroups:
        """World 1: every group has one member and nothing touches ``torch.distributed``."""
        timeout = datetime.timedelta(seconds=timeout_s)
        return cls(
            config=ParallelConfig(),
            rank=0,
            coords=RankCoords(0, 0, 0),
            cfg=_single_group("cfg", 0, timeout),
            sp=SequenceGroup.of(*(_single_group(name, 0, timeout) for name in ("sp", "ulysses", "ring"))),
            replica=_single_group("replica", 0, timeout),
            world=_single_group("world", 0, timeout),
            device=torch.device(device),
        )

    @classmethod
    def build(
        cls,
        config: ParallelConfig,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> ParallelGroups:
        """Create the groups on an initialised default process group (collective: call on every rank)."""
        if not dist.is_initialized():
            if config.world_size == 1:
                return cls.single(device, timeout_s)
            raise CacheConfigError("ParallelGroups.build needs torch.distributed initialised; use init_parallel")
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != config.world_size:
            raise CacheConfigError(
                f"ParallelConfig.world_size is {config.world_size} but the process group has {world} ranks"
            )
        timeout = datetime.timedelta(seconds=timeout_s)
        sp = _new_groups("sp", config.sp_group_ranks(), rank, timeout)
        if 1 < config.ring_degree < config.sp_degree:
            ulysses = _new_groups("ulysses", config.ulysses_group_ranks(), rank, timeout)
            ring = _new_groups("ring", config.ring_group_ranks(), rank, timeout)
        else:  # one factor is the whole SP group: it reuses the SP process group
            one = _single_group("", rank, timeout)
            ulysses, ring = (one, sp) if config.ring_degree > 1 else (sp, one)
        groups = {
            "sp": SequenceGroup.of(sp, ulysses, ring),
            "cfg": _new_groups("cfg", config.cfg_group_ranks(), rank, timeout),
            "replica": _new_groups("replica", config.replica_group_ranks(), rank, timeout),
            "world": Group("world", tuple(range(world)), rank, dist.group.WORLD if world > 1 else None, timeout),
        }
        return cls(config=config, rank=rank, coords=config.coords(rank), device=torch.device(device), **groups)


def _new_groups(
    name: str, all_ranks: list[tuple[int, ...]], rank: int, timeout: datetime.timedelta
) -> Group:
    """Create every group of one mesh dimension (new_group is collective over the world, so every
    rank creates all of them in the same order) and return the one containing ``rank``."""
    mine: Group | None = None
    for ranks in all_ranks:
        pg = dist.new_group(list(ranks), timeout=timeout, group_desc=f"ditcache_{name}") if len(ranks) > 1 else None
        if rank in ranks:
            mine = Group(name=name, ranks=ranks, rank=ranks.index(rank), pg=pg, timeout=timeout)
    assert mine is not None, f"rank {rank} is in no {name} group"  # the layout covers every rank
    return mine


def default_backend() -> str:
    """``nccl`` when CUDA is available, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_parallel(
    cfg_degree: int = 1,
    sp_degree: int = 1,
    *,
    ring_degree: int = 1,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ParallelGroups:
    """Set up this rank from the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``/``MASTER_PORT``), or return a world-1 instance when started without it.

    ``sp_degree`` ranks share one sequence, ``ring_degree`` of them in a ring of Ulysses groups
    (``init_parallel(1, 8, ring_degree=2)``: ulysses 4 x ring 2). Initialises the default process
    group (``backend`` chosen automatically, ``timeout_s`` applies to it and to every ditcache
    collective) unless one already exists.
    """
    config = ParallelConfig.from_env(cfg_degree, sp_degree, ring_degree=ring_degree)
    backend = backend or (dist.get_backend() if dist.is_initialized() else default_backend())
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if config.world_size == 1 and not dist.is_initialized():
        return ParallelGroups.single(device, timeout_s)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        store = join_store(rank, config.world_size, timeout_s)
        dist.init_process_group(
            backend=backend, store=store, rank=rank, world_size=config.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    # On the default group before any subgroup: ranks with different layouts would otherwise wait
    # forever in group creations their peers never start.
    ranks, timeout = tuple(range(dist.get_world_size())), datetime.timedelta(seconds=timeout_s)
    world = Group("world", ranks, dist.get_rank(), dist.group.WORLD if len(ranks) > 1 else None, timeout)
    check_layout(config, world, device)
    return ParallelGroups.build(config, device=device, timeout_s=timeout_s)


def destroy_parallel(groups: ParallelGroups) -> None:
    """Tear down the process groups created for ``groups`` (no-op for a world-1 instance)."""
    if groups.is_distributed and dist.is_initialized():
        dist.destroy_process_group()
