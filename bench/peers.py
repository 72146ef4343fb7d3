"""diffusers' own cache hooks as benchmark peers: FirstBlockCache, MagCache, TaylorSeer, SeaCache,
Pyramid Attention Broadcast (and FasterCache, which does not apply to separate-branch CFG; see below).

The rules the benchmark re-implements (TeaCache, FirstBlockCache, TaylorSeer's interval) are caches
in the library (``ditcache.cache``); this module only sets up diffusers' hooks.

A hooked run is the same public pipeline call as every other method, on a deep copy of the pipeline
(same weights) whose transformers have ``enable_cache(config)`` (:func:`hooked_pipeline`). All three hooks
are registered on the transformer blocks (``blocks.0`` as the head, the rest as followers or, for
TaylorSeer with :data:`TAYLORSEER_BLOCK_IDENTIFIERS`, every block), and ditcache's adapter calls those
block modules, so the hooks fire under the adapter exactly as under the diffusers forward. What the
diffusers pipeline adds around its calls is supplied here: each adapter call (one CFG branch of one
step) runs inside ``transformer.cache_context("cond"|"uncond", step_index=..., sigma=...)``, which
keys the hooks' state per branch, and :class:`HookedPipeline` resets the hooks (through diffusers'
``HookRegistry``) before every request, because diffusers keeps their state across calls.

Two hooks also read what diffusers' transformer forward sees, which the adapter (it calls the
blocks, not ``transformer.forward``) supplies the same way:

- SeaCache's root hook sits on ``transformer.forward`` and builds its indicator from the 5-D latents
  it is given (diffusers' built-in Wan T2V adapter) and the context's ``step_index``, ``sigma`` and
  ``num_inference_steps``: :func:`enter_branch_context` calls that hook's ``pre_forward`` /
  ``post_forward`` around each adapter call with the adapter's latents, and passes all three
  fields to ``cache_context``. Its leader/identity/tail hooks are on the blocks and fire as usual.
- Pyramid Attention Broadcast and FasterCache take a ``current_timestep_callback``:
  :func:`current_timestep` returns the timestep of the adapter call in progress.

Which of diffusers 0.42.1's cache configs apply to Wan under CFG with one transformer call per
branch (diffusers' ``WanPipeline`` and ditcache's pipelines both call cond and uncond separately):

- FirstBlockCache, MagCache, TaylorSeer, SeaCache: keyed by ``cache_context``, per branch.
- PyramidAttentionBroadcast: applies (hooks ``blocks.N.attn1`` and, when set, the cross-attention
  ``attn2``); its state is per attention module, not per ``cache_context``, so cond and uncond calls
  share one counter and one cached output, exactly as under diffusers' ``WanPipeline``.
- FasterCache: does not apply. Its attention hooks skip only when its denoiser hook (on
  ``transformer.forward``) has cut a batch-concatenated [uncond, cond] batch in half, which never
  happens with one call per branch (and under diffusers' ``WanPipeline`` that hook would split each
  branch's batch in two). With the adapter it runs every block at batch >= 2 and raises at batch 1
  (its attention hook halves the batch it caches): :data:`NOT_APPLICABLE`.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Sequence
from typing import Any

import torch

import ditcache

# Block-level identifiers for diffusers' TaylorSeer on Wan: every transformer block's output is
# forecast, so a predicted step runs no block at all (the default patterns hook only the attention
# modules, leaving the feed-forward networks running on every step).
TAYLORSEER_BLOCK_IDENTIFIERS = [r"^blocks\.\d+$"]
KINDS = ("fbc", "magcache", "taylorseer", "seacache", "pab", "fastercache")
NOT_APPLICABLE = {
    "fastercache": "FasterCache skips attention only on a batch-concatenated [uncond, cond] call that its denoiser "
    "hook halves; with one transformer call per CFG branch (diffusers' WanPipeline and ditcache) it skips nothing "
    "(batch >= 2) or fails (batch 1: its attention hook takes the batch for [uncond, cond] and halves it)",
}
_CURRENT = {"timestep": 1000.0}  # the timestep of the adapter call in progress (PAB / FasterCache callbacks)


def current_timestep() -> float:
    """The timestep (0..1000) of the hooked adapter call in progress."""
    return _CURRENT["timestep"]


def make_diffusers_config(kind: str, **kw: Any) -> Any:
    """A diffusers cache config: kind in :data:`KINDS`."""
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        MagCacheConfig,
        PyramidAttentionBroadcastConfig,
        SeaCacheConfig,
        TaylorSeerCacheConfig,
    )

    if kind == "fbc":
        return FirstBlockCacheConfig(threshold=kw["threshold"])
    if kind == "magcache":
        return MagCacheConfig(
            threshold=kw["threshold"],
            max_skip_steps=kw["max_skip_steps"],
            retention_ratio=kw["retention_ratio"],
            num_inference_steps=kw["num_inference_steps"],
            mag_ratios=torch.tensor(list(kw["mag_ratios"]), dtype=torch.float32),
        )
    if kind == "taylorseer":
        return TaylorSeerCacheConfig(
            cache_interval=kw["cache_interval"],
            max_order=kw["max_order"],
            disable_cache_before_step=kw.get("disable_cache_before_step", 3),
            taylor_factors_dtype=kw.get("taylor_factors_dtype", torch.float32),
            cache_identifiers=list(kw.get("cache_identifiers", TAYLORSEER_BLOCK_IDENTIFIERS)),
        )
    if kind == "seacache":
        return SeaCacheConfig(
            threshold=kw["threshold"],
            residual_order=kw.get("residual_order", 1),
            retention_steps=kw.get("retention_steps", 1),
            cache_end_steps=kw.get("cache_end_steps", 1),
            max_consecutive_cached=kw.get("max_consecutive_cached", 2),
        )
    if kind == "pab":
        full = (-1, 1001)
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=kw.get("spatial_attention_block_skip_range"),
            cross_attention_block_skip_range=kw.get("cross_attention_block_skip_range"),
            spatial_attention_timestep_skip_range=tuple(kw.get("spatial_attention_timestep_skip_range", full)),
            cross_attention_timestep_skip_range=tuple(kw.get("cross_attention_timestep_skip_range", full)),
            current_timestep_callback=current_timestep,
        )
    if kind == "fastercache":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=kw.get("spatial_attention_block_skip_range", 2),
            spatial_attention_timestep_skip_range=tuple(kw.get("spatial_attention_timestep_skip_range", (-1, 681))),
            current_timestep_callback=current_timestep,
        )
    raise ValueError(f"unknown diffusers cache kind {kind!r}; known: {', '.join(KINDS)}")


def diffusers_taylorseer_plan(num_steps: int, cache_interval: int, disable_cache_before_step: int) -> list[int]:
    """The steps diffusers' TaylorSeer hook computes (its schedule: every step before
    ``disable_cache_before_step``, then ``(step - disable - 1) % interval == 0``)."""
    return [
        s for s in range(num_steps)
        if s < disable_cache_before_step or (s - disable_cache_before_step - 1) % cache_interval == 0
    ]  # fmt: skip


def diffusers_magcache_plan(
    ratios: Sequence[float], num_steps: int, threshold: float, max_skip_steps: int, retention_ratio: float
) -> list[int]:
    """The steps diffusers' MagCache hook computes (mirrors ``MagCacheHeadHook``; for de-duplication).

    Differences to ditcache's schedule: skipping may start at ``int(r * N + 0.5)`` (ditcache computes
    through ``int(r * N)``), the comparison is ``<=``, and the last step is not forced.
    """
    retention_step = int(retention_ratio * num_steps + 0.5)
    acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
    plan, have_residual = [], False
    for step in range(num_steps):
        compute = True
        if step >= retention_step:
            acc_ratio *= ratios[step] if step < len(ratios) else 1.0
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if have_residual and acc_err <= threshold and acc_steps <= max_skip_steps:
                compute = False
            else:
                acc_ratio, acc_err, acc_steps = 1.0, 0.0, 0
        if compute:
            plan.append(step)
            have_residual = True
    return plan


def hooked_block_names(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Module names that ``patterns`` (re.fullmatch) select: a check that TaylorSeer hooks whole blocks."""
    return [name for name, _ in model.named_modules() if any(re.fullmatch(p, name) for p in patterns)]


class HookedPipeline:
    """A ditcache pipeline on hooked transformers; calling it resets the hooks, then generates."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.num_inference_steps: int | None = None
        for adapter in pipeline.adapters.values():
            enter_branch_context(adapter, self)

    @property
    def adapters(self) -> dict[str, torch.nn.Module]:
        return self.pipeline.adapters

    def __call__(self, *args: Any, **kwargs: Any) -> ditcache.GenerationOutput:
        from diffusers.hooks import HookRegistry

        for adapter in self.pipeline.adapters.values():
            HookRegistry.check_if_exists_or_initialize(adapter.transformer).reset_stateful_hooks(recurse=True)
        self.num_inference_steps = kwargs.get("num_inference_steps")
        return self.pipeline(*args, **kwargs)


def hooked_pipeline(pipeline: Any, configs: dict[str, Any]) -> HookedPipeline:
    """A deep copy of ``pipeline`` (same weights) with ``configs[expert]`` enabled on that expert's
    transformer (an expert without a config runs unhooked)."""
    hooked = copy.deepcopy(pipeline)
    for name, config in configs.items():
        hooked.adapters[name].transformer.enable_cache(config)
    return HookedPipeline(hooked)


def sea_root_hook(transformer: torch.nn.Module) -> Any:
    """SeaCache's root hook on ``transformer`` (None when SeaCache is not enabled on it)."""
    from diffusers.hooks import HookRegistry

    return HookRegistry.check_if_exists_or_initialize(transformer).get_hook("sea_cache_root")


def enter_branch_context(adapter: torch.nn.Module, owner: HookedPipeline | None = None) -> None:
    """Run every call of ``adapter`` inside ``cache_context`` of its branch, as diffusers' pipelines do.

    The adapter's call names the branch, step and sigma (keywords ``is_cond``, ``step``, ``sigma``);
    a forward pre-hook enters the context (with the request's step count from ``owner``), records the
    call's timestep for :func:`current_timestep`, runs SeaCache's root ``pre_forward`` on the call's
    latents when SeaCache is enabled, and a forward hook that also runs on errors undoes it all.
    """
    transformer = adapter.transformer
    contexts: list[contextlib.ExitStack] = []

    def enter(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        stack = contextlib.ExitStack()
        name = "cond" if kwargs.get("is_cond", True) else "uncond"
        latents = args[0] if args else kwargs.get("hidden_states")
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if torch.is_tensor(timestep):
            _CURRENT["timestep"] = float(timestep.flatten()[0])
        steps = owner.num_inference_steps if owner is not None else None
        stack.enter_context(
            transformer.cache_context(
                name, step_index=kwargs.get("step"), sigma=kwargs.get("sigma"), num_inference_steps=steps
            )
        )
        root = sea_root_hook(transformer)
        if root is not None:
            root.pre_forward(transformer, hidden_states=latents)
            stack.callback(root.post_forward, transformer, None)
        contexts.append(stack)

    def leave(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        contexts.pop().close()

    adapter.register_forward_pre_hook(enter, with_kwargs=True)
    adapter.register_forward_hook(leave, with_kwargs=True, always_call=True)

