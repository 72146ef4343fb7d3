"""diffusers' own cache hooks as benchmark peers: FirstBlockCache, MagCache and TaylorSeer.

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


def make_diffusers_config(kind: str, **kw: Any) -> Any:
    """A diffusers cache config: kind in {"fbc", "magcache", "taylorseer"}."""
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

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
    raise ValueError(f"unknown diffusers cache kind {kind!r}; known: fbc, magcache, taylorseer")


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
        for adapter in pipeline.adapters.values():
            enter_branch_context(adapter)

    @property
    def adapters(self) -> dict[str, torch.nn.Module]:
        return self.pipeline.adapters

    def __call__(self, *args: Any, **kwargs: Any) -> ditcache.GenerationOutput:
        from diffusers.hooks import HookRegistry

        for adapter in self.pipeline.adapters.values():
            HookRegistry.check_if_exists_or_initialize(adapter.transformer).reset_stateful_hooks(recurse=True)
        return self.pipeline(*args, **kwargs)


def hooked_pipeline(pipeline: Any, configs: dict[str, Any]) -> HookedPipeline:
    """A deep copy of ``pipeline`` (same weights) with ``configs[expert]`` enabled on that expert's
    transformer (an expert without a config runs unhooked)."""
    hooked = copy.deepcopy(pipeline)
    for name, config in configs.items():
        hooked.adapters[name].transformer.enable_cache(config)
    return HookedPipeline(hooked)


def enter_branch_context(adapter: torch.nn.Module) -> None:
    """Run every call of ``adapter`` inside ``cache_context`` of its branch, as diffusers' pipelines do.

    The adapter's call names the branch, step and sigma (keywords ``is_cond``, ``step``, ``sigma``);
    a forward pre-hook enters the context and a forward hook that also runs on errors leaves it.
    """
    transformer = adapter.transformer
    contexts: list[contextlib.ExitStack] = []

    def enter(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        stack = contextlib.ExitStack()
        name = "cond" if kwargs.get("is_cond", True) else "uncond"
        stack.enter_context(transformer.cache_context(name, step_index=kwargs.get("step"), sigma=kwargs.get("sigma")))
        contexts.append(stack)

    def leave(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        contexts.pop().close()

    adapter.register_forward_pre_hook(enter, with_kwargs=True)
    adapter.register_forward_hook(leave, with_kwargs=True, always_call=True)

