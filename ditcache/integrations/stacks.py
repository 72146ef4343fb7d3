"""Which blocks of a diffusers transformer form the cached stack, per supported transformer class.

The cache replaces the stack from the first block's input to the last block's output, on the image
tokens. Which ModuleLists make up that stack, and in what order the transformer runs them, is a
property of each transformer class, so it is written down here rather than guessed from attribute
names. Classes are matched by name (along the MRO, so subclasses match too): importing a diffusers
transformer class costs seconds, and matching must not import all of them.

What each block returns, and in which position the image tokens sit (Wan: the tokens alone;
HunyuanVideo's dual- and single-stream blocks: ``(hidden, encoder)``; Qwen-Image's:
``(encoder, hidden)``), comes from diffusers' own ``TransformerBlockRegistry``, which its caches use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.utils.torch_utils import unwrap_module

from ditcache.errors import CacheConfigError


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


LAYOUTS: dict[str, StackLayout] = {
    "WanTransformer3DModel": StackLayout(("blocks",), modulation_argument="temb"),
    "HunyuanVideoTransformer3DModel": StackLayout(("transformer_blocks", "single_transformer_blocks")),
    "QwenImageTransformer2DModel": StackLayout(("transformer_blocks",)),
}


def layout_of(transformer: torch.nn.Module, where: str) -> StackLayout:
    """The stack layout of ``transformer`` (``where`` names it in the error)."""
    for cls in type(unwrap_module(transformer)).__mro__:
        if cls.__name__ in LAYOUTS:
            return LAYOUTS[cls.__name__]
    raise CacheConfigError(
        f"{where} is a {type(transformer).__name__}; ditcache's diffusers integration supports "
        f"{', '.join(LAYOUTS)}"
    )


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
