"""How the ranks of a run are split into data-parallel replicas, CFG branches and sequence shards.

Rank layout (the same on every rank, derived from the config alone, no communication)::

    rank = dp_rank * (cfg_degree * sp_degree) + cfg_rank * sp_degree + sp_rank

i.e. a mesh of shape ``(dp, cfg, sp)`` with dimension names ``("dp", "cfg", "sp")`` in the style of
``torch.distributed.device_mesh``. ``sp`` is the innermost dimension because sequence parallelism
communicates in every attention layer, so its ranks should be neighbours (same node, fastest link);
the CFG pair exchanges one prediction per step and the replicas never talk.

The sequence-parallel degree factors as ``ulysses x ring`` (USP)::

    sp_rank = ring_rank * ulysses_degree + ulysses_rank

Ulysses is innermost: its all-to-all moves every token of every attention layer, while a ring step
passes one key/value chunk to the next ring rank and overlaps with the attention of the previous
one. Ulysses splits the heads, so its degree must divide the head count; the ring splits the
sequence only, so it takes the rest (Wan2.1-1.3B's 12 heads on 8 ranks: ``ulysses 4 x ring 2``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from ditcache.errors import CacheConfigError

MESH_DIM_NAMES: tuple[str, str, str] = ("dp", "cfg", "sp")


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the ``(dp, cfg, sp)`` mesh."""

    dp_rank: int
    cfg_rank: int
    sp_rank: int


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of CFG-parallelism and sequence parallelism over ``world_size`` ranks.

    ``cfg_degree`` is 1 (each rank runs both CFG branches one after the other) or 2 (cfg rank 0 runs
    the conditional branch, cfg rank 1 the unconditional one). ``sp_degree`` ranks share one
    sequence: ``ring_degree`` of them pass key/value chunks around a ring, and each ring position is
    a Ulysses group of ``sp_degree // ring_degree`` ranks that split the heads. Whatever is left
    over, ``world_size // (cfg_degree * sp_degree)``, are independent data-parallel replicas that
    serve different requests.
    """

    cfg_degree: int = 1
    sp_degree: int = 1
    world_size: int = 1
    ring_degree: int = 1

    def __post_init__(self) -> None:
        for name in ("cfg_degree", "sp_degree", "world_size", "ring_degree"):
            value = getattr(self, name)
            # bool is an int subclass; True as a degree is always a caller mistake
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise CacheConfigError(f"ParallelConfig.{name} must be an integer >= 1, got {value!r}")
        if self.cfg_degree not in (1, 2):
            raise CacheConfigError(
                f"ParallelConfig.cfg_degree must be 1 or 2 (there are only two CFG branches), "
                f"got {self.cfg_degree}"
            )
        if self.sp_degree % self.ring_degree != 0:
            raise CacheConfigError(
                f"ParallelConfig.ring_degree {self.ring_degree} does not divide sp_degree {self.sp_degree}: the "
                f"sequence-parallel degree is ulysses x ring (--ulysses U --ring R gives sp_degree U * R)"
            )
        if self.world_size % self.model_parallel_size != 0:
            raise CacheConfigError(
                f"world_size {self.world_size} is not divisible by cfg_degree x sp_degree = "
                f"{self.cfg_degree} x {self.sp_degree} = {self.model_parallel_size}; choose degrees whose "
                f"product divides the number of ranks"
            )

    @property
    def model_parallel_size(self) -> int:
        """Ranks that cooperate on one request: ``cfg_degree * sp_degree``."""
        return self.cfg_degree * self.sp_degree

    @property
    def ulysses_degree(self) -> int:
        """Ranks of one ring position, which split the attention heads: ``sp_degree // ring_degree``."""
        return self.sp_degree // self.ring_degree

    @property
    def dp_degree(self) -> int:
        """Number of independent replicas: ``world_size // (cfg_degree * sp_degree)``."""
        return self.world_size // self.model_parallel_size

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        """Shape of the ``(dp, cfg, sp)`` mesh."""
        return (self.dp_degree, self.cfg_degree, self.sp_degree)

    @property
    def layout(self) -> str:
        """The layout in words, e.g. ``"cfg 2 x sp 2 x dp 1 (4 ranks)"``, or with a ring
        ``"cfg 1 x sp 4 (ulysses 2 x ring 2) x dp 1 (4 ranks)"``."""
        sp = f"sp {self.sp_degree}"
        if self.ring_degree > 1:
            sp += f" (ulysses {self.ulysses_degree} x ring {self.ring_degree})"
        return f"cfg {self.cfg_degree} x {sp} x dp {self.dp_degree} ({self.world_size} ranks)"

    def coords(self, rank: int) -> RankCoords:
        """Mesh coordinates of global ``rank``."""
        if not 0 <= rank < self.world_size:
            raise CacheConfigError(f"rank {rank} is outside world_size {self.world_size}")
        replica, inner = divmod(rank, self.model_parallel_size)
        cfg_rank, sp_rank = divmod(inner, self.sp_degree)
        return RankCoords(dp_rank=replica, cfg_rank=cfg_rank, sp_rank=sp_rank)

    def rank_of(self, coords: RankCoords) -> int:
        """Global rank at mesh coordinates ``coords`` (inverse of :meth:`coords`)."""
        return (
            coords.dp_rank * self.model_parallel_size + coords.cfg_rank * self.sp_degree + coords.sp_rank
        )

    def sp_group_ranks(self) -> list[tuple[int, ...]]:
        """Every SP group (ranks sharing dp and cfg coordinates), each in sp-rank order."""
        return [
            tuple(self.rank_of(RankCoords(d, c, s)) for s in range(self.sp_degree))
            for d in range(self.dp_degree)
            for c in range(self.cfg_degree)
        ]

    def ulysses_group_ranks(self) -> list[tuple[int, ...]]:
        """Every Ulysses group (consecutive SP ranks at one ring position), each in ulysses-rank order."""
        u = self.ulysses_degree
        return [
            tuple(self.rank_of(RankCoords(d, c, r * u + i)) for i in range(u))
            for d in range(self.dp_degree)
            for c in range(self.cfg_degree)
            for r in range(self.ring_degree)
        ]

    def ring_group_ranks(self) -> list[tuple[int, ...]]:
        """Every ring (SP ranks with the same ulysses rank), each in ring order."""
        u = self.ulysses_degree
        return [
            tuple(self.rank_of(RankCoords(d, c, r * u + i)) for r in range(self.ring_degree))
            for d in range(self.dp_degree)
            for c in range(self.cfg_degree)
            for i in range(u)
        ]

    def cfg_group_ranks(self) -> list[tuple[int, ...]]:
        """Every CFG group (ranks sharing dp and sp coordinates), each in cfg-rank order."""
        return [
            tuple(self.rank_of(RankCoords(d, c, s)) for c in range(self.cfg_degree))
            for d in range(self.dp_degree)
            for s in range(self.sp_degree)
        ]

    def replica_group_ranks(self) -> list[tuple[int, ...]]:
        """Every replica (all cfg x sp ranks serving one request), each in rank order."""
        size = self.model_parallel_size
        return [tuple(range(d * size, (d + 1) * size)) for d in range(self.dp_degree)]

    @classmethod
    def from_env(
        cls,
        cfg_degree: int = 1,
        sp_degree: int = 1,
        env: Mapping[str, str] | None = None,
        *,
        ring_degree: int = 1,
    ) -> ParallelConfig:
        """Config for a process started by ``torchrun`` (``WORLD_SIZE``), or world 1 without it."""
        env = os.environ if env is None else env
        raw = env.get("WORLD_SIZE", "1")
        try:
            world_size = int(raw)
        except ValueError:
            raise CacheConfigError(f"environment variable WORLD_SIZE={raw!r} is not an integer") from None
        return cls(cfg_degree=cfg_degree, sp_degree=sp_degree, world_size=world_size, ring_degree=ring_degree)
