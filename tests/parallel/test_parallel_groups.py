"""Process groups: layout, per-rank groups and branch, CFG combine, bad configs, world 1."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from ditcache.errors import CacheConfigError
from ditcache.parallel import CfgParallel, ParallelConfig, ParallelGroups, RankCoords, init_parallel
from ditcache.parallel.groups import destroy_parallel
from ditcache.parallel.testing import run_ranks, values_or_raise


# ---------------------------------------------------------------- config (no processes)


def test_layout_sp_innermost_then_cfg_then_dp():
    cfg = ParallelConfig(cfg_degree=2, sp_degree=2, world_size=8)
    assert cfg.dp_degree == 2 and cfg.mesh_shape == (2, 2, 2)
    assert cfg.coords(5) == RankCoords(dp_rank=1, cfg_rank=0, sp_rank=1)
    assert all(cfg.rank_of(cfg.coords(r)) == r for r in range(8))
    assert cfg.sp_group_ranks() == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert cfg.cfg_group_ranks() == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert cfg.replica_group_ranks() == [(0, 1, 2, 3), (4, 5, 6, 7)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cfg_degree=2, sp_degree=2, world_size=6), "not divisible by cfg_degree x sp_degree"),
        (dict(cfg_degree=3, sp_degree=1, world_size=3), "must be 1 or 2"),
        (dict(cfg_degree=1, sp_degree=0, world_size=2), "sp_degree must be an integer >= 1"),
        (dict(cfg_degree=True, sp_degree=1, world_size=2), "cfg_degree must be an integer"),
        (dict(cfg_degree=1, sp_degree=2.0, world_size=2), "sp_degree must be an integer"),
    ],
)
def test_bad_configs_are_clear_errors(kwargs, match):
    with pytest.raises(CacheConfigError, match=match):
        ParallelConfig(**kwargs)


def test_from_env_reads_world_size():
    assert ParallelConfig.from_env(2, 2, env={"WORLD_SIZE": "8"}).dp_degree == 2
    assert ParallelConfig.from_env(env={}).world_size == 1
    with pytest.raises(CacheConfigError, match="WORLD_SIZE='four'"):
        ParallelConfig.from_env(env={"WORLD_SIZE": "four"})
    with pytest.raises(CacheConfigError, match="not divisible"):
        ParallelConfig.from_env(1, 3, env={"WORLD_SIZE": "4"})


def test_world_one_needs_no_torch_distributed(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    groups = init_parallel()
    assert not dist.is_initialized()
    assert groups.rank == 0 and groups.branch is None and not groups.is_distributed
    assert groups.sp.size == groups.cfg.size == groups.replica.size == 1
    x = torch.arange(3.0)
    assert groups.sp.all_gather(x)[0] is x
    assert torch.equal(groups.world.all_reduce_sum(x), x)
    cfgp = CfgParallel.from_groups(groups, guidance=True)
    assert cfgp.branches == (True, False)
    out = cfgp.combine({True: torch.full((2,), 3.0), False: torch.ones(2)}, guidance_scale=2.0)
    assert torch.equal(out, torch.full((2,), 5.0))
    preds = {True: torch.full((2,), 3.0), False: torch.ones(2)}
    assert torch.equal(cfgp.combine(preds, 2.0, rule=lambda c, u, g: c * g - u), torch.full((2,), 5.0))
    with pytest.raises(ValueError, match="expected predictions for branches"):
        cfgp.combine({True: torch.ones(2)}, 2.0)
    assert CfgParallel.from_groups(groups, guidance=False).branches == (True,)
    with pytest.raises(CacheConfigError, match="needs torch.distributed"):
        ParallelGroups.build(ParallelConfig(1, 2, 2))


# ---------------------------------------------------------------- distributed (gloo on CPU)


def _probe(rank: int, world: int, cfg_degree: int, sp_degree: int) -> dict:
    groups = init_parallel(cfg_degree, sp_degree, timeout_s=90)
    assert dist.get_backend() == "gloo"
    me = torch.tensor([rank])
    probe = {
        "coords": groups.coords,
        "branch": groups.branch,
        "sp": groups.sp.ranks,
        "cfg": groups.cfg.ranks,
        "replica": groups.replica.ranks,
        # the groups really connect those ranks: gathering the global rank returns the members
        "sp_gathered": tuple(int(t) for t in groups.sp.all_gather(me)),
        "cfg_gathered": tuple(int(t) for t in groups.cfg.all_gather(me)),
        "sp_sum": int(groups.sp.all_reduce_sum(me)),
        "world_sum": int(groups.world.all_reduce_sum(me)),
    }
    if cfg_degree == 2:
        cfgp = CfgParallel.from_groups(groups, guidance=True)
        (branch,) = cfgp.branches
        pred = torch.full((3,), 10.0 if branch else 4.0)  # cond = 10, uncond = 4
        probe["gathered"] = [t[0].item() for t in cfgp.gather({branch: pred})]
        probe["combined"] = cfgp.combine({branch: pred}, guidance_scale=1.5).tolist()  # 4 + 1.5 * 6
        try:
            CfgParallel.from_groups(groups, guidance=False)
        except CacheConfigError as exc:
            probe["guidance_off_error"] = str(exc)
    return probe


LAYOUTS = {
    # (world, cfg, sp): per rank (coords, branch, sp ranks, cfg ranks)
    (4, 2, 2): [
        (RankCoords(0, 0, 0), True, (0, 1), (0, 2)),
        (RankCoords(0, 0, 1), True, (0, 1), (1, 3)),
        (RankCoords(0, 1, 0), False, (2, 3), (0, 2)),
        (RankCoords(0, 1, 1), False, (2, 3), (1, 3)),
    ],
    (2, 2, 1): [
        (RankCoords(0, 0, 0), True, (0,), (0, 1)),
        (RankCoords(0, 1, 0), False, (1,), (0, 1)),
    ],
    (2, 1, 2): [
        (RankCoords(0, 0, 0), None, (0, 1), (0,)),
        (RankCoords(0, 0, 1), None, (0, 1), (1,)),
    ],
}


@pytest.mark.distributed
@pytest.mark.parametrize("world, cfg_degree, sp_degree", list(LAYOUTS), ids=["cfg2xsp2", "cfg-only", "sp-only"])
def test_groups_per_rank(world, cfg_degree, sp_degree):
    probes = values_or_raise(run_ranks(_probe, world, cfg_degree, sp_degree, timeout_s=240))
    for rank, (probe, (coords, branch, sp, cfg)) in enumerate(zip(probes, LAYOUTS[(world, cfg_degree, sp_degree)])):
        assert probe["coords"] == coords, rank
        assert probe["branch"] is branch, rank
        assert probe["sp"] == probe["sp_gathered"] == sp, rank
        assert probe["cfg"] == probe["cfg_gathered"] == cfg, rank
        assert probe["replica"] == tuple(range(world)), rank
        assert probe["sp_sum"] == sum(sp) and probe["world_sum"] == sum(range(world)), rank
        if cfg_degree == 2:
            assert probe["gathered"] == [10.0, 4.0]  # (cond, uncond) on every rank
            assert probe["combined"] == [13.0] * 3
            assert "needs classifier-free guidance" in probe["guidance_off_error"]


def _sessions(rank: int, world: int, slow: int) -> list[float]:
    """Three set-ups and tear-downs in a row in the same ranks, ``slow`` leaving each one late."""
    sums = []
    for session in range(3):
        groups = init_parallel(1, 1, timeout_s=60)
        value = torch.tensor([float(rank + session)])
        dist.all_reduce(value)
        sums.append(float(value))
        if rank == slow:
            time.sleep(1.0)  # the others are already joining the next session
        destroy_parallel(groups)
    return sums


@pytest.mark.distributed
@pytest.mark.parametrize("slow", [0, 1], ids=["store-host-late", "peer-late"])
def test_a_process_can_set_up_groups_again(slow):
    """A second join in the same processes forms a new group of the same ranks: an early rank neither
    rebinds the store's port nor matches the first group's keys (it waits for its own session's peers)."""
    sums = values_or_raise(run_ranks(_sessions, 4, slow, timeout_s=240))
    assert sums == [[6.0, 10.0, 14.0]] * 4
