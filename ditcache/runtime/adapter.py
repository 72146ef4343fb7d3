"""The family-adapter interface: a diffusers transformer re-composed as embed -> blocks -> head.

Every model family (Wan, HunyuanVideo, Qwen-Image) exposes its transformer through a
:class:`FamilyAdapter` that reuses the diffusers submodules and weights but splits the forward into
three parts, so that the runtime can put a feature cache around the block stack only, and a
sequence-parallel (Ulysses) shard/gather around the cached stack::

    state = adapter.embed(hidden_states, timestep, encoder_hidden_states, **extra)   # full tokens
    state = adapter.shard(state, sp)                     # this rank's tokens and per-token kwargs
    out = <cached block stack>(state.hidden_states)      # the cache sees the local shard only
    prediction = adapter.head(sp.gather(out), state)     # full tokens again

Each family's adapter lives in its folder (``ditcache/families/<name>/adapter.py``) and names the
Ulysses attention processors of its transformer; :func:`ditcache.families.adapter_for` finds the
adapter of a transformer instance.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.context import StepContext, branch_name, local_sum, step_arg
from ditcache.errors import CacheConfigError
from ditcache.parallel.ulysses import UlyssesContext, UlyssesProcessor


@dataclass
class StackState:
    """What one forward carries from the embedding to the block stack and the head.

    ``hidden_states`` are the tokens the cache sees (the image stream after patch embedding),
    ``[B, S, D]``. ``block_kwargs`` are per-forward constants handed to every block (time
    modulation, rotary embedding, text tokens, ...). ``head_kwargs`` is what :meth:`FamilyAdapter.head`
    needs to turn tokens back into a prediction (time embedding, the original shape, ...).
    """

    hidden_states: torch.Tensor
    block_kwargs: dict[str, Any]
    head_kwargs: dict[str, Any]


class FamilyAdapter(torch.nn.Module, ABC):
    """A diffusers transformer split into embed / run_blocks / head with a cache around the stack.

    The adapter owns the transformer as a submodule (``self.transformer``), so moving or casting the
    adapter moves the weights; it adds no parameters of its own.

    ``stack_passes`` counts real block-stack runs per branch ("cond", "uncond"); the pipeline
    resets it per request and reports it, independently of what the cache claims it did.
    """

    family: ClassVar[str]
    transformer_class: ClassVar[type[torch.nn.Module]]
    # Stock diffusers attention processor class -> its Ulysses replacement; empty: no sequence parallelism.
    ulysses_processors: ClassVar[Mapping[type, type[UlyssesProcessor]]] = {}

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.stack_passes: dict[str, int] = {}
        self.stack_seconds: dict[str, float] = {}  # wall time inside the block stack, per branch
        self.compile_kwargs: dict[str, Any] | None = None  # what compile_stack was given; None: eager

    @abstractmethod
    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        **extra: Any,
    ) -> StackState:
        """Patch-embed the latents and compute the per-forward constants of the block stack."""

    @abstractmethod
    def iter_blocks(self, state: StackState, hidden_states: torch.Tensor) -> Iterator[torch.Tensor]:
        """Run the transformer blocks in order on ``hidden_states``, yielding the image tokens after each."""

    def run_blocks(self, state: StackState, hidden_states: torch.Tensor) -> torch.Tensor:
        """Run every transformer block on ``hidden_states``; return the image tokens."""
        for hidden_states in self.iter_blocks(state, hidden_states):
            pass
        return hidden_states

    def modulation(self, state: StackState) -> torch.Tensor | None:
        """The first block's timestep modulation, for caches that decide on it (None: not exposed)."""
        return None

    @abstractmethod
    def head(self, hidden_states: torch.Tensor, state: StackState) -> torch.Tensor:
        """Output norm, projection and unpatchify: tokens back to the latent layout."""

    def shard_block_kwargs(self, block_kwargs: dict[str, Any], sp: UlyssesContext) -> dict[str, Any]:
        """``block_kwargs`` for this rank's token shard: every per-token tensor sharded like the tokens
        (``sp.shard_like``), everything else (text tokens, whole-sequence masks) unchanged."""
        raise CacheConfigError(f"the {self.family} adapter does not support sequence parallelism")

    def shard(self, state: StackState, sp: UlyssesContext) -> StackState:
        """This rank's share of ``state``: its token shard (the layout is recorded in ``sp``) and the
        matching block kwargs; ``head_kwargs`` stay whole because the head runs on gathered tokens."""
        tokens = sp.shard(state.hidden_states)
        return StackState(tokens, self.shard_block_kwargs(state.block_kwargs, sp), state.head_kwargs)

    # -- torch.compile ----------------------------------------------------------------------------

    def stack_modules(self) -> list[torch.nn.Module]:
        """The transformer blocks that :meth:`iter_blocks` runs, in order: by default every block of
        the transformer's ``ModuleList`` children whose name ends in ``blocks`` (Wan ``blocks``,
        Qwen-Image ``transformer_blocks``, HunyuanVideo's dual then single blocks)."""
        return [
            block
            for name, child in self.transformer.named_children()
            if name.endswith("blocks") and isinstance(child, torch.nn.ModuleList)
            for block in child
        ]

    @property
    def is_compiled(self) -> bool:
        return self.compile_kwargs is not None

    def compile_stack(self, **compile_kwargs: Any) -> None:
        """Compile the block stack with ``torch.compile`` (``fullgraph=True`` unless given), in place.

        Regional: each block's forward is compiled (``nn.Module.compile``), the loop over the blocks
        and every cache decision stay in Python, so a skipped step never enters a compiled region,
        the first-block probe runs compiled and the rest continues from it, and identical blocks
        share one graph. Compilation happens on the first forward. The transformer's modules are
        changed in place (anything else holding them runs compiled too); :meth:`uncompile_stack`
        undoes it. Sequence-parallel (Ulysses / ring) attention processors are refused: they run
        collectives inside the blocks.
        """
        if any(isinstance(getattr(m, "processor", None), UlyssesProcessor) for m in self.transformer.modules()):
            raise CacheConfigError(
                f"the {self.family} transformer has sequence-parallel attention processors installed; "
                "compile_stack does not compile their collectives (use it without --ulysses/--ring)"
            )
        blocks = self.stack_modules()
        if not blocks:
            raise CacheConfigError(f"the {self.family} adapter found no transformer blocks to compile")
        kwargs = {"fullgraph": True, **compile_kwargs}
        for block in blocks:
            block.compile(**kwargs)
        self.compile_kwargs = kwargs

    def uncompile_stack(self) -> None:
        """Run the blocks eagerly again (compiled code stays in dynamo's cache until ``torch._dynamo.reset()``)."""
        for block in self.stack_modules():
            block._compiled_call_impl = None  # what nn.Module.compile set
        self.compile_kwargs = None

    @property
    def patch_size(self) -> tuple[int, ...]:
        """Patch size of the latent grid (frames, height, width or height, width)."""
        return tuple(self.transformer.config.patch_size)

    def max_positions(self) -> int | None:
        """The most patch positions along one axis that the rotary embedding covers (None: no table)."""
        return None

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *,
        is_cond: bool = True,
        cache: BaseFeatureCache | None = None,
        sp: UlyssesContext | None = None,
        step: int | None = None,
        sigma: float | None = None,
        expert: str = "transformer",
        **extra: Any,
    ) -> torch.Tensor:
        """One model prediction for one CFG branch; ``cache`` decides whether the stack runs.

        ``step``, ``sigma`` and ``expert`` describe the step to the cache (its
        :class:`~ditcache.cache.StepContext`). With ``sp`` (a Ulysses context over more than one
        rank, its attention processors installed by ``apply_ulysses``) the stack runs on this rank's
        token shard and the tokens are gathered before the head, so every rank returns the full
        prediction.
        """
        if self.compile_kwargs is not None and sp is not None and sp.group.size > 1:
            raise CacheConfigError("a compiled block stack cannot run sequence-parallel: call uncompile_stack() first")
        state = self.embed(hidden_states, timestep, encoder_hidden_states, **extra)
        where = {"is_cond": is_cond, "step": step, "sigma": sigma, "expert": expert, "timestep": timestep}
        if sp is None or sp.group.size == 1:
            return self.head(self._cached_stack(state, cache, state.hidden_states.shape[1], None, where), state)
        local = self.shard(state, sp)
        out = self._cached_stack(local, cache, sp.local_count(sp.seq_len), sp, where)
        return self.head(sp.gather(out), state)

    def _cached_stack(
        self,
        state: StackState,
        cache: BaseFeatureCache | None,
        n_real: int,
        sp: UlyssesContext | None,
        where: dict[str, Any],
    ) -> torch.Tensor:
        """The block stack, or the cache's estimate of it (one decision per branch per step).

        The cache sees only the first ``n_real`` tokens: the SP padding at the end of the last shard
        is not part of the sequence, and a calibrator counting it would measure a different mean on
        different SP degrees. A skipped step returns the padding as it came in (the gather drops it).
        A cache that looked at the first block's output (``ctx.first_block``) does not pay for it
        twice: a computed step continues from there.
        """
        x = state.hidden_states
        real = x[:, :n_real]
        blocks = self.iter_blocks(state, x)
        probed: list[torch.Tensor] = []

        def first_block() -> torch.Tensor:
            if not probed:
                probed.append(next(blocks))
            return probed[0][:, :n_real]

        is_cond = where["is_cond"]
        timestep = where["timestep"]
        ctx = StepContext(
            step=where["step"],
            is_cond=is_cond,
            expert=where["expert"],
            sigma=where["sigma"],
            timestep=float(timestep.flatten()[0]) if timestep.numel() else None,
            hidden_states=real,
            modulation=self.modulation(state),
            group_sum=local_sum if sp is None else sp.group_sum,
            first_block=first_block,
        )
        started = time.perf_counter()
        arg = step_arg(cache, ctx)
        if cache is not None and not cache.should_compute(arg):
            blocks.close()
            estimate = cache.approximate(real, arg)
            return estimate if n_real == x.shape[1] else torch.cat([estimate, x[:, n_real:]], dim=1)
        out = probed[0] if probed else x
        for out in blocks:
            pass
        if out.is_cuda:  # kernels run asynchronously: time the work, not its launch
            torch.cuda.synchronize(out.device)
        name = branch_name(is_cond)
        self.stack_passes[name] = self.stack_passes.get(name, 0) + 1
        self.stack_seconds[name] = self.stack_seconds.get(name, 0.0) + time.perf_counter() - started
        if cache is not None:
            cache.update(out[:, :n_real], real, arg)
        return out

    def reset_counters(self) -> None:
        """Forget the per-branch stack-pass counts and times (start of a request)."""
        self.stack_passes = {}
        self.stack_seconds = {}

