"""Generate images or videos with a feature-cached DiT (single process).

    python launch/generate.py                                   # reference digits, cache on -> PNG grid
    python launch/generate.py --model reference --prompt "a handwritten 3" --cache none
    python launch/generate.py --model reference-moe --steps 40
    python launch/generate.py --model wan --model-dir /models/Wan2.1-T2V-1.3B-Diffusers \
        --prompt "a cat playing piano" --model-type Wan2.1-T2V-1.3B --output cat.mp4

Argument parsing (``build_parser``/``main``) is kept apart from the run (``run``) so that launchers
which add process groups can reuse both.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ditcache.errors import DitCacheError, ParamsError, UnknownModelError  # noqa: E402
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE  # noqa: E402
from ditcache.runtime.io import save_frames  # noqa: E402
from ditcache.runtime.pipeline import GenerationOutput  # noqa: E402

BUNDLED_MODELS = {"reference": REFERENCE_DIGITS, "reference-moe": REFERENCE_DIGITS_MOE}
# family -> "module:attribute" of a callable (model_dir, device=, dtype=) -> pipeline.
FAMILY_LOADERS = {
    "wan": "ditcache.runtime.pipeline:load_pipeline",
    "hunyuan_video": "ditcache.runtime.hunyuan_pipeline:HunyuanVideoPipeline.from_pretrained",
    "qwen_image": "ditcache.runtime.qwen_pipeline:QwenImagePipeline.from_pretrained",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunResult:
    output: GenerationOutput
    path: Path


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
    cache.add_argument("--cache", choices=("none", "ada_taylor"), default="ada_taylor")
    cache.add_argument("--order", type=int, default=1, help="Taylor order (0 = residual reuse only)")
    cache.add_argument("--taylor-threshold", type=int, default=2, help="beyond this many steps reuse the residual")
    cache.add_argument("--model-type", help="params model_type (default: the model directory's)")

    parser.add_argument("--output", type=Path, help="a .png grid or .mp4 video (default: outputs/<model>-<cache>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


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


def load(family: str, model_dir: Path, device: str, dtype: torch.dtype) -> Any:
    module_name, attribute = FAMILY_LOADERS[family].split(":")
    target: Any = importlib.import_module(module_name)
    for name in attribute.split("."):
        target = getattr(target, name)
    return target(model_dir, device=device, dtype=dtype)


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
        enable_ada_taylor_cache=args.cache == "ada_taylor",
        ada_taylor_n_derivatives=args.order,
        ada_taylor_taylor_threshold=args.taylor_threshold,
        progress=not args.no_progress,
    )
    return kwargs


def run(args: argparse.Namespace) -> RunResult:
    """Load the model, generate, save; returns the output and where it was written."""
    family, model_dir = resolve_model(args.model, args.model_dir)
    prompts = read_prompts(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    pipe = load(family, model_dir, args.device, dtype)
    output = pipe(**request_kwargs(args, prompts))
    path = args.output
    if path is None:
        suffix = ".png" if output.frames.shape[2] == 1 else ".mp4"
        path = REPO / "outputs" / f"{args.model}-{args.cache}{suffix}"
    return RunResult(output, save_frames(output.frames, path))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run(args)
    except DitCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.output.summary())
    print(f"wrote {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
