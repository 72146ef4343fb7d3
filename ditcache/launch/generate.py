"""``ditcache generate``: images or videos from a feature-cached DiT, on one process or as one rank of many.

    ditcache generate                                   # reference digits, cache on -> PNG grid
    ditcache generate --model reference --prompt "a handwritten 3" --cache none
    ditcache generate --model reference-moe --steps 40 --order 2 --cache-option taylor_form=newton
    ditcache generate --model wan --model-dir /models/Wan2.1-T2V-1.3B-Diffusers \
        --prompt "a cat playing piano" --model-type Wan2.1-T2V-1.3B --output cat.mp4
    ditcache generate --import my_caches.py --cache mine --cache-option thresh=0.2
    torchrun --nproc_per_node=2 --master_port=29531 launch/generate.py --cfg-parallel 2
    torchrun --nproc_per_node=8 -m ditcache.launch.generate --model wan --model-dir ... --cfg-parallel 2 --ulysses 4
    torchrun --nproc_per_node=8 -m ditcache.launch.generate --model wan --model-dir ... --ulysses 4 --ring 2

Under ``torchrun`` the ranks form ``cfg x sp`` groups (CFG-parallel: one branch per rank; sequence
parallelism, ``sp = ulysses x ring``: a token shard per rank, Ulysses splitting the heads and ring
attention the rest, so 12 heads run on 8 ranks as ``--ulysses 4 --ring 2``), and whatever is left
over are data-parallel replicas: with
``world > cfg x sp`` replica r takes the r-th contiguous share of the prompts, samples with seed
``--seed + r`` and its first rank writes ``<output stem>-dp<r><suffix>``; otherwise rank 0 writes
``--output``. Rank 0 prints the one-line summary, which names the layout.

``run(args)`` is the whole per-rank job, driven by the torchrun environment variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...): it creates the process group (unless one exists), generates,
writes, and destroys the group it created; launchers that set those variables themselves (the Ray
launcher) call it in-process. ``build_parser``/``main`` only parse and print.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditcache.cache import CacheConfig
from ditcache.errors import DitCacheError, ParamsError
from ditcache.launch.cache_options import add_cache_arguments, cache_from_args
from ditcache.launch.models import BUNDLED_MODELS, DTYPES, load_pipeline, model_help, resolve_dtype, resolve_model
from ditcache.launch.outputs import check_output_path, check_writable_dir
from ditcache.launch.session import (
    add_compile_argument, add_parallel_arguments, guidance_scale, parallel_session, replica_share
)
from ditcache.parallel import ParallelGroups
from ditcache.runtime.compile import compile_pipeline
from ditcache.runtime.denoise import GenerationOutput
from ditcache.runtime.io import IMAGE_SUFFIXES, VIDEO_SUFFIXES, save_frames

DEFAULT_OUTPUT_DIR = Path("outputs")
OUTPUT_SUFFIXES = IMAGE_SUFFIXES + VIDEO_SUFFIXES


@dataclass
class RunResult:
    """One rank's result: the request's output, where this rank wrote it (None if it did not)."""

    output: GenerationOutput
    path: Path | None
    rank: int = 0


def build_parser(prog: str = "ditcache generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="reference", help=model_help())
    model.add_argument("--model-dir", type=Path, help="diffusers-format folder (overrides a bundled model's)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")

    request = parser.add_argument_group("request (unset values take the model directory's defaults)")
    request.add_argument("--prompt", action="append", help="repeat for a batch")
    request.add_argument("--prompts-file", type=Path, help="one prompt per line (blank lines skipped)")
    request.add_argument("--negative-prompt")
    request.add_argument("--steps", type=int)
    request.add_argument("--seed", type=int, default=0)
    request.add_argument(
        "--guidance-scale", type=guidance_scale, help=">= 1; exactly 0 or 1 turns CFG (the uncond pass) off"
    )
    request.add_argument(
        "--guidance-scale-2",
        type=guidance_scale,
        help="Wan2.2 A14B: guidance of the low-noise expert's steps (default: --guidance-scale)",
    )
    request.add_argument("--shift", type=float, help="sigma shift of the scheduler (UniPC's flow_shift, FlowMatch's shift)")
    request.add_argument("--height", type=int)
    request.add_argument("--width", type=int)
    request.add_argument("--num-frames", type=int)
    request.add_argument("--model-type", help="params model_type of a params-driven cache (default: the model's)")

    add_cache_arguments(parser)

    parser.add_argument(
        "--output", type=Path, help="a .png grid or .mp4 video (default: outputs/<model>-<cache>, replaced each run)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--telemetry", action="store_true", help="also print the per-branch cache telemetry (JSON) after the summary"
    )
    add_parallel_arguments(parser)
    add_compile_argument(parser)
    return parser


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values then --prompts-file lines; the reference models default to one of each digit."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise ParamsError(f"--prompts-file {args.prompts_file} does not exist")
        lines = [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
        if not lines:
            raise ParamsError(f"--prompts-file {args.prompts_file} has no prompts (every line is blank)")
        prompts += lines
    if prompts:
        return prompts
    if args.model in BUNDLED_MODELS:
        from ditcache.runtime.reference import prompt_for_label

        return [prompt_for_label(k) for k in range(10)]
    raise ParamsError("give at least one --prompt or a --prompts-file")


def request_kwargs(args: argparse.Namespace, prompts: list[str], cache: CacheConfig) -> dict[str, Any]:
    """Pipeline keywords; unset options are left out so the pipeline's defaults apply."""
    optional = {
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "guidance_scale_2": args.guidance_scale_2,
        "sigma_shift": args.shift,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "model_type": args.model_type,
    }
    kwargs = {k: v for k, v in optional.items() if v is not None}
    kwargs.update(
        prompt=prompts,
        seed=args.seed,
        cache=cache,
        progress=not args.no_progress,
    )
    return kwargs


def replica_path(path: Path, groups: ParallelGroups) -> Path:
    """``path`` suffixed ``-dp<r>`` when there are several data-parallel replicas."""
    if groups.config.dp_degree > 1:
        return path.with_name(f"{path.stem}-dp{groups.dp_rank}{path.suffix}")
    return path


def output_path(args: argparse.Namespace, output: GenerationOutput, groups: ParallelGroups) -> Path:
    """``--output`` (default ``outputs/<model>-<cache>.png|.mp4`` in the working directory), suffixed
    ``-dp<r>`` per replica."""
    path = args.output
    if path is None:
        suffix = ".png" if output.frames.shape[2] == 1 else ".mp4"
        path = DEFAULT_OUTPUT_DIR / f"{args.model}-{args.cache}{suffix}"
    return replica_path(path, groups)


def check_destination(args: argparse.Namespace, groups: ParallelGroups) -> None:
    """Refuse an output this rank's replica could not write, before the model loads (every rank checks
    its replica's file, so the ranks of a replica fail together)."""
    if args.output is None:
        check_writable_dir(DEFAULT_OUTPUT_DIR, "default output directory")
    else:
        check_output_path(replica_path(args.output, groups), OUTPUT_SUFFIXES, overwrite=args.overwrite)


def run(args: argparse.Namespace) -> RunResult:
    """This rank's whole job: process groups, load, generate, write (one rank per replica), tear down."""
    family, model_dir = resolve_model(args.model, args.model_dir)
    prompts = read_prompts(args)
    cache = cache_from_args(args)  # a bad cache choice fails here, before the process group forms
    if args.guidance_scale_2 is not None and family != "wan":
        raise ParamsError(f"--guidance-scale-2 applies to Wan2.2 A14B (two-expert) models, not to {family}")
    with parallel_session(args) as (groups, device):
        kwargs = request_kwargs(args, replica_share(prompts, groups), cache)
        kwargs["seed"] += groups.dp_rank
        kwargs["progress"] = kwargs["progress"] and groups.rank == 0
        check_destination(args, groups)
        pipe = load_pipeline(family, model_dir, device, resolve_dtype(args.dtype, args.device), groups)
        if args.compile:
            compile_pipeline(pipe)
        output = pipe(**kwargs)
        path = None
        # Every rank of a replica holds the same frames; its first rank writes them.
        if groups.replica.rank == 0:
            path = save_frames(output.frames, output_path(args, output, groups))
        return RunResult(output, path, groups.rank)


def main(argv: Sequence[str] | None = None, prog: str = "ditcache generate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        result = run(args)
    except DitCacheError as exc:
        text, where = str(exc), ""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            rank = f"rank {os.environ['RANK']}"
            # A message that starts with this rank already (a rendezvous error) names it once, not twice.
            text, where = text.removeprefix(f"{rank}: "), f" ({rank})"
        print(f"error{where}: {text}", file=sys.stderr)
        return 2
    if result.rank == 0:
        print(result.output.summary())
        if args.telemetry:
            print(json.dumps(result.output.telemetry(), indent=1))
    if result.path is not None:
        print(f"wrote {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
