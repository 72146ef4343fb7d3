"""CFG-parallel: which branch(es) a rank runs and how the two predictions meet again.

With ``cfg_degree == 2`` cfg rank 0 runs the conditional branch and cfg rank 1 the unconditional
one, each advancing only its own branch's cache counter; after the model call the two predictions
are all-gathered over the cfg group and every rank computes the same guided prediction, so the
latents stay identical on all ranks without a broadcast. With ``cfg_degree == 1`` a rank runs both
branches itself (or only the conditional one when guidance is off).

Guidance off with ``cfg_degree == 2`` is a configuration error, not a fallback: there is no second
branch to give the partner rank, and silently idling half the ranks is what this project avoids.
Give those ranks to sequence parallelism or to data-parallel replicas instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ditcache.errors import CacheConfigError
from ditcache.parallel.groups import Group, ParallelGroups


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + g * (cond - uncond)``."""
    return uncond + guidance_scale * (cond - uncond)


@dataclass(frozen=True)
class CfgParallel:
    """This rank's share of the CFG branches and the combine of their predictions.

    Typical use, once per denoising step::

        preds = {is_cond: model(latents, is_cond=is_cond) for is_cond in cfgp.branches}
        noise_pred = cfgp.combine(preds, guidance_scale)
    """

    group: Group
    guidance: bool

    def __post_init__(self) -> None:
        if self.group.size not in (1, 2):
            raise CacheConfigError(f"the cfg group must have 1 or 2 ranks, got {self.group.size}")
        if self.group.size == 2 and not self.guidance:
            raise CacheConfigError(
                "CFG-parallel (cfg_degree=2) needs classifier-free guidance, but guidance is off "
                "(no unconditional branch to give the second rank); use cfg_degree=1 and put those "
                "ranks into sequence parallelism (sp_degree) or data-parallel replicas"
            )

    @classmethod
    def from_groups(cls, groups: ParallelGroups, guidance: bool) -> CfgParallel:
        return cls(group=groups.cfg, guidance=guidance)

    @property
    def branches(self) -> tuple[bool, ...]:
        """The ``is_cond`` values this rank runs each step, in order."""
        if self.group.size == 2:
            return (self.group.rank == 0,)
        return (True, False) if self.guidance else (True,)

    def gather(self, preds: dict[bool, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(cond, uncond)`` predictions from this rank's ``{is_cond: prediction}``, identical on every
        rank of the cfg group; ``uncond`` is None when guidance is off."""
        if set(preds) != set(self.branches):
            raise ValueError(f"expected predictions for branches {self.branches}, got {sorted(preds)}")
        if not self.guidance:
            return preds[True], None
        if self.group.size == 2:
            # cfg rank 0 holds cond, rank 1 uncond: the gather order is the branch order
            cond, uncond = self.group.all_gather(preds[self.branches[0]], op="cfg all_gather (predictions)")
            return cond, uncond
        return preds[True], preds[False]

    def combine(
        self,
        preds: dict[bool, torch.Tensor],
        guidance_scale: float,
        rule: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = combine_guidance,
    ) -> torch.Tensor:
        """The guided prediction (same on every rank of the cfg group), or the conditional prediction
        when guidance is off. ``rule(cond, uncond, scale)`` lets a family use its own guidance
        (Qwen-Image rescales the result to the conditional prediction's norm)."""
        cond, uncond = self.gather(preds)
        return cond if uncond is None else rule(cond, uncond, guidance_scale)
