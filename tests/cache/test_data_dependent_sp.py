"""Data-dependent caches under Ulysses SP: every rank takes the same decisions, equal to one process.

The bundled reference model (3 heads, 64 image tokens) runs on SP 3 over gloo, so each rank holds a
third of the tokens (22 + 22 + 20, the last shard padded). TeaCache (on the modulation, and on the
block-stack input as for a family without one) and FirstBlockCache reduce their statistic with
``ctx.group_sum``: their runs equal the single-process run and every rank reports the same
computed steps. The same rules deciding on their own shard's statistic disagree between ranks, and
the runtime's step sync turns that into a StepSyncError on every rank instead of a hang.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch

from ditcache.cache import FirstBlockCache, TeaCacheRule, cache_config
from ditcache.cache.context import StepArg, local_sum
from ditcache.errors import StepSyncError
from ditcache.models import REFERENCE_DIGITS
from ditcache.parallel import ParallelGroups, init_parallel
from ditcache.parallel.testing import run_ranks, values_or_raise
from ditcache.families import load_pipeline

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(not (REFERENCE_DIGITS / "model_index.json").is_file(), reason="no bundled reference model"),
]

SP = 3
STEPS = 12
TOL = 1e-5
CALL = dict(prompt=["a handwritten 3", "a handwritten 8"], num_inference_steps=STEPS, seed=7, progress=False)


class TeaCacheOnInput(TeaCacheRule):
    """TeaCache as a family that exposes no modulation gets it: deciding on the (sharded) stack input."""

    def should_compute(self, ctx: StepArg) -> bool:
        return super().should_compute(replace(ctx, modulation=None))


class LocalTeaCacheOnInput(TeaCacheRule):
    """TeaCache on the stack input WITHOUT the group reduction: each rank decides on its own shard."""

    def should_compute(self, ctx: StepArg) -> bool:
        return super().should_compute(replace(ctx, modulation=None, group_sum=local_sum))


class LocalFirstBlockCache(FirstBlockCache):
    """FirstBlockCache WITHOUT the group reduction: each rank decides on its shard's first block."""

    def should_compute(self, ctx: StepArg) -> bool:
        return super().should_compute(replace(ctx, group_sum=local_sum))


def _caches() -> dict[str, Any]:
    """name -> what ``cache=`` gets: a config, or a built cache of a test subclass."""
    return {
        "teacache": cache_config("teacache", thresh=0.3, warmup=2),
        "teacache_on_input": TeaCacheOnInput(STEPS, thresh=0.15, warmup=2),
        "first_block": cache_config("first_block", threshold=0.08),
    }


# Thresholds where the shards' own statistics straddle the threshold at some step (first block:
# at cond step 3 the three shards measure 0.099, 0.121 and 0.098), so local decisions must diverge.
LOCAL = {
    "teacache_on_input": lambda: LocalTeaCacheOnInput(STEPS, thresh=0.15, warmup=2),
    "first_block": lambda: LocalFirstBlockCache(STEPS, threshold=0.11),
}


def _run(parallel: ParallelGroups | None) -> dict[str, dict[str, Any]]:
    pipe = load_pipeline(REFERENCE_DIGITS, parallel=parallel)
    results = {}
    with torch.no_grad():
        for name, cache in _caches().items():
            out = pipe(**CALL, cache=cache)
            results[name] = {"frames": out.frames, "decisions": out.cache_stats["transformer"]}
    return results


def _job(rank: int, world: int) -> dict[str, Any]:
    groups = init_parallel(1, world, timeout_s=120)
    result: dict[str, Any] = {"runs": _run(groups), "local_errors": {}}
    pipe = load_pipeline(REFERENCE_DIGITS, parallel=groups)
    for name, make in LOCAL.items():
        try:
            with torch.no_grad():
                pipe(**CALL, cache=make())
        except StepSyncError as exc:
            result["local_errors"][name] = str(exc)
    return result


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    return values_or_raise(run_ranks(_job, SP, timeout_s=300))


@pytest.fixture(scope="module")
def single_process() -> dict[str, dict[str, Any]]:
    return _run(None)


def test_every_rank_decides_like_one_process(ranks, single_process):
    for name, ref in single_process.items():
        computed = ref["decisions"]["cond"]["computed_steps"]
        assert 2 <= len(computed) < STEPS, (name, computed)  # the rule does skip here
        for rank, result in enumerate(ranks):
            got = result["runs"][name]
            assert got["decisions"] == ref["decisions"], (name, rank)
            diff = (got["frames"] - ref["frames"]).abs().max().item()
            assert diff <= TOL, (name, rank, diff)


def test_without_the_group_reduction_every_rank_raises_step_sync_error(ranks):
    for result in ranks:
        assert set(result["local_errors"]) == set(LOCAL)
        for message in result["local_errors"].values():
            assert "disagrees on compute/skip" in message and "must reduce its statistic over the SP group" in message
