"""One rank's place in a launch: the ``--cfg-parallel``/``--ulysses``/``--ring`` options, its process
groups, its data-parallel share of the prompts.

The launchers read the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...);
without it they run as world 1. The Ray launcher sets the same variables on its actors, so every
launch path goes through :func:`parallel_session`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from ditcache.errors import ParamsError
from ditcache.parallel import DEFAULT_TIMEOUT_S, ParallelGroups, destroy_parallel, init_parallel
from ditcache.runtime.compile import check_compile_layout


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-parallel``, ``--ulysses`` (alias ``--sp``), ``--ring``, ``--timeout`` (read under torchrun;
    world 1 without it). The sequence-parallel degree is ``ulysses x ring``; ``args.sp`` holds the
    Ulysses degree, as ``--sp`` always has."""
    group = parser.add_argument_group(
        "parallel (under torchrun; sp = ulysses x ring; ranks beyond cfg x sp are data-parallel replicas)"
    )
    group.add_argument("--cfg-parallel", type=int, choices=(1, 2), default=1, help="2: one CFG branch per rank")
    group.add_argument(
        "--ulysses", "--sp", dest="sp", type=degree, default=1,
        help="Ulysses sequence-parallel degree: splits the heads, so it must divide the head count",
    )
    group.add_argument(
        "--ring", type=degree, default=1,
        help="ring-attention degree: splits the sequence only (12 heads on 8 ranks: --ulysses 4 --ring 2)",
    )
    group.add_argument(
        "--timeout", type=positive_seconds, default=DEFAULT_TIMEOUT_S, help="seconds a collective may wait for a peer rank"
    )


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """``--compile``: torch.compile each transformer block (``ditcache.compile_pipeline``); not with sp > 1."""
    parser.add_argument(
        "--compile", action="store_true",
        help="torch.compile the transformer blocks (fullgraph; cache decisions stay eager); "
        "the first request pays the compile; not with --ulysses/--ring > 1",
    )


def degree(text: str) -> int:
    """An argparse type: a parallel degree, an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1 (1: not split)")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number of seconds > 0")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a finite guidance scale, >= 1 or exactly 0 (0 and 1 both mean no CFG).

    A scale in (0, 1) or below 0 would silently turn classifier-free guidance off or invert it,
    and inf/nan would turn every sample into NaN; both are refused rather than run.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or (value < 1 and value != 0):
        raise argparse.ArgumentTypeError(f"{text} must be finite and >= 1 (or 0/1 for no guidance)")
    return value


@contextmanager
def parallel_session(args: argparse.Namespace) -> Iterator[tuple[ParallelGroups, torch.device]]:
    """This rank's groups and device from the torchrun environment (world 1 without it).

    The process group is destroyed on exit only if this call created it, so a caller that set one
    up itself keeps it. CUDA devices use nccl and the rank's ``LOCAL_RANK`` GPU, anything else gloo.
    """
    check_compile_layout(getattr(args, "compile", False), args.sp, args.ring)  # before any group forms
    owns_group = not dist.is_initialized()
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    groups = init_parallel(
        args.cfg_parallel, args.sp * args.ring, ring_degree=args.ring, backend=backend, timeout_s=args.timeout
    )
    device = groups.device if groups.is_distributed else torch.device(args.device)
    try:
        yield groups, device
    finally:
        if owns_group:
            destroy_parallel(groups)


def replica_share(items: list[Any], groups: ParallelGroups) -> list[Any]:
    """The contiguous share of ``items`` that this rank's data-parallel replica serves."""
    replicas, index = groups.config.dp_degree, groups.dp_rank
    if len(items) < replicas:
        raise ParamsError(
            f"{len(items)} prompts for {replicas} data-parallel replicas (world {groups.config.world_size} / "
            f"cfg {groups.config.cfg_degree} x sp {groups.config.sp_degree}): give at least one prompt per replica"
        )
    return items[index * len(items) // replicas : (index + 1) * len(items) // replicas]
