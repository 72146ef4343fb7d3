"""Generate images or videos with a feature-cached DiT, on one process or as one rank of many.

    python launch/generate.py                                   # reference digits, cache on -> PNG grid
    python launch/generate.py --model reference --prompt "a handwritten 3" --cache none
    python launch/generate.py --model reference-moe --steps 40
    python launch/generate.py --model wan --model-dir /models/Wan2.1-T2V-1.3B-Diffusers \
        --prompt "a cat playing piano" --model-type Wan2.1-T2V-1.3B --output cat.mp4
    torchrun --nproc_per_node=2 --master_port=29531 launch/generate.py --cfg-parallel 2
    torchrun --nproc_per_node=8 launch/generate.py --model wan --model-dir ... --cfg-parallel 2 --sp 4

Under ``torchrun`` the ranks form ``cfg x sp`` groups (CFG-parallel: one branch per rank; Ulysses:
a token shard per rank), and whatever is left over are data-parallel replicas: with
``world > cfg x sp`` replica r takes the r-th contiguous share of the prompts, samples with seed
``--seed + r`` and its first rank writes ``<output stem>-dp<r><suffix>``; otherwise rank 0 writes
``--output``. Rank 0 prints the one-line summary, which names the layout.

``run(args)`` is the whole per-rank job, driven by the torchrun environment variables (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ...): it creates the process group (unless one exists), generates,
writes, and destroys the group it created; launchers that set those variables themselves (the Ray
entry) call it in-process. ``build_parser``/``main`` only parse and print.
"""

from __future__ import annotations

import argparse
import json
import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ditcache.cache import AdaTaylorConfig, available_caches, cache_config  # noqa: E402
from ditcache.errors import DitCacheError, ParamsError, UnknownModelError  # noqa: E402
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE  # noqa: E402
from ditcache.parallel import DEFAULT_TIMEOUT_S, ParallelGroups, destroy_parallel, init_parallel  # noqa: E402
from ditcache.runtime.denoise import GenerationOutput  # noqa: E402
from ditcache.runtime.io import save_frames  # noqa: E402

BUNDLED_MODELS = {"reference": REFERENCE_DIGITS, "reference-moe": REFERENCE_DIGITS_MOE}
# family -> "module:attribute" of a callable (model_dir, device=, dtype=, parallel=) -> pipeline.
FAMILY_LOADERS = {
    "wan": "ditcache.runtime.pipeline:load_pipeline",
    "hunyuan_video": "ditcache.runtime.hunyuan_pipeline:HunyuanVideoPipeline.from_pretrained",
    "qwen_image": "ditcache.runtime.qwen_pipeline:QwenImagePipeline.from_pretrained",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    """One rank's result: the request's output, where this rank wrote it (None if it did not)."""

    output: GenerationOutput
    path: Path | None
    rank: int = 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default="reference",
        help=f"a bundled model ({', '.join(BUNDLED_MODELS)}) or a family ({', '.join(FAMILY_LOADERS)}) "
        "with --model-dir",
    )
    model.add_argument("--model-dir", type=Path, help="diffusers-format folder (overrides a bundled model's)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")

    request = parser.add_argument_group("request (unset values take the model directory's defaults)")
    request.add_argument("--prompt", action="append", help="repeat for a batch")
    request.add_argument("--prompts-file", type=Path, help="one prompt per line (blank lines skipped)")
    request.add_argument("--negative-prompt")
    request.add_argument("--steps", type=int)
    request.add_argument("--seed", type=int, default=0)
    request.add_argument("--guidance-scale", type=float, help="<= 1 turns CFG (the uncond pass) off")
    request.add_argument("--shift", type=float, help="sigma shift of the flow-matching schedule")
    request.add_argument("--height", type=int)
    request.add_argument("--width", type=int)
    request.add_argument("--num-frames", type=int)

    cache = parser.add_argument_group("feature cache")
    cache.add_argument("--cache", choices=available_caches(), default="ada_taylor", help="a registered cache")
    cache.add_argument("--order", type=int, default=1, help="Taylor order (0 = residual reuse only)")
    cache.add_argument("--taylor-threshold", type=int, default=2, help="beyond this many steps reuse the residual")
    cache.add_argument("--model-type", help="params model_type (default: the model directory's)")

    parser.add_argument("--output", type=Path, help="a .png grid or .mp4 video (default: outputs/<model>-<cache>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--telemetry", action="store_true", help="also print the per-branch cache telemetry (JSON) after the summary"
    )
    add_parallel_arguments(parser)
    return parser


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """``--cfg-parallel``, ``--sp``, ``--timeout`` (read under torchrun; world 1 without it)."""
    group = parser.add_argument_group("parallel (under torchrun; ranks beyond cfg x sp are data-parallel replicas)")
    group.add_argument("--cfg-parallel", type=int, choices=(1, 2), default=1, help="2: one CFG branch per rank")
    group.add_argument("--sp", type=int, default=1, help="Ulysses sequence-parallel degree (must divide the heads)")
    group.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds a collective may wait for a peer rank"
    )


@contextmanager
def parallel_session(args: argparse.Namespace) -> Iterator[tuple[ParallelGroups, torch.device]]:
    """This rank's groups and device from the torchrun environment (world 1 without it).

    The process group is destroyed on exit only if this call created it, so a caller that set one
    up itself keeps it. CUDA devices use nccl and the rank's ``LOCAL_RANK`` GPU, anything else gloo.
    """
    owns_group = not dist.is_initialized()
    backend = "nccl" if str(args.device).startswith("cuda") else "gloo"
    groups = init_parallel(args.cfg_parallel, args.sp, backend=backend, timeout_s=args.timeout)
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


def resolve_model(model: str, model_dir: Path | None) -> tuple[str, Path]:
    """(family, directory) for ``--model``/``--model-dir``."""
    if model in BUNDLED_MODELS:
        return "wan", model_dir or BUNDLED_MODELS[model]
    if model in FAMILY_LOADERS:
        if model_dir is None:
            raise ParamsError(f"--model {model} needs --model-dir (a local diffusers-format folder)")
        return model, model_dir
    raise UnknownModelError(
        f"unknown --model {model!r}; choose a bundled model ({', '.join(BUNDLED_MODELS)}) "
        f"or a family ({', '.join(FAMILY_LOADERS)}) with --model-dir"
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values then --prompts-file lines; the reference models default to one of each digit."""
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise ParamsError(f"--prompts-file {args.prompts_file} does not exist")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if prompts:
        return prompts
    if args.model in BUNDLED_MODELS:
        from ditcache.runtime.reference import prompt_for_label

        return [prompt_for_label(k) for k in range(10)]
    raise ParamsError("give at least one --prompt or a --prompts-file")


def load(
    family: str, model_dir: Path, device: str | torch.device, dtype: torch.dtype, parallel: ParallelGroups | None = None
) -> Any:
    """The family's pipeline for ``model_dir``, laid out over ``parallel`` (None: one process)."""
    module_name, attribute = FAMILY_LOADERS[family].split(":")
    target: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        target = getattr(target, name)
    return target(model_dir, device=device, dtype=dtype, parallel=parallel)


def default_dtype(args: argparse.Namespace) -> torch.dtype:
    """``--dtype``, else bfloat16 on GPU and float32 on CPU."""
    if args.dtype:
        return DTYPES[args.dtype]
    return torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32


def request_kwargs(args: argparse.Namespace, prompts: list[str]) -> dict[str, Any]:
    """Pipeline keywords; unset options are left out so the pipeline's defaults apply."""
    optional = {
        "negative_prompt": args.negative_prompt,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
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
        cache=AdaTaylorConfig(n_derivatives=args.order, taylor_threshold=args.taylor_threshold)
        if args.cache == "ada_taylor"
        else cache_config(args.cache),
        progress=not args.no_progress,
    )
    return kwargs


def output_path(args: argparse.Namespace, output: GenerationOutput, groups: ParallelGroups) -> Path:
    """``--output`` (default ``outputs/<model>-<cache>.png|.mp4``), suffixed ``-dp<r>`` per replica."""
    path = args.output
    if path is None:
        suffix = ".png" if output.frames.shape[2] == 1 else ".mp4"
        path = REPO / "outputs" / f"{args.model}-{args.cache}{suffix}"
    if groups.config.dp_degree > 1:
        path = path.with_name(f"{path.stem}-dp{groups.dp_rank}{path.suffix}")
    return path


def run(args: argparse.Namespace) -> RunResult:
    """This rank's whole job: process groups, load, generate, write (one rank per replica), tear down."""
    family, model_dir = resolve_model(args.model, args.model_dir)
    prompts = read_prompts(args)
    with parallel_session(args) as (groups, device):
        kwargs = request_kwargs(args, replica_share(prompts, groups))
        kwargs["seed"] += groups.dp_rank
        kwargs["progress"] = kwargs["progress"] and groups.rank == 0
        pipe = load(family, model_dir, device, default_dtype(args), groups)
        output = pipe(**kwargs)
        path = None
        # Every rank of a replica holds the same frames; its first rank writes them.
        if groups.replica.rank == 0:
            path = save_frames(output.frames, output_path(args, output, groups))
        return RunResult(output, path, groups.rank)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except DitCacheError as exc:
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{where}: {exc}", file=sys.stderr)
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
