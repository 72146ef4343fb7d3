"""The diffusers hooks that put a ditcache cache around a transformer's block stack.

They sit on diffusers' own :class:`~diffusers.hooks.HookRegistry`, as its MagCache and
FirstBlockCache do, so the transformer's forward is never replaced by hand and the pipeline's
``cache_context`` reaches them:

- :class:`TransformerHook` on each transformer: reads the CFG branch from ``cache_context`` and the
  call's timestep, and opens the call in the :class:`~ditcache.integrations.session.CacheSession`.
- :class:`HeadHook` on the first block: builds the step's :class:`~ditcache.cache.StepContext` and
  asks the cache. On a computed step it runs the block; on a skipped one it returns the cache's
  estimate of the whole stack's output, in the block's return layout.
- :class:`BlockHook` on every other block: runs the block on a computed step, passes its input
  through on a skipped one. The last block hands the stack's output to ``cache.update``.

The text stream of a skipped step passes through unchanged: every supported transformer drops it
after the stack, so only the image tokens matter.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from diffusers.utils.torch_utils import unwrap_module

from ditcache.cache.context import StepContext, branch_name, step_arg
from ditcache.errors import CacheConfigError, StepSyncError
from ditcache.integrations.session import Call, CacheSession
from ditcache.integrations.stacks import StackLayout, block_metadata, stack_blocks

TRANSFORMER_HOOK = "ditcache_transformer"
HEAD_HOOK = "ditcache_head_block"
BLOCK_HOOK = "ditcache_block"

BRANCHES = {"cond": True, "uncond": False}


class TransformerHook(ModelHook):
    """Opens and closes each transformer call in the session.

    Stateful so that diffusers hands it the ``cache_context`` (through its ``StateManager``) and
    tells it when a pipeline call ends (``reset_state``, from ``maybe_free_model_hooks``).
    """

    _is_stateful = True

    def __init__(self, session: CacheSession, expert: str) -> None:
        super().__init__()
        self.session = session
        self.expert = expert
        self.state_manager = StateManager(BaseState)  # receives the cache context; holds no state
        self._signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._signature = inspect.signature(type(unwrap_module(module)).forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        arguments = self._signature.bind(module, *args, **kwargs).arguments
        if arguments.get("controlnet_block_samples") is not None:
            raise CacheConfigError(
                "ControlNet residuals are added between the blocks, inside the cached stack; "
                "ditcache's diffusers integration does not support them"
            )
        timestep = arguments.get("timestep")
        if timestep is None:
            raise CacheConfigError(f"{type(module).__name__} was called without a timestep")
        # The largest value: a per-token timestep (Wan2.2 TI2V) is 0 on the conditioning frame.
        self.session.begin_call(self.expert, self._branch(), float(torch.as_tensor(timestep).max()))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            self.session.end_call()

    def _branch(self) -> bool:
        """The call's CFG branch: a call outside any ``cache_context`` is the conditional one."""
        try:
            name = self.state_manager.context.name
        except ValueError:  # diffusers' StateManager: no context set
            return True
        if name not in BRANCHES:
            raise CacheConfigError(
                f"the pipeline called the transformer in cache_context({name!r}); ditcache's caches keep one "
                "state per CFG branch and know only 'cond' and 'uncond'"
            )
        return BRANCHES[name]

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.session.end_request()
        return module


class _StackHook(ModelHook):
    """What the block hooks share: the session, the block's argument and return layout."""

    def __init__(self, session: CacheSession, is_tail: bool) -> None:
        super().__init__()
        self.session = session
        self.is_tail = is_tail
        self._metadata = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self._metadata = block_metadata(module)
        return module

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        return self._metadata._get_parameter_from_args_kwargs(name, args, kwargs)

    def _hidden(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return self._argument(self._metadata.hidden_states_argument_name, args, kwargs)

    def _image_tokens(self, output: Any) -> torch.Tensor:
        return output[self._metadata.return_hidden_states_index] if isinstance(output, tuple) else output

    def _as_output(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """``hidden`` in the block's return layout, the text stream passed through as it came."""
        meta = self._metadata
        if meta.return_encoder_hidden_states_index is None:
            return hidden
        encoder = self._argument(meta.encoder_hidden_states_argument_name, args, kwargs)
        output: list[Any] = [None, None]
        output[meta.return_hidden_states_index] = hidden
        output[meta.return_encoder_hidden_states_index] = encoder
        return tuple(output)

    def _computed(self, call: Call, output: Any) -> Any:
        """A computed block's output; the last block's closes the stack for the cache."""
        if self.is_tail:
            call.cache.update(self._image_tokens(output), call.stack_input, call.arg)
        return output


class HeadHook(_StackHook):
    """First block: one cache decision per transformer call."""

    def __init__(self, session: CacheSession, is_tail: bool, modulation_argument: str | None) -> None:
        super().__init__(session, is_tail)
        self.modulation_argument = modulation_argument

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = self.session.call
        if call is None:  # the block was called on its own, not by a hooked transformer
            return self.fn_ref.original_forward(*args, **kwargs)
        hidden = self._hidden(args, kwargs)
        probed: list[Any] = []

        def first_block() -> torch.Tensor:
            if not probed:
                probed.append(self.fn_ref.original_forward(*args, **kwargs))
            return self._image_tokens(probed[0])

        modulation = self.modulation_argument
        ctx = StepContext(
            step=call.step,
            is_cond=call.is_cond,
            expert=call.expert,
            sigma=call.sigma,
            timestep=call.timestep,
            hidden_states=hidden,
            modulation=None if modulation is None else self._argument(modulation, args, kwargs),
            first_block=first_block,
        )
        arg = step_arg(call.cache, ctx)
        call.compute = call.cache.should_compute(arg)
        _check_step(call, arg)
        if not call.compute:
            return self._as_output(call.cache.approximate(hidden, arg), args, kwargs)
        call.arg, call.stack_input = arg, hidden
        self.session.count_pass(call)
        # A computed step continues from the probe, so a cache that looked at it pays one block once.
        output = probed[0] if probed else self.fn_ref.original_forward(*args, **kwargs)
        return self._computed(call, output)


class BlockHook(_StackHook):
    """Every block after the first: runs on a computed step, passes through on a skipped one."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        call = self.session.call
        if call is None or call.compute:
            output = self.fn_ref.original_forward(*args, **kwargs)
            return output if call is None else self._computed(call, output)
        return self._as_output(self._hidden(args, kwargs), args, kwargs)


def _check_step(call: Call, arg: Any) -> None:
    """A cache that counts steps must count the pipeline's step, or its plan is applied off by some."""
    reported = call.cache.current_step(arg)
    if reported not in (-1, call.step):
        raise StepSyncError(
            f"{call.expert}'s cache counts {branch_name(call.is_cond)} step {reported} while the pipeline is at "
            f"step {call.step}: every step must consult the cache exactly once per branch"
        )


def install(transformer: torch.nn.Module, layout: StackLayout, session: CacheSession, expert: str) -> None:
    """Register the hooks of ``expert`` on ``transformer`` and its stack's blocks."""
    blocks = stack_blocks(transformer, layout)
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.register_hook(TransformerHook(session, expert), TRANSFORMER_HOOK)
    head, last = blocks[0], len(blocks) - 1
    HookRegistry.check_if_exists_or_initialize(head).register_hook(
        HeadHook(session, last == 0, layout.modulation_argument), HEAD_HOOK
    )
    for index, block in enumerate(blocks[1:], start=1):
        HookRegistry.check_if_exists_or_initialize(block).register_hook(BlockHook(session, index == last), BLOCK_HOOK)
    # cache_context walks a cached list of the child registries; it must see the new ones.
    root.invalidate_child_registries_cache()


def uninstall(transformer: torch.nn.Module) -> None:
    """Remove every hook :func:`install` registered on ``transformer``."""
    root = HookRegistry.check_if_exists_or_initialize(transformer)
    root.remove_hook(TRANSFORMER_HOOK, recurse=False)
    root.remove_hook(HEAD_HOOK, recurse=True)
    root.remove_hook(BLOCK_HOOK, recurse=True)
    root.invalidate_child_registries_cache()


def session_of(transformer: torch.nn.Module) -> CacheSession | None:
    """The session whose hooks are on ``transformer``, if any."""
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(TRANSFORMER_HOOK)
    return None if hook is None else hook.session
