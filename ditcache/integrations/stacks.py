"""Which blocks of a diffusers transformer form the cached stack: its family record says.

The cache replaces the stack from the first block's input to the last block's output, on the image
tokens. Which ModuleLists make up that stack, and in what order the transformer runs them, is a
property of each transformer class, so each family's record (``ditcache.families``) writes it down
rather than it being guessed from attribute names; a new family brings its own.

What each block returns, and in which position the image tokens sit (Wan: the tokens alone;
HunyuanVideo's dual- and single-stream blocks: ``(hidden, encoder)``; Qwen-Image's:
``(encoder, hidden)``), comes from diffusers' own ``TransformerBlockRegistry``, which its caches use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.utils.torch_utils import unwrap_module

from ditcache.errors import CacheConfigError, UnknownModelError
from ditcache.families import family, family_for_transformer, known_families


@dataclass(frozen=True)
class StackLayout:
    """The cached stack of one transformer class.

    Attributes:
        block_lists: names of the ``ModuleList`` attributes holding the blocks, in the order the
            transformer's forward runs them.
        modulation_argument: the first block's argument holding the step's timestep modulation
            (what :attr:`~ditcache.cache.StepContext.modulation` carries), or None where the family
            exposes none (as ditcache's own adapters do).
    """

    block_lists: tuple[str, ...]
    modulation_argument: str | None = None


def layout_of(transformer: torch.nn.Module, where: str) -> StackLayout:
    """The stack layout of ``transformer``, from its family (``where`` names it in the error)."""
    try:
        record = family_for_transformer(unwrap_module(transformer))
    except UnknownModelError:
        supported = ", ".join(family(name).transformer for name in known_families())
        raise CacheConfigError(
            f"{where} is a {type(transformer).__name__}; ditcache's diffusers integration supports {supported}"
        ) from None
    return StackLayout(record.stack, record.modulation_argument)


def stack_blocks(transformer: torch.nn.Module, layout: StackLayout) -> list[torch.nn.Module]:
    """The blocks of the cached stack, in the order the transformer runs them."""
    model = unwrap_module(transformer)
    return [block for name in layout.block_lists for block in getattr(model, name)]


def block_metadata(block: torch.nn.Module) -> TransformerBlockMetadata:
    """How ``block`` takes and returns its image and text tokens (diffusers' registry)."""
    cls = type(unwrap_module(block))
    try:
        return TransformerBlockRegistry.get(cls)
    except ValueError:
        raise CacheConfigError(
            f"diffusers' TransformerBlockRegistry does not describe the block class {cls.__name__}, "
            "so its return order is unknown; this diffusers version does not fit ditcache's integration"
        ) from None
