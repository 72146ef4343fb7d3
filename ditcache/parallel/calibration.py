"""Pool calibration statistics over every rank, so 1, 2 or 64 ranks measure the same curve.

A :class:`~ditcache.cache.calibrator.Calibrator` keeps float64 sums and integer counts of per-token
magnitude ratios per (branch, step). Every way a run is split adds up exactly: SP ranks saw disjoint
token shards, CFG ranks saw one branch each (zeros in the other row), data-parallel replicas saw
different prompts. One sum all-reduce over the world group therefore gives every rank the statistics
of the whole run. Only the per-branch request counts are not additive over SP (every rank of an SP
group finishes the same request), so only SP rank 0 contributes them.
"""

from __future__ import annotations

import numpy as np

from ditcache.cache.calibrator import CalibrationStats, Calibrator
from ditcache.parallel.groups import ParallelGroups


def pool_calibration(calibrator: Calibrator, groups: ParallelGroups) -> None:
    """Replace ``calibrator``'s statistics by the sum over all ranks (collective: call on every rank)."""
    stats = calibrator.statistics
    if groups.coords.sp_rank != 0:
        stats = CalibrationStats(stats.num_steps, stats.sums, stats.counts, np.zeros_like(stats.requests))
    packed = stats.to_tensor().to(groups.device)
    total = groups.world.all_reduce_sum(packed, op="calibration statistics all_reduce")
    calibrator.load_stats_tensor(total.cpu())
