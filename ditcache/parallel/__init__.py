"""Parallel layer: process groups (dp x cfg x sp, sp = ulysses x ring), CFG-parallel, Ulysses and
ring attention, step sync.

Nothing here imports xfuser; everything runs on gloo (CPU) or nccl (GPU), and on one process without
``torch.distributed`` at all (:meth:`ParallelGroups.single`).
"""

from ditcache.parallel.calibration import pool_calibration
from ditcache.parallel.cfg import CfgParallel, combine_guidance
from ditcache.parallel.config import MESH_DIM_NAMES, ParallelConfig, RankCoords
from ditcache.parallel.fingerprint import (
    REPLICA_FIELDS,
    RequestFingerprint,
    cache_description,
    cache_params,
    check_layout,
    check_request,
    fingerprint_hash,
    model_identity,
    params_hash,
    prompt_hash,
    sigmas_hash,
)
from ditcache.parallel.groups import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    Group,
    ParallelGroups,
    SequenceGroup,
    default_backend,
    destroy_parallel,
    init_parallel,
)
from ditcache.parallel.step_sync import StepSync, SyncedCache
from ditcache.parallel.ulysses import (
    UlyssesContext,
    UlyssesProcessor,
    apply_ulysses,
    gather_tokens,
    remove_ulysses,
    shard_tokens,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "MESH_DIM_NAMES",
    "REPLICA_FIELDS",
    "CfgParallel",
    "CollectiveError",
    "Group",
    "ParallelConfig",
    "ParallelGroups",
    "RankCoords",
    "RequestFingerprint",
    "SequenceGroup",
    "StepSync",
    "SyncedCache",
    "UlyssesContext",
    "UlyssesProcessor",
    "apply_ulysses",
    "cache_description",
    "cache_params",
    "check_layout",
    "check_request",
    "combine_guidance",
    "default_backend",
    "destroy_parallel",
    "fingerprint_hash",
    "gather_tokens",
    "init_parallel",
    "model_identity",
    "params_hash",
    "pool_calibration",
    "prompt_hash",
    "remove_ulysses",
    "shard_tokens",
    "sigmas_hash",
]
