"""Size limits of a request, checked before the first latent is allocated.

A request past what the model or the device can hold otherwise fails deep inside the forward: a
height past Wan's rotary table (``rope_max_seq_len``) is a reshape error in the rotary embedding, a
height of 100000 an allocator error after the prompts were encoded. Both are knowable from the
latent grid alone, so the pipelines call :func:`check_size` as soon as the grid is known and the
user gets one line naming the argument and the limit instead.

The memory check is a floor, not an estimate: it refuses only requests whose token activations of
one block pass (the hidden states plus one intermediate of the same size, per sample, in the
model's dtype) cannot fit in the device's free memory; anything it lets through may still run out
later (attention, the feed-forward expansion, the cache), but nothing it refuses could have run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ditcache.errors import ParamsError
from ditcache.runtime.adapter import FamilyAdapter

GIB = 1024**3


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_size(
    adapter: FamilyAdapter,
    grid: Sequence[int],
    batch: int,
    arguments: Mapping[str, int],
    *,
    free_bytes: int | None = None,
) -> None:
    """Refuse a latent ``grid`` (latent frames, height, width or height, width) the model cannot take.

    ``arguments`` are the user's values for the axes of ``grid`` in the same order (for example
    ``{"num_frames": 81, "height": 480, "width": 832}``), so the error names what to change.
    ``free_bytes`` overrides the device's free memory (tests).
    """
    names = list(arguments)
    if len(names) != len(grid):
        raise ValueError(f"check_size: {len(grid)} grid axes but arguments {names}")
    patch = adapter.patch_size[-len(grid) :]
    positions = [max(1, size // p) for size, p in zip(grid, patch)]
    limit = adapter.max_positions()
    if limit is not None:
        for name, count in zip(names, positions):
            if count > limit:
                raise ParamsError(
                    f"{name}={arguments[name]} gives {count} rotary positions along {name}, past this model's "
                    f"table of {limit} ({adapter.family}): lower {name}"
                )
    tokens = math.prod(positions)
    config = adapter.transformer.config
    width = config.num_attention_heads * config.attention_head_dim
    itemsize = torch.empty((), dtype=adapter.transformer.dtype).element_size()
    floor = 2 * batch * tokens * width * itemsize
    device = adapter.transformer.device
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is not None and floor > free:
        size = " x ".join(f"{name}={arguments[name]}" for name in names)
        raise ParamsError(
            f"{size} makes {tokens} tokens per sample; one block pass of {batch} sample(s) needs at least "
            f"{floor / GIB:.1f} GiB on {device} and {free / GIB:.1f} GiB are free: lower the size or the batch"
        )
