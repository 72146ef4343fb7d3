"""Rank-consistency check of cache decisions: divergence becomes a clear error, never a hang.

Every rank serving one request (the replica group, cfg x sp) all-gathers six integers per cache
decision: (global rank, cfg rank, sp rank, branch, step, compute). Every rank then runs the same
checks on the same table, so either all ranks pass or all raise the same :class:`StepSyncError`:

- all ranks are at the same step (CFG partners included);
- the ranks of one SP group run the same branch and take the same compute/skip decision (they
  share one sequence: if one skipped the block stack and another ran it, the others would wait in
  an all-to-all forever or, worse, mix a stale shard into a fresh one);
- under CFG-parallel, cfg rank 0 runs the conditional branch and cfg rank 1 the unconditional one.

:class:`SyncedCache` wraps any cache so that every ``should_compute`` goes through this check, which
also catches caches whose decisions depend on rank-local data (a statistic of the local shard).
"""

from __future__ import annotations

import torch

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.context import StepArg, StepContext, branch_name, branch_of, step_arg
from ditcache.errors import StepSyncError
from ditcache.parallel.groups import CollectiveError, Group, ParallelGroups

_FIELDS = ("rank", "cfg_rank", "sp_rank", "is_cond", "step", "compute")


class StepSync:
    """All-gather and check ``(branch, step, decision)`` over ``group`` (normally the replica group).

    ``cfg_rank``/``sp_rank`` are this rank's mesh coordinates (they say which ranks form an SP
    group); ``cfg_parallel`` says whether cfg rank decides the branch. The collective deadline is the
    group's timeout; ``device`` must suit the backend (CUDA for nccl).
    """

    def __init__(
        self,
        group: Group,
        *,
        cfg_rank: int = 0,
        sp_rank: int = 0,
        cfg_parallel: bool = False,
        device: torch.device | str = "cpu",
        label: str = "feature cache",
    ) -> None:
        self.group = group
        self.cfg_rank = cfg_rank
        self.sp_rank = sp_rank
        self.cfg_parallel = cfg_parallel
        self.device = torch.device(device)
        self.label = label

    @classmethod
    def for_groups(cls, groups: ParallelGroups, label: str = "feature cache") -> StepSync:
        """A check over this rank's replica (all cfg x sp ranks of its request)."""
        return cls(
            groups.replica,
            cfg_rank=groups.coords.cfg_rank,
            sp_rank=groups.coords.sp_rank,
            cfg_parallel=groups.config.cfg_degree == 2,
            device=groups.device,
            label=label,
        )

    def check(self, is_cond: bool, step: int, compute: bool) -> None:
        """Raise :class:`StepSyncError` on every rank unless all ranks agree (see module docstring)."""
        mine = torch.tensor(
            [self.group.global_rank, self.cfg_rank, self.sp_rank, int(is_cond), step, int(compute)],
            dtype=torch.int64,
            device=self.device,
        )
        try:
            gathered = self.group.all_gather(mine, op="step sync all_gather")
        except CollectiveError as exc:
            raise StepSyncError(
                f"{self.label}: step sync at step {step} ({branch_name(is_cond)} branch) did not complete on "
                f"global rank {self.group.global_rank}: {exc.cause or exc}; some rank of the "
                f"{self.group.describe()} raised, died, or made a different number of cache decisions"
            ) from exc
        rows = [dict(zip(_FIELDS, t.tolist())) for t in gathered]
        problems = self._problems(rows)
        if problems:
            raise StepSyncError(_report(self.label, rows, problems))

    def _problems(self, rows: list[dict[str, int]]) -> list[str]:
        problems = []
        steps = {r["step"] for r in rows}
        if len(steps) > 1:
            at = ", ".join(f"rank {r['rank']} at step {r['step']}" for r in rows)
            problems.append(f"step counters differ ({at}); every rank of a request must be at the same step")
        for cfg_rank in sorted({r["cfg_rank"] for r in rows}):
            sp_rows = [r for r in rows if r["cfg_rank"] == cfg_rank]
            ranks = ", ".join(str(r["rank"]) for r in sp_rows)
            if len({r["is_cond"] for r in sp_rows}) > 1:
                problems.append(f"the SP group of ranks {ranks} runs different branches")
            if len({r["compute"] for r in sp_rows}) > 1:
                said = ", ".join(f"rank {r['rank']} {_decision(r)}" for r in sp_rows)
                problems.append(
                    f"the SP group of ranks {ranks} disagrees on compute/skip ({said}); a decision that depends "
                    f"on the local token shard must reduce its statistic over the SP group first"
                )
        if self.cfg_parallel:
            wrong = [r for r in rows if bool(r["is_cond"]) != (r["cfg_rank"] == 0)]
            if wrong:
                said = ", ".join(
                    f"rank {r['rank']} (cfg rank {r['cfg_rank']}) runs {branch_name(bool(r['is_cond']))}"
                    for r in wrong
                )
                problems.append(
                    f"wrong branch under CFG-parallel, where cfg rank 0 runs cond and 1 uncond ({said})"
                )
        return problems


def _decision(row: dict[str, int]) -> str:
    return "compute" if row["compute"] else "skip"


def _report(label: str, rows: list[dict[str, int]], problems: list[str]) -> str:
    steps = sorted({r["step"] for r in rows})
    where = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps}"
    table = "\n".join(
        f"  rank {r['rank']} (cfg {r['cfg_rank']}, sp {r['sp_rank']}): {branch_name(bool(r['is_cond']))} "
        f"step {r['step']} {_decision(r)}"
        for r in rows
    )
    return (
        f"{label}: ranks diverged at {where}: " + "; ".join(problems) + ".\nWhat each rank decided:\n" + table
    )


class SyncedCache(BaseFeatureCache):
    """Any cache, with every ``should_compute`` decision checked across ranks by a :class:`StepSync`.

    The step sent is this wrapper's own count of decisions per branch, so ranks that called the cache
    a different number of times are caught even if the wrapped cache tracks no steps.
    """

    uses_step_context = True

    def __init__(self, cache: BaseFeatureCache, sync: StepSync) -> None:
        self.cache = cache
        self.sync = sync
        self._decisions: dict[bool, int] = {}

    def should_compute(self, ctx: StepArg) -> bool:
        is_cond = branch_of(ctx)
        compute = bool(self.cache.should_compute(self._arg(ctx)))
        step = self._decisions.get(is_cond, -1) + 1
        self._decisions[is_cond] = step
        self.sync.check(is_cond, step, compute)
        return compute

    def update(self, output: torch.Tensor, ori_input: torch.Tensor, ctx: StepArg) -> None:
        self.cache.update(output, ori_input, self._arg(ctx))

    def approximate(self, input: torch.Tensor, ctx: StepArg) -> torch.Tensor:
        return self.cache.approximate(input, self._arg(ctx))

    def _arg(self, ctx: StepArg) -> StepArg:
        return step_arg(self.cache, ctx) if isinstance(ctx, StepContext) else ctx

    def reset(self) -> None:
        self.cache.reset()
        self._decisions.clear()

    def current_step(self, is_cond: StepArg) -> int:
        return self.cache.current_step(is_cond)

    def stats(self) -> dict[str, dict]:
        return self.cache.stats()

    def memory_bytes(self) -> int:
        return self.cache.memory_bytes()

    def release(self) -> None:
        self.cache.release()
