"""StepSync / SyncedCache: rank divergence raises StepSyncError on every rank, never a hang."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.none import NoCache
from ditcache.errors import RendezvousError, StepSyncError
from ditcache.parallel import CfgParallel, ParallelGroups, StepSync, SyncedCache, init_parallel
from ditcache.parallel.testing import run_ranks, values_or_raise

pytestmark = pytest.mark.distributed  # every test here runs 2 or 4 ranks

STEPS = 6


class _ScriptedCache(BaseFeatureCache):
    """Skips the steps listed per branch (a deterministic schedule, possibly rank-dependent)."""

    def __init__(self, skip: dict[bool, set[int]]) -> None:
        self.skip = skip
        self.step: dict[bool, int] = {}

    def should_compute(self, is_cond: bool) -> bool:
        self.step[is_cond] = self.step.get(is_cond, -1) + 1
        return self.step[is_cond] not in self.skip.get(is_cond, set())

    def update(self, output, ori_input, is_cond):
        pass

    def approximate(self, input, is_cond):
        return input

    def reset(self):
        self.step.clear()

    def current_step(self, is_cond: bool) -> int:
        return self.step.get(is_cond, -1)


def _denoise(groups: ParallelGroups, cache: BaseFeatureCache) -> tuple[str, object]:
    """Run the decisions of a STEPS-step request; ('ok', decisions) or ('StepSyncError', message)."""
    synced = SyncedCache(cache, StepSync.for_groups(groups))
    branches = CfgParallel.from_groups(groups, guidance=True).branches
    decisions = []
    try:
        for _ in range(STEPS):
            decisions.append([synced.should_compute(is_cond) for is_cond in branches])
    except StepSyncError as exc:
        return "StepSyncError", str(exc)
    return "ok", decisions


def _cfg_sp_cases(rank: int, world: int) -> dict:
    groups = init_parallel(2, 2, timeout_s=90)
    out = {}
    # rank-consistent: the cond SP group skips 2 and 3, the uncond SP group only 3
    out["matching"] = _denoise(groups, _ScriptedCache({True: {2, 3}, False: {3}}))
    # rank 3 (uncond, sp 1) alone skips step 3
    out["rank_dependent"] = _denoise(groups, _ScriptedCache({groups.branch: {3} if rank == 3 else set()}))
    sync = StepSync.for_groups(groups)
    try:  # the CFG partner of rank 1 (rank 3) is one step ahead
        sync.check(groups.branch, 4 if rank == 3 else 3, True)
    except StepSyncError as exc:
        out["step_mismatch"] = str(exc)
    try:  # both cfg ranks run the cond branch
        sync.check(True, 0, True)
    except StepSyncError as exc:
        out["wrong_branch"] = str(exc)
    out["after_errors_still_in_sync"] = _denoise(groups, NoCache())[0]
    return out


def _sp_only_cases(rank: int, world: int) -> dict:
    groups = init_parallel(1, 2, timeout_s=3)
    out = {}

    class LocalStatisticCache(_ScriptedCache):
        """Decides on a statistic of its own token shard, with no all-reduce (the cache-dit bug)."""

        def should_compute(self, is_cond: bool) -> bool:
            super().should_compute(is_cond)
            local_shard = torch.full((4,), 1.0 if rank == 0 else -1.0)
            return bool(local_shard.mean() > 0)

    out["data_dependent"] = _denoise(groups, LocalStatisticCache({}))
    sync = StepSync.for_groups(groups)
    start = time.monotonic()
    if rank == 0:
        try:  # rank 1 never arrives at this check
            sync.check(True, 7, True)
        except StepSyncError as exc:
            out["timeout"] = (str(exc), time.monotonic() - start)
    else:
        time.sleep(5)  # alive but elsewhere: the error must come from the deadline, not a closed socket
    return out


def _killed_peer_case(rank: int, world: int) -> tuple[str, float] | None:
    groups = init_parallel(1, 2, timeout_s=20)
    sync = StepSync.for_groups(groups)
    sync.check(True, 0, True)  # both ranks are up and connected
    if rank == 1:
        os._exit(9)  # dies like a SIGKILL: no cleanup, its sockets close
    start = time.monotonic()
    try:
        sync.check(True, 1, True)
    except StepSyncError as exc:
        return str(exc), time.monotonic() - start
    return None


@pytest.fixture(scope="module")
def cfg2_sp2() -> list[dict]:
    return values_or_raise(run_ranks(_cfg_sp_cases, 4, timeout_s=240))


def test_matching_decisions_pass(cfg2_sp2):
    for rank, r in enumerate(cfg2_sp2):
        status, decisions = r["matching"]
        assert status == "ok", decisions
        skipped = {2, 3} if rank < 2 else {3}  # ranks 0, 1 run cond; 2, 3 uncond
        assert [d[0] for d in decisions] == [s not in skipped for s in range(STEPS)]


def test_rank_dependent_skip_raises_on_every_rank(cfg2_sp2):
    messages = []
    for r in cfg2_sp2:
        status, message = r["rank_dependent"]
        assert status == "StepSyncError"
        messages.append(message)
    assert len(set(messages)) == 1  # every rank tells the same story
    msg = messages[0]
    assert "ranks diverged at step 3" in msg
    assert "the SP group of ranks 2, 3 disagrees on compute/skip (rank 2 compute, rank 3 skip);" in msg
    assert "rank 3 (cfg 1, sp 1): uncond step 3 skip" in msg
    assert "ranks 0, 1" not in msg  # the cond SP group agreed


def test_cfg_partner_step_mismatch_and_wrong_branch(cfg2_sp2):
    for r in cfg2_sp2:
        assert "step counters differ" in r["step_mismatch"] and "rank 3 at step 4" in r["step_mismatch"]
        assert "wrong branch under CFG-parallel" in r["wrong_branch"]
        assert "(rank 2 (cfg rank 1) runs cond, rank 3 (cfg rank 1) runs cond)" in r["wrong_branch"]
        assert r["after_errors_still_in_sync"] == "ok"


@pytest.fixture(scope="module")
def sp2() -> list[dict]:
    return values_or_raise(run_ranks(_sp_only_cases, 2, timeout_s=180))


def test_data_dependent_cache_is_caught(sp2):
    for r in sp2:
        status, message = r["data_dependent"]
        assert status == "StepSyncError"
        assert "at step 0" in message and "(rank 0 compute, rank 1 skip)" in message


def test_missing_peer_times_out_with_step_sync_error(sp2):
    message, waited = sp2[0]["timeout"]
    assert "step sync at step 7 (cond branch) did not complete" in message
    assert "timed out after 3 s" in message
    assert waited < 5  # the 3 s deadline, not rank 1 finishing its sleep


def test_a_killed_peer_is_reported_as_gone_not_as_slow():
    survivor, killed = run_ranks(_killed_peer_case, 2, timeout_s=120)
    assert killed.error_type == "Died"
    message, waited = survivor.value
    assert "step sync at step 1 (cond branch) did not complete" in message
    assert "a peer closed its connection: it exited or crashed" in message
    assert waited < 20, "the survivor learns of the death from the closed socket, not the deadline"


def _late_rank_case(rank: int, world: int) -> str | None:
    if rank == 1:
        time.sleep(3.5)  # starts after rank 0's deadline
        return None
    try:
        init_parallel(1, 1, timeout_s=2)
    except RendezvousError as exc:
        return str(exc)
    return None


def test_a_rank_that_never_joins_is_named_at_setup():
    first, _ = values_or_raise(run_ranks(_late_rank_case, 2, timeout_s=120))
    assert re.fullmatch(
        r"rank 0: rank 1 of 2 did not join the job at 127\.0\.0\.1:\d+ within 2 s; start every rank \(or raise --timeout\)",
        first,
    ), first
