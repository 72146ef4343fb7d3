"""The ``ditcache`` command: run the launchers, inspect params and the skip plan they give.

    ditcache generate --prompt "a handwritten 3"        # see `ditcache generate --help`
    ditcache calibrate --model reference --output my.json
    ditcache ray-generate --ranks 2 --prompts-file p.txt --output-dir out/
    ditcache serve --model reference --port 8000          # HTTP: POST /v1/images/generations
    ditcache list                                       # models with params (shipped + user dir)
    ditcache plan --model Wan2.1-T2V-1.3B --steps 50
    ditcache plan --params-file my.json --steps 30 --json

The launcher subcommands hand their arguments to ``ditcache.launch.<name>.main``, imported only
when chosen, so ``list`` and ``plan`` start without loading torch models or Ray.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings

from ditcache.cache.ada_taylor import AdaTaylorConfig, resolve_forecast
from ditcache.cache.plan import plan_run
from ditcache.cache.context import branch_name
from ditcache.errors import CacheConfigError, DitCacheError
from ditcache.params import list_models, load_params
from ditcache.runtime.scheduler import (
    Schedule,
    experts_by_boundary,
    hunyuan_video_schedule,
    qwen_image_schedule,
    wan_schedule,
)

FAMILIES = ("wan", "hunyuan_video", "qwen_image")
# Qwen-Image's released request (1024 x 1024): its dynamic shift depends on the image token count.
QWEN_IMAGE_TOKENS = (1024 // 16) ** 2


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models(args.params_dir):
        p = load_params(name, args.params_dir)
        rows.append(
            {
                "model_type": name,
                "default_steps": p.default_steps or p.num_inference_steps,
                "calibrated_steps": p.num_inference_steps,
                "K": p.K,
                "thresh": p.thresh,
                "retention_ratio": p.retention_ratio,
                "proxy": bool(p.provenance.get("proxy")),
                "path": p.path,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'model_type':<24} {'steps':>5} {'cal':>4} {'K':>2} {'thresh':>6} {'ret':>4}  proxy")
    for r in rows:
        print(
            f"{r['model_type']:<24} {r['default_steps']:>5} {r['calibrated_steps']:>4} {r['K']:>2} "
            f"{r['thresh']:>6.3f} {r['retention_ratio']:>4.2f}  {'yes' if r['proxy'] else ''}"
        )
    return 0


def family_of(model_type: str) -> str:
    """The family whose sampler a params model_type runs with (Wan's for anything not named otherwise)."""
    if model_type.startswith("HunyuanVideo"):
        return "hunyuan_video"
    if model_type.startswith("Qwen-Image"):
        return "qwen_image"
    return "wan"


def plan_schedule(family: str, steps: int, shift: float) -> Schedule:
    """The schedule the family's pipeline runs at ``steps`` and ``shift`` (its default scheduler:
    UniPC for Wan, FlowMatchEuler for HunyuanVideo and Qwen-Image), so the plan sees the run's
    sigmas and, for Wan2.2, the run's expert switch on the scheduler's timesteps."""
    if family == "hunyuan_video":
        return hunyuan_video_schedule(steps, shift)
    if family == "qwen_image":
        return qwen_image_schedule(steps, QWEN_IMAGE_TOKENS, shift)
    return wan_schedule(steps, shift)


def _cmd_plan(args: argparse.Namespace) -> int:
    source = args.params_file or args.model
    if source is None:
        raise SystemExit("ditcache plan: give --model NAME or --params-file FILE (see `ditcache list`)")
    params = load_params(source, args.params_dir)
    steps = args.steps if args.steps is not None else (params.default_steps or params.num_inference_steps)
    if steps < 1:
        raise CacheConfigError(f"num_inference_steps must be an integer >= 1, got {steps}")
    boundary = args.boundary_ratio if args.boundary_ratio is not None else params.boundary_ratio
    shift = args.shift or params.default_shift or params.sigma_shift
    family = args.family or family_of(params.model_type)
    schedule = None if shift is None else plan_schedule(family, steps, shift)
    if boundary is not None:
        if schedule is None:
            raise SystemExit("ditcache plan: a two-expert plan needs the run's --shift (the expert switch depends on it)")
        experts = experts_by_boundary(schedule.timesteps, boundary, num_train_timesteps=schedule.num_train_timesteps)
    else:
        experts = ["transformer"] * steps
    config = AdaTaylorConfig(
        params=params, n_derivatives=args.n_derivatives, taylor_threshold=args.taylor_threshold
    )
    branches = [True] if args.no_cfg else [True, False]
    sigmas = None if schedule is None else schedule.sigmas[:-1].tolist()
    per_expert = plan_run(config, experts, sigmas, branches)
    plan = {
        branch_name(c): sorted(s for expert in per_expert.values() for s in expert[branch_name(c)]) for c in branches
    }
    computed = sum(len(v) for v in plan.values())
    result = {
        "model_type": params.model_type,
        "num_inference_steps": steps,
        "sigma_shift": shift,
        "family": family,
        "scheduler": None if schedule is None else schedule.scheduler_name,
        "K": params.K,
        "thresh": params.thresh,
        "retention_ratio": params.retention_ratio,
        "forecast": dict(zip(("n_derivatives", "taylor_threshold"),
                             resolve_forecast(params, args.n_derivatives, args.taylor_threshold))),  # fmt: skip
        "compute_steps": plan,
        "skip_steps": {name: [s for s in range(steps) if s not in set(v)] for name, v in plan.items()},
        "experts": {name: {"steps": [i for i, e in enumerate(experts) if e == name], "compute_steps": p}
                    for name, p in per_expert.items()},
        "block_passes": {"uncached": steps * len(branches), "cached": computed},
        "ideal_speedup": steps * len(branches) / computed,
        "calibrated_steps": params.num_inference_steps,
        "boundary_ratio": boundary,
        "provenance": params.provenance,
        "path": params.path,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    at = f", shift {shift:g} ({schedule.scheduler_name})" if schedule is not None else ""
    print(f"{params.model_type}: {steps} steps{at} (curve calibrated at {params.num_inference_steps}), "
          f"K={params.K} thresh={params.thresh} retention={params.retention_ratio}, "
          f"forecast order {result['forecast']['n_derivatives']} taylor_threshold {result['forecast']['taylor_threshold']}")
    if len(per_expert) > 1:
        for name, info in result["experts"].items():
            print(f"  {name}: steps {info['steps'][0]}-{info['steps'][-1]} (boundary {boundary:g})")
    for name, compute in plan.items():
        skipped = result["skip_steps"][name]
        print(f"  {name:<6} compute {len(compute):>3}: {compute}")
        print(f"  {'':<6} skip    {len(skipped):>3}: {skipped}")
    print(f"  block passes {computed}/{steps * len(branches)}, ideal speedup {result['ideal_speedup']:.2f}x")
    prov = params.provenance
    origin = prov.get("source_repo") or prov.get("source", "unknown")
    where = prov.get("source_path", "")
    print(f"  provenance: {origin} {prov.get('source_commit', '')} {where}".rstrip())
    if prov.get("proxy"):
        print(f"  PROXY: {prov.get('proxy_reason', 'measured on another model')}")
    return 0


# subcommand -> (module whose main(argv, prog) runs it, help)
LAUNCHERS = {
    "generate": ("ditcache.launch.generate", "generate images or videos (one process, or one rank under torchrun)"),
    "calibrate": ("ditcache.launch.calibrate", "calibrate a model's magnitude-ratio curve into a params file"),
    "ray-generate": ("ditcache.launch.ray_generate", "generate a batch of prompts on a Ray cluster"),
    "serve": ("ditcache.launch.serve", "serve a model over HTTP on Ray Serve"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditcache", description="Feature-cached inference for diffusion transformers")
    parser.add_argument("--params-dir", help="user params directory for list and plan (searched before the shipped files)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in LAUNCHERS.items():
        # The launcher parses its own arguments (and --help): this parser only routes to it.
        sub.add_parser(name, help=help_text, add_help=False)
    p_list = sub.add_parser("list", help="list models with params")
    p_list.add_argument("--json", action="store_true")
    p_list.set_defaults(func=_cmd_list)
    p_plan = sub.add_parser("plan", help="print the planned compute/skip steps for a model and step count")
    p_plan.add_argument("--model", help="model_type of shipped or user params (see `ditcache list`)")
    p_plan.add_argument("--params-file", help="a params JSON file instead of --model")
    p_plan.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the model's)")
    p_plan.add_argument("--n-derivatives", type=int, help="default: the params' tuned forecast, else 1")
    p_plan.add_argument("--taylor-threshold", type=int, help="default: the params' tuned forecast, else 2")
    p_plan.add_argument("--shift", type=float, help="sigma shift of the run (default: the params' default_shift or sigma_shift)")
    p_plan.add_argument(
        "--boundary-ratio", type=float, help="two-expert models: the expert switch (default: the params' boundary_ratio)"
    )
    p_plan.add_argument(
        "--family", choices=FAMILIES, help="whose sampler the run uses (default: from the model_type; Wan otherwise)"
    )
    p_plan.add_argument("--no-cfg", action="store_true", help="guidance off: only the cond branch runs")
    p_plan.add_argument("--json", action="store_true")
    p_plan.set_defaults(func=_cmd_plan)
    return parser


def _run_launcher(command: str, argv: list[str]) -> int:
    module_name, _ = LAUNCHERS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name not in ("ray", "fastapi", "starlette"):
            raise
        print(f"ditcache {command}: error: {exc.name} is not installed; pip install 'ditcache[ray]'", file=sys.stderr)
        return 2
    return module.main(argv, prog=f"ditcache {command}")


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """A warning as one ``warning: ...`` line, without the source line Python prints under it."""
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command in LAUNCHERS:
        if args.params_dir is not None:
            parser.error(f"--params-dir applies to list and plan, not {args.command}")
        return _run_launcher(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except DitCacheError as exc:
        print(f"ditcache {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
