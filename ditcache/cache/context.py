"""What a cache sees of the step it decides: :class:`StepContext`.

A schedule fixed in advance (AdaTaylorCache, a fixed interval) needs only the branch; a
data-dependent rule (TeaCache's modulated-input change, FirstBlockCache's first-block residual)
needs the step's input as well. The runtime hands every cache one context per branch per step, so
both kinds fit the same three calls without a custom forward::

    ctx = StepContext(step=i, is_cond=True, hidden_states=x, ...)
    if cache.should_compute(ctx):
        x = blocks(x)
        cache.update(x, ori_x, ctx)
    else:
        x = cache.approximate(x, ctx)

The seed contract passes the bare branch flag (``should_compute(is_cond)``). A cache opts in to
the context with ``uses_step_context = True`` (every cache in ditcache does, and still accepts the
bare flag, see :func:`branch_of`); a cache written to the seed contract gets the flag
(:func:`step_arg`), so ``if is_cond:`` in it keeps meaning what it says.

Under sequence parallelism each rank holds a shard of the tokens, so a statistic of
``hidden_states`` differs between the ranks of one sequence. A data-dependent cache must reduce
its statistic with :meth:`StepContext.group_sum` (a sum over the sequence-parallel group) before
deciding, so every rank of the group takes the same decision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Union

import torch


def local_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over one rank: the tensor itself."""
    return tensor


@dataclass
class StepContext:
    """One cache decision's inputs: the step, the branch, and what the block stack is about to see.

    Attributes:
        step: global denoising step index (None when the caller does not track steps; the cache then
            counts its own).
        is_cond: the CFG branch (True: conditional).
        expert: the transformer running this step ("transformer"; Wan2.2's low-noise expert is
            "transformer_2").
        sigma: the step's noise level, when the sampler has one.
        timestep: the step's model timestep (a float), when known.
        hidden_states: the block stack's input on this rank (its token shard under sequence
            parallelism, padding excluded).
        modulation: the step's timestep modulation of the first block (Wan's ``timestep_proj``,
            TeaCache's ``e0``), when the family exposes one.
        group_sum: sums a tensor over the ranks that share this sequence (identity on one rank).
        first_block: runs the first transformer block on ``hidden_states`` and returns its image
            tokens; computed at most once, and a computed step then continues from it.
    """

    step: int | None
    is_cond: bool
    expert: str = "transformer"
    sigma: float | None = None
    timestep: float | None = None
    hidden_states: torch.Tensor | None = None
    modulation: torch.Tensor | None = None
    group_sum: Callable[[torch.Tensor], torch.Tensor] = local_sum
    first_block: Callable[[], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def branch(self) -> str:
        return branch_name(self.is_cond)


StepArg = Union[StepContext, bool]


def branch_name(is_cond: bool) -> str:
    return "cond" if is_cond else "uncond"


def branch_of(ctx: StepArg) -> bool:
    """The branch flag of a context, or the flag itself (the seed contract's argument)."""
    return ctx.is_cond if isinstance(ctx, StepContext) else bool(ctx)


def step_arg(cache: object, ctx: StepContext) -> StepArg:
    """What ``cache`` is called with: the context if it asks for one, else the seed's branch flag."""
    return ctx if getattr(cache, "uses_step_context", False) else ctx.is_cond
