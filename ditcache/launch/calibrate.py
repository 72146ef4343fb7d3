"""``ditcache calibrate``: a model's magnitude-ratio curve (and optionally an auto-tuned skip plan) into a params file.

    ditcache calibrate --model reference --model-name Reference-Digits --output my.json
    ditcache calibrate --model wan --model-dir /models/Wan2.1-T2V-1.3B-Diffusers \
        --prompts-file prompts.txt --steps 50 --shift 5 --model-name Wan2.1-T2V-1.3B-mine
    ditcache calibrate --model qwen_image --model-dir /models/Qwen-Image --prompts-file p.txt --model-name Qwen-Image-mine
    ditcache calibrate --model reference --target-speedup 2.0 --output tuned.json

The curve is the mean over every token of every prompt of ||r_t|| / ||r_{t-1}|| per branch, with
the noise level of each step recorded, so runs at other step counts and shifts resample it by
sigma. With ``--target-speedup`` or ``--max-error`` a second pass records the residuals of the
first ``--tune-prompts`` prompts, and for each forecast (``--order``, ``--taylor-threshold``; unset:
each of ``FORECAST_GRID``) the plan with the least predicted error is found. The replay judges one
forecast at a time on the uncached trajectory, so the finalists (every forecast's plan for a
target speedup, the fastest ones for an error budget) are then run on those prompts, and the one
whose latents land closest to the
recording runs' (which computed every step) is written along with the curve, its forecast in the
file's ``forecast`` so a cache built on the file uses it; or the command says plainly that the
target cannot be reached, and writes nothing. The check runs cost one cached generation of the
tune prompts per finalist, at the target's speed.

Request options left unset take the pipeline's own defaults, whatever the family: the calibrator is
sized by the schedule the pipeline reports for the first request (Qwen-Image's shift, for one,
depends on the resolution), so no family has to expose its defaults beforehand. Only the model
name written and the guidance scale the tuner replays fall back to the pipeline's ``settings``.

    torchrun --nproc_per_node=4 --master_port=29532 launch/calibrate.py --cfg-parallel 2 --sp 2 ...

Under ``torchrun`` (``--cfg-parallel``, ``--ulysses``/``--sp``, ``--ring`` as in ``ditcache
generate``; ranks beyond ``cfg x sp`` are data-parallel replicas) replica r runs the prompt batches
r, r + dp, ... (batch i keeps seed ``--seed + i`` whatever the layout), every rank measures its
branch and token shard, and one sum all-reduce over all ranks pools the statistics: 1, 2 or 64
ranks write the same curve.
Rank 0 alone writes the file (atomically). For auto-tuning the ranks' recorded residuals (a token
sample of each shard) are gathered, so the tuner replays whole requests of both branches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ditcache.cache.ada_taylor import AdaTaylorConfig
from ditcache.cache.base import BaseFeatureCache
from ditcache.cache.calibrator import Calibrator
from ditcache.cache.recorder import ResidualRecorder
from ditcache.cache.registry import CacheConfig
from ditcache.cache.tune import (
    FORECAST_GRID,
    PlanReplayer,
    TargetUnreachableError,
    TuneResult,
    forecast_candidates,
    tune_forecasts,
    tuned_params,
)
from ditcache.errors import CacheConfigError, DitCacheError
from ditcache.launch.generate import read_prompts
from ditcache.launch.models import DTYPES, load_pipeline, model_help, resolve_model
from ditcache.launch.outputs import check_output_path, check_writable_dir
from ditcache.launch.session import add_parallel_arguments, guidance_scale, parallel_session
from ditcache.parallel import ParallelGroups, pool_calibration
from ditcache.params import params_from_dict
from ditcache.params.loader import sanitize_model_name
from ditcache.params.userdir import default_user_params_dir
from ditcache.params.writer import write_params

# Token positions of each request the auto-tuner replays (split evenly over the SP shards).
TUNE_TOKENS = 1024


class PooledCalibration(CacheConfig):
    """One :class:`Calibrator` for every request of a calibration, built for the first request's schedule.

    Passed to the pipeline as a config, so the pipeline, which knows its default step count and
    shift, sizes the calibrator; every later request gets the same calibrator (which checks that the
    schedule is the same), so the statistics of all requests pool into one curve.
    """

    name = "calibrator"
    cache_class = Calibrator

    def __init__(self, **calibrator_options: Any) -> None:
        self.calibrator_options = calibrator_options
        self.calibrator: Calibrator | None = None

    def build(
        self, num_inference_steps: int, sigmas: Sequence[float] | None = None, init_step: int = 0
    ) -> BaseFeatureCache:
        if self.calibrator is None:
            self.calibrator = Calibrator(num_inference_steps, sigmas=sigmas, **self.calibrator_options)
        elif num_inference_steps != self.calibrator.num_inference_steps:
            raise CacheConfigError(
                f"a calibration pools requests of one step count: got {num_inference_steps} after "
                f"{self.calibrator.num_inference_steps}"
            )
        elif sigmas is not None:
            self.calibrator.observe_sigmas(sigmas)
        return self.calibrator


def build_parser(prog: str = "ditcache calibrate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="reference", help=model_help())
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--prompt", action="append")
    parser.add_argument("--prompts-file", type=Path)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, help="default: the pipeline's")
    parser.add_argument("--shift", type=float, help="default: the pipeline's")
    parser.add_argument(
        "--guidance-scale", type=guidance_scale,
        help=">= 1; 0 or 1: cond curve only (stated in the file); default: the pipeline's",
    )
    parser.add_argument("--height", type=int, help="default: the pipeline's")
    parser.add_argument("--width", type=int, help="default: the pipeline's")
    parser.add_argument("--num-frames", type=int, help="default: the pipeline's")
    parser.add_argument("--seed", type=int, default=1000, help="first seed; prompt batch i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=10, help="prompts per pipeline call")
    parser.add_argument("--model-name", help="model_type written into the file (default: the model's)")
    parser.add_argument(
        "--output", type=Path,
        help="params file to write (default: <model-name>.json in the user params dir: $DITCACHE_PARAMS_DIR, "
        "else $XDG_CONFIG_HOME/ditcache/params or ~/.config/ditcache/params)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing params file")
    parser.add_argument(
        "--overwrite-shipped", action="store_true", help="allow writing into ditcache's shipped params (maintainers)"
    )
    parser.add_argument("--K", type=int, help="max consecutive skips to write (default: min(4, max(1, N // 10)))")
    parser.add_argument("--thresh", type=float, default=0.12)
    parser.add_argument("--retention-ratio", type=float, default=0.2)
    tuning = parser.add_mutually_exclusive_group()
    tuning.add_argument("--target-speedup", type=float, help="auto-tune a plan with this many times fewer passes")
    tuning.add_argument("--max-error", type=float, help="auto-tune the fastest plan within this predicted error")
    parser.add_argument("--tune-prompts", type=int, default=4, help="prompts whose residuals the tuner replays")
    parser.add_argument(
        "--order", type=int,
        help="n_derivatives the plan is tuned for (default: the tuner chooses among "
        f"{sorted({n for n, _ in FORECAST_GRID})} by a check run)",
    )
    parser.add_argument(
        "--taylor-threshold", type=int,
        help=f"taylor_threshold the plan is tuned for (default: the tuner chooses among {sorted({t for _, t in FORECAST_GRID})})",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_parallel_arguments(parser)
    return parser


def batches(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def replica_batches(prompts: list[str], size: int, groups: ParallelGroups) -> list[tuple[int, list[str]]]:
    """(global batch index, batch) of this rank's replica: batches r, r + dp, ... of the whole list,
    so each batch keeps its seed and the union over replicas is the single-process run."""
    dp = groups.config.dp_degree
    return [(i, batch) for i, batch in enumerate(batches(prompts, size)) if i % dp == groups.dp_rank]


def gather_trajectories(recorder: ResidualRecorder, groups: ParallelGroups) -> dict[bool, list[torch.Tensor]]:
    """Every request's recorded residuals per branch, from all ranks: the token samples of one
    request's SP shards joined along the token axis (the tuner treats tokens independently), the
    CFG branches from their ranks, the replicas' requests one after the other."""
    mine = {c: recorder.trajectories(c) for c in (True, False)}
    everyone = groups.world.all_gather_object((groups.coords, mine), groups.device, op="tuning residuals all_gather")
    merged: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for dp in range(groups.config.dp_degree):
        for cfg in range(groups.config.cfg_degree):
            shards = sorted(
                ((c.sp_rank, t) for c, t in everyone if (c.dp_rank, c.cfg_rank) == (dp, cfg)), key=lambda x: x[0]
            )
            for branch in (True, False):
                for request in zip(*(t[branch] for _, t in shards)):
                    merged[branch].append(torch.cat(request, dim=-2))
    return merged


def request_options(args: argparse.Namespace) -> dict[str, Any]:
    """The request keywords the user set; the rest take the pipeline's defaults."""
    optional = {
        "num_inference_steps": args.steps,
        "sigma_shift": args.shift,
        "guidance_scale": args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
    }
    # The calibrator measures the block stack: decoding the samples would only cost time.
    fixed = {"output_type": "latent", "progress": False}
    return {key: value for key, value in optional.items() if value is not None} | fixed


def output_file(args: argparse.Namespace, model_name: str) -> Path:
    """``--output``, else ``<model name>.json`` in the user params directory (never the installed package)."""
    return args.output or default_user_params_dir() / f"{sanitize_model_name(model_name)}.json"


def check_destination(args: argparse.Namespace, model_name: str | None) -> None:
    """Refuse a params file that could not be written, before the model loads (``model_name`` None:
    the name comes from the model, so only the folder can be checked yet)."""
    if args.output is None and model_name is None:
        check_writable_dir(default_user_params_dir(), "user params directory")
        return
    check_output_path(
        output_file(args, model_name or ""), (".json",), overwrite=args.overwrite or args.overwrite_shipped,
        allow_shipped=args.overwrite_shipped,
    )


def run(args: argparse.Namespace) -> tuple[Path | None, dict]:
    """This rank's calibration job; returns (the file rank 0 wrote, None elsewhere; the params data)."""
    family, model_dir = resolve_model(args.model, args.model_dir)
    prompts = read_prompts(args)
    dtype = DTYPES[args.dtype or "float32"]
    check_destination(args, args.model_name)
    AdaTaylorConfig(n_derivatives=args.order, taylor_threshold=args.taylor_threshold)  # a bad forecast fails here
    with parallel_session(args) as (groups, device):
        mine = replica_batches(prompts, args.batch_size, groups)
        if not mine:  # the same on every rank, so all of them stop here
            raise CacheConfigError(
                f"{len(prompts)} prompts in batches of {args.batch_size} leave replica {groups.dp_rank} of "
                f"{groups.config.dp_degree} nothing to calibrate: give at least one batch per replica"
            )
        pipe = load_pipeline(family, model_dir, device, dtype, groups)
        model_name = args.model_name or pipe.settings.model_type or "custom"
        check_destination(args, model_name)  # the name is known now; nothing has been computed yet
        pooled = PooledCalibration(
            sigma_shift=args.shift, model_name=model_name, output_path=output_file(args, model_name), K=args.K,
            thresh=args.thresh, retention_ratio=args.retention_ratio,
        )
        common = request_options(args)
        show = not args.no_progress and groups.rank == 0
        for i, batch in tqdm(mine, desc="calibrating", disable=not show):
            pipe(prompt=batch, seed=args.seed + i, cache=pooled, **common)
        calibrator = pooled.calibrator
        assert calibrator is not None  # built by the first request, and every replica ran one
        pool_calibration(calibrator, groups)
        data = calibrator.result()

        if args.target_speedup is not None or args.max_error is not None:
            steps, sigmas = calibrator.num_inference_steps, calibrator.sigmas
            guidance = pipe.settings.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
            recorder = ResidualRecorder(steps, max_tokens=max(1, TUNE_TOKENS // groups.config.sp_degree))
            mine = replica_batches(prompts[: args.tune_prompts], args.batch_size, groups)
            # the recording runs compute every step: their latents are what a plan is checked against
            recorded = [
                pipe(prompt=batch, seed=args.seed + i, cache=recorder, **common)
                for i, batch in tqdm(mine, desc="recording", disable=not show)
            ]
            references = [out.frames for out in recorded]
            # an expert switch starts a fresh cache that computes its first step: every plan does too
            starts = sorted(steps[0] for steps in recorded[0].expert_steps.values() if steps)
            trajectories = gather_trajectories(recorder, groups)
            params = params_from_dict(data, source=f"calibration of {model_name}")
            target = {"target_speedup": args.target_speedup} if args.target_speedup else {"max_error": args.max_error}
            results = tune_forecasts(
                lambda n, t: PlanReplayer(trajectories, sigmas, guidance, n_derivatives=n, taylor_threshold=t,
                                          segment_starts=starts),
                params, forecast_candidates(args.order, args.taylor_threshold),
                target_speedup=args.target_speedup, max_error=args.max_error, sigmas=sigmas,
            )
            check = PlanCheck(pipe, params, steps, mine, references, args.seed, common, groups)
            result, checked = choose_forecast(results, check, args.max_error is not None, show)
            data = tuned_params(params, result, steps, target)
            data["provenance"]["requests"] = calibrator.result()["provenance"]["requests"]
            data["provenance"]["tuned"]["forecasts_checked"] = checked

        if groups.rank != 0:
            return None, data
        return write_params(data, output_file(args, model_name), overwrite_shipped=args.overwrite_shipped), data


class PlanCheck:
    """Runs a tuned plan with its forecast on the recorded prompts (same seeds) and measures how far its
    latents land from the recording runs', which computed every step: the replay judges one forecast
    at a time on the uncached trajectory, a real run also shows how the errors compound. Every rank
    of a replica holds the same latents, so a sum over all ranks weighs every replica alike."""

    def __init__(self, pipe: Any, params: Any, steps: int, batches: list[tuple[int, list[str]]],
                 references: list[torch.Tensor], seed: int, common: dict[str, Any], groups: ParallelGroups) -> None:  # fmt: skip
        self.pipe, self.params, self.steps, self.batches = pipe, params, steps, batches
        self.references, self.seed, self.common, self.groups = references, seed, common, groups

    def __call__(self, result: TuneResult) -> float:
        """Mean squared latent error of ``result``'s plan over every recorded prompt (collective)."""
        tuned = params_from_dict(tuned_params(self.params, result, self.steps, {}), source="<a tuned plan>")
        config = AdaTaylorConfig(params=tuned)  # the forecast the params record
        sums = torch.zeros(2, dtype=torch.float64)
        for (i, batch), reference in zip(self.batches, self.references):
            out = self.pipe(prompt=batch, seed=self.seed + i, cache=config, **self.common).frames
            sums += torch.tensor([(out.double() - reference.double()).pow(2).sum().item(), reference.numel()])
        total = self.groups.world.all_reduce_sum(sums.to(self.groups.device), op="plan check all_reduce").cpu()
        return float(total[0] / total[1])


def choose_forecast(
    results: list[TuneResult], check: PlanCheck, by_speed: bool, show: bool
) -> tuple[TuneResult, list[dict]]:
    """The tuned plan whose check run lands closest to the uncached latents: among all of them for a
    target speedup (each meets it), among the fastest for an error budget (``by_speed``, where speed
    is the point); with one finalist no check runs. Returns it and what was checked (for the
    params' provenance)."""
    fastest = max(r.predicted_speedup for r in results)  # over the branches the run has
    finalists = [r for r in results if not by_speed or r.predicted_speedup >= fastest * (1 - 1e-9)]
    if len(finalists) == 1:
        return finalists[0], []
    errors = [check(r) for r in tqdm(finalists, desc="checking plans", disable=not show)]
    checked = [{**r.forecast, "predicted_error": r.chosen.predicted_error, "check_mse": e} for r, e in zip(finalists, errors)]
    return finalists[errors.index(min(errors))], checked


def summary(path: Path, data: dict) -> str:
    prov = data["provenance"]
    line = (
        f"{data['model_type']}: {data['num_inference_steps']} steps, shift {data['sigma_shift'] or 'default'}, "
        f"requests {prov['requests']}, K={data['K']} thresh={data['thresh']} retention={data['retention_ratio']}"
    )
    tuned = prov.get("tuned")
    if tuned:
        forecast = data.get("forecast") or {}
        line += (f" | tuned ({tuned['method']}, order {forecast.get('n_derivatives')} taylor_threshold "
                 f"{forecast.get('taylor_threshold')}): predicted {tuned['predicted_speedup']:.2f}x fewer passes")
    return f"{line} | wrote {path}"


def main(argv: Sequence[str] | None = None, prog: str = "ditcache calibrate") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        path, data = run(args)
    except TargetUnreachableError as exc:
        print(f"target unreachable, nothing written: {exc}", file=sys.stderr)
        return 3
    except DitCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if path is not None:
        print(summary(path, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
