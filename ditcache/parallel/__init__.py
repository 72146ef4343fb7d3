"""Parallel layer: process groups (dp x cfg x sp), CFG-parallel, Ulysses attention, step sync.

Nothing here imports xfuser; everything runs on gloo (CPU) or nccl (GPU), and on one process without
``torch.distributed`` at all (:meth:`ParallelGroups.single`).
"""

from ditcache.parallel.calibration import pool_calibration
from ditcache.parallel.cfg import CfgParallel, combine_guidance
from ditcache.parallel.config import MESH_DIM_NAMES, ParallelConfig, RankCoords
from ditcache.parallel.groups import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    Group,
    ParallelGroups,
    default_backend,
    destroy_parallel,
    init_parallel,
)
from ditcache.parallel.step_sync import StepSync, SyncedCache
from ditcache.parallel.ulysses import (
    UlyssesContext,
    apply_ulysses,
    gather_tokens,
    remove_ulysses,
    shard_tokens,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MESH_DIM_NAMES",
    "CfgParallel",
    "CollectiveError",
    "Group",
    "ParallelConfig",
    "ParallelGroups",
    "RankCoords",
    "StepSync",
    "SyncedCache",
    "UlyssesContext",
    "apply_ulysses",
    "combine_guidance",
    "default_backend",
    "destroy_parallel",
    "gather_tokens",
    "init_parallel",
    "pool_calibration",
    "remove_ulysses",
    "shard_tokens",
]
