"""What storing AdaTaylorCache's residuals in bf16 costs: ``cache_dtype="model"`` vs the fp32 default.

The question: "I run my bf16 model; if I set ``cache_dtype="model"`` instead of the fp32 cache, how
much PSNR do I lose?" Per bundled reference model, loaded in bf16 (``load_pipeline(...,
dtype=torch.bfloat16)``: the transformers' weights in bf16, the modules diffusers keeps in fp32 left
so, as a GPU user gets it), the uncached bf16 output is the reference. AdaTaylorCache then runs at
about 2x and about 3x fewer block passes, at orders 1 and 2, once with each storage dtype.

The plan (which steps compute) is the threshold rule on the model's params' curve. Per (K,
retention_ratio) of a small grid, the thresh whose plan (as the pipeline's caches build it for this
run's steps, sigmas and experts) is nearest the target is found; the distinct plans within 5% of the
target are screened on a few samples of other noise (the quality benchmark's ``CALIB_SEED``, order 1,
fp32 cache) and the best is used for every order and both storage dtypes. The storage dtype does not
change the plan: every pair is checked to have computed the same steps.

Per sample: PSNR against the uncached bf16 output. Per setting: the mean over samples for each dtype,
the mean paired difference (model minus float32) with a 95% paired-bootstrap interval (samples
resampled, the same picks for both dtypes), and what each branch's cache holds at the end of the run
(the request's telemetry: ``cache_stats[expert][branch]["stored_bytes"]``, summed over experts; a
two-expert run has released the first expert's cache by then). As context, the PSNR of the uncached
bf16 output against the uncached fp32 one: how far bf16 weights alone move the samples.

Steps, sigmas, shift and guidance are the pipeline's own defaults (``--steps`` overrides the step
count only) and are recorded from what the pipeline reports; the evaluation batch is the quality
benchmark's (``EVAL_SEED``, sample i draws digit i % 10).

    python -m bench.cache_storage [--samples 40] [--steps N] [--out bench/results/cache_storage.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import ditcache
from ditcache.models import REFERENCE_DIGITS, REFERENCE_DIGITS_MOE
from ditcache.params import CacheParams, load_params
from ditcache.runtime.io import atomic_target

from bench.progress import ElapsedLog
from bench.quality.metrics import PSNR_CAP_DB, psnr_from_mse
from bench.quality.workload import CALIB_SEED, EVAL_SEED, Batch, make_batch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "bench" / "results" / "cache_storage.json"
MODEL_DIRS = (REFERENCE_DIGITS, REFERENCE_DIGITS_MOE)
STORAGE = ("float32", "model")
TARGETS = (2.0, 3.0)  # block-pass speedups the plans aim at
ORDERS = (1, 2)
TAYLOR_THRESHOLD = 2  # AdaTaylorCache's default
MODEL_DTYPE = torch.bfloat16
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# Plan search: per (K, retention_ratio), thresh on a log grid (100: no threshold, only K and the
# retained warm-up steps limit skipping); the plans within PLAN_TOLERANCE of a target are screened.
THRESH_GRID = tuple(round(0.005 * 1.12**i, 6) for i in range(60)) + (100.0,)
SCREEN_K = (2, 3, 4)  # besides the params' own
SCREEN_RETENTION = (0.05, 0.1, 0.2)  # besides the params' own
PLAN_TOLERANCE = 0.05  # "about 2x": a planned block-pass speedup within 5% of the target
SCREEN_ORDER = 1
DEFAULT_SCREEN_SAMPLES = 5
DEFAULT_SAMPLES = 40
ROUND = 4


# -- plans --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What the pipeline reported for the uncached request: steps, the sigmas it hands a cache
    config's ``build``, and the steps each expert runs."""

    steps: int
    sigmas: tuple[float, ...]
    expert_steps: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, out: ditcache.GenerationOutput) -> RunShape:
        steps = max(out.branch_steps.values())
        experts = {name: tuple(s) for name, s in out.expert_steps.items() if s}
        return cls(steps, tuple(out.sigmas[:steps]), experts)


Plan = tuple[tuple[int, ...], tuple[int, ...]]  # the steps the cond and the uncond branch compute


def planned_steps(shape: RunShape, params: CacheParams) -> Plan:
    """The steps each branch computes under the caches the pipeline builds: per expert, the cache
    built from the expert's first step, asked for its plan, restricted to the expert's own steps."""
    config = ditcache.AdaTaylorConfig(params=params, n_derivatives=0)
    plan: dict[bool, set[int]] = {True: set(), False: set()}
    for steps in shape.expert_steps.values():
        cache = config.build(shape.steps, list(shape.sigmas), steps[0])
        for is_cond in (True, False):
            plan[is_cond] |= set(cache.planned_compute_steps(is_cond)) & set(steps)
    return tuple(sorted(plan[True])), tuple(sorted(plan[False]))


def plan_speedup(shape: RunShape, plan: Plan) -> float:
    return 2 * shape.steps / sum(len(steps) for steps in plan)


def _trials(params: CacheParams) -> dict[tuple[int, float], list[CacheParams]]:
    """The threshold-rule settings searched, per (K, retention_ratio): the params' own and
    ``SCREEN_K`` x ``SCREEN_RETENTION``, each over ``THRESH_GRID``. A tuned placement
    (``compute_steps``) in the params is dropped, so that the rule decides the plan."""
    base = dataclasses.replace(params, compute_steps=None)
    return {
        (K, retention): [dataclasses.replace(base, K=K, retention_ratio=retention, thresh=t) for t in THRESH_GRID]
        for K in dict.fromkeys((params.K, *SCREEN_K))
        for retention in dict.fromkeys((params.retention_ratio, *SCREEN_RETENTION))
    }


def _nearest(shape: RunShape, trials: list[CacheParams], target: float) -> tuple[CacheParams, Plan]:
    """The trial whose plan's speedup is nearest ``target`` (the smallest thresh among equals)."""
    plans = [(trial, planned_steps(shape, trial)) for trial in trials]
    return min(plans, key=lambda tp: (round(abs(plan_speedup(shape, tp[1]) - target), 6), tp[0].thresh))


def plan_candidates(shape: RunShape, params: CacheParams, target: float) -> list[tuple[CacheParams, Plan]]:
    """Per (K, retention_ratio), the plan nearest ``target``, kept when within ``PLAN_TOLERANCE`` of
    it; distinct plans only. With none that close, the nearest plan over all of them alone."""
    nearest = [_nearest(shape, trials, target) for trials in _trials(params).values()]
    found: dict[Plan, CacheParams] = {}
    for trial, plan in nearest:
        if abs(plan_speedup(shape, plan) / target - 1) <= PLAN_TOLERANCE:
            found.setdefault(plan, trial)
    if not found:
        trial, plan = _nearest(shape, [trial for trial, _ in nearest], target)
        found[plan] = trial
    return [(trial, plan) for plan, trial in found.items()]


def choose_plan(
    pipe: Any, shape: RunShape, params: CacheParams, target: float, screen: Batch, steps: int | None
) -> tuple[CacheParams, Plan, list[dict]]:
    """Of the candidate plans near ``target``, the one with the best pooled PSNR on the screening
    batch (other noise than the evaluation's) at order ``SCREEN_ORDER`` with the fp32 cache. The
    screening results come back too (empty when there was one candidate)."""
    candidates = plan_candidates(shape, params, target)
    if len(candidates) == 1:
        trial, plan = candidates[0]
        return trial, plan, []
    reference = _generate(pipe, screen, steps, None).frames
    screened = []
    for trial, plan in candidates:
        config = ditcache.AdaTaylorConfig(params=trial, n_derivatives=SCREEN_ORDER, cache_dtype="float32")
        psnr = pooled_psnr(_generate(pipe, screen, steps, config).frames, reference)
        screened.append({"K": trial.K, "retention_ratio": trial.retention_ratio, "thresh": trial.thresh,
                         "planned_block_pass_speedup": round(plan_speedup(shape, plan), ROUND),
                         "screen_psnr": round(psnr, ROUND)})  # fmt: skip
    best = max(range(len(candidates)), key=lambda i: screened[i]["screen_psnr"])
    trial, plan = candidates[best]
    return trial, plan, screened


# -- metrics ------------------------------------------------------------------------------------


def per_sample_psnr(frames: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR of each sample (frames ``[B, C, F, H, W]`` in [0, 1]; identical samples: the cap)."""
    mse = (frames.double() - reference.double()).pow(2).flatten(1).mean(1)
    return psnr_from_mse(mse)


def pooled_psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    return float(psnr_from_mse((frames.double() - reference.double()).pow(2).mean()))


def paired_bootstrap_ci(
    delta: torch.Tensor, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> list[float]:
    """95% percentile-bootstrap interval of the mean of per-sample differences (fixed seed)."""
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(delta.numel(), (resamples, delta.numel()), generator=generator)
    means = delta.double()[picks].mean(1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype))
    return [round(float(low), ROUND), round(float(high), ROUND)]


def cache_bytes_per_branch(out: ditcache.GenerationOutput) -> dict[str, int]:
    """What each branch's caches store at the end of the request, summed over experts."""
    totals: dict[str, int] = {}
    for per_branch in out.cache_stats.values():
        for branch, stats in per_branch.items():
            totals[branch] = totals.get(branch, 0) + int(stats.get("stored_bytes", 0))
    return totals


def _r(values: torch.Tensor) -> list[float]:
    return [round(float(v), ROUND) for v in values]


# -- the benchmark ------------------------------------------------------------------------------


def _generate(pipe: Any, batch: Batch, steps: int | None, cache: Any) -> ditcache.GenerationOutput:
    """The pipeline at its own defaults (shift, guidance, and steps unless ``steps`` is given)."""
    extra = {} if steps is None else {"num_inference_steps": steps}
    return pipe(batch.prompts, seed=batch.seed, cache=cache, progress=False, **extra)


def _transformer_dtypes(pipe: Any) -> dict[str, str]:
    return {name: str(adapter.transformer.dtype).removeprefix("torch.") for name, adapter in pipe.adapters.items()}


def _row(model: str, target: float, order: int, taylor_threshold: int, plan: CacheParams, planned: Plan,
         reference: ditcache.GenerationOutput, runs: dict[str, ditcache.GenerationOutput]) -> dict:  # fmt: skip
    """One (target, order): both storage dtypes against the reference, paired per sample."""
    passes = {s: out.total_stack_passes() for s, out in runs.items()}
    computed = {s: {b: v["computed_steps"] for b, v in out.telemetry()["branches"].items()} for s, out in runs.items()}
    if passes["float32"] != passes["model"] or computed["float32"] != computed["model"]:
        raise RuntimeError(f"{model} ~{target:g}x order {order}: the storage dtypes ran different steps: {computed}")
    psnr = {s: per_sample_psnr(out.frames, reference.frames) for s, out in runs.items()}
    delta = psnr["model"] - psnr["float32"]
    memory = {s: int(sum(out.cache_memory_bytes.values())) for s, out in runs.items()}
    ran = computed["float32"]
    return {
        "model": model,
        "target_speedup": target,
        "order": order,
        "taylor_threshold": taylor_threshold,
        "K": plan.K,
        "thresh": plan.thresh,
        "retention_ratio": plan.retention_ratio,
        "planned_block_pass_speedup": round(sum(reference.branch_steps.values()) / sum(map(len, planned)), ROUND),
        "plan_matches_run": (tuple(ran.get("cond", ())), tuple(ran.get("uncond", ()))) == planned,
        "computed_steps": ran,
        "block_passes": {s: dict(p) for s, p in passes.items()},
        "block_passes_equal": True,
        "block_pass_speedup": round(sum(reference.branch_steps.values()) / sum(passes["float32"].values()), ROUND),
        "psnr_mean": {s: round(float(p.mean()), ROUND) for s, p in psnr.items()},
        "psnr_pooled": {s: round(pooled_psnr(out.frames, reference.frames), ROUND) for s, out in runs.items()},
        "psnr_per_sample": {s: _r(p) for s, p in psnr.items()},
        "delta_db_mean": round(float(delta.mean()), ROUND),
        "delta_db_ci95": paired_bootstrap_ci(delta),
        "delta_db_min": round(float(delta.min()), ROUND),
        "delta_db_max": round(float(delta.max()), ROUND),
        "samples_identical": sum(bool(torch.equal(a, b)) for a, b in zip(runs["float32"].frames, runs["model"].frames)),
        "cache_bytes_per_branch": {s: cache_bytes_per_branch(out) for s, out in runs.items()},
        "cache_memory_bytes": memory,
        "cache_bytes_ratio": round(memory["model"] / memory["float32"], ROUND) if memory["float32"] else None,
    }


def model_result(
    model_dir: Path,
    batch: Batch,
    screen: Batch,
    steps: int | None,
    targets: Sequence[float],
    orders: Sequence[int],
    taylor_threshold: int,
    log: Callable[[str], None],
) -> tuple[dict, list[dict]]:
    """One model: its context (run shape, plans, fp32-vs-bf16 reference) and one row per (target, order)."""
    pipe = ditcache.load_pipeline(model_dir, dtype=MODEL_DTYPE)
    dtypes = _transformer_dtypes(pipe)
    if set(dtypes.values()) != {str(MODEL_DTYPE).removeprefix("torch.")}:
        raise RuntimeError(f"{model_dir.name}: the transformers did not load in {MODEL_DTYPE}: {dtypes}")
    reference = _generate(pipe, batch, steps, None)
    shape = RunShape.of(reference)
    fp32 = _generate(ditcache.load_pipeline(model_dir), batch, steps, None)
    settings = pipe.settings
    model_type = settings.model_type or model_dir.name
    params = load_params(model_type)
    context: dict[str, Any] = {
        "model_type": model_type,
        "transformer_dtypes": dtypes,
        "pipeline_settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else repr(settings),
        "steps": shape.steps,
        "sigmas": [round(float(s), 6) for s in shape.sigmas],
        "expert_steps": {name: list(s) for name, s in shape.expert_steps.items()},
        "params": {"file": params.path, "K": params.K, "thresh": params.thresh,
                   "retention_ratio": params.retention_ratio,
                   "had_tuned_compute_steps": params.compute_steps is not None},  # fmt: skip
        "uncached_bf16_vs_fp32_psnr_mean": round(float(per_sample_psnr(reference.frames, fp32.frames).mean()), ROUND),
        "uncached_bf16_vs_fp32_psnr_pooled": round(pooled_psnr(reference.frames, fp32.frames), ROUND),
        "plans": {},
    }
    log(f"{model_dir.name}: {shape.steps} steps, experts {list(shape.expert_steps)}, "
        f"uncached bf16 vs fp32 {context['uncached_bf16_vs_fp32_psnr_mean']:.2f} dB")  # fmt: skip
    rows = []
    for target in targets:
        plan, planned, screened = choose_plan(pipe, shape, params, target, screen, steps)
        context["plans"][f"{target:g}x"] = {
            "K": plan.K, "thresh": plan.thresh, "retention_ratio": plan.retention_ratio,
            "planned_block_pass_speedup": round(plan_speedup(shape, planned), ROUND),
            "compute_steps": {"cond": list(planned[0]), "uncond": list(planned[1])},
            "screened": screened,
        }  # fmt: skip
        log(f"{model_dir.name} ~{target:g}x: K {plan.K}, retention {plan.retention_ratio:g}, thresh {plan.thresh:g} "
            f"({plan_speedup(shape, planned):.2f}x planned; {len(screened) or 1} candidate(s))")  # fmt: skip
        for order in orders:
            runs = {
                storage: _generate(pipe, batch, steps, ditcache.AdaTaylorConfig(
                    params=plan, n_derivatives=order, taylor_threshold=taylor_threshold, cache_dtype=storage))
                for storage in STORAGE
            }  # fmt: skip
            row = _row(model_dir.name, target, order, taylor_threshold, plan, planned, reference, runs)
            if not row["plan_matches_run"]:
                log(f"warning: {model_dir.name} ~{target:g}x: the run computed other steps than planned")
            rows.append(row)
            low, high = row["delta_db_ci95"]
            log(
                f"{model_dir.name} ~{target:g}x o{order}: {row['block_pass_speedup']:.2f}x, "
                f"fp32 cache {row['psnr_mean']['float32']:.2f} / bf16 cache {row['psnr_mean']['model']:.2f} dB, "
                f"delta {row['delta_db_mean']:+.3f} [{low:+.3f}, {high:+.3f}]"
            )
    return context, rows


def run_benchmark(
    model_dirs: Sequence[Path] = MODEL_DIRS,
    samples: int = DEFAULT_SAMPLES,
    steps: int | None = None,
    targets: Sequence[float] = TARGETS,
    orders: Sequence[int] = ORDERS,
    taylor_threshold: int = TAYLOR_THRESHOLD,
    screen_samples: int = DEFAULT_SCREEN_SAMPLES,
    command: str = "",
    log: Callable[[str], None] = print,
) -> dict:
    """The whole measurement as one JSON-ready document (``steps=None``: the pipelines' defaults)."""
    import diffusers

    started = time.perf_counter()
    batch, screen = make_batch(samples, EVAL_SEED), make_batch(screen_samples, CALIB_SEED)
    models, rows = {}, []
    for model_dir in model_dirs:
        context, model_rows = model_result(
            Path(model_dir), batch, screen, steps, targets, orders, taylor_threshold, log
        )
        models[Path(model_dir).name] = context
        rows += model_rows
    return {
        "what": "AdaTaylorCache on a bf16 model: cache_dtype='model' (bf16 storage) vs 'float32'; per-sample PSNR "
        "against the uncached bf16 output of the same pipeline, request and noise; delta = model - float32",
        "command": command,
        "settings": {
            "model_dtype": str(MODEL_DTYPE).removeprefix("torch."),
            "samples": samples,
            "eval_seed": EVAL_SEED,
            "labels": "sample i draws digit i % 10 (the quality benchmark's batch)",
            "steps": "pipeline default" if steps is None else steps,
            "sampler": "pipeline default (steps, sigmas, shift, guidance); what ran is under models.*",
            "targets": list(targets),
            "orders": list(orders),
            "taylor_threshold": taylor_threshold,
            "storage_dtypes": list(STORAGE),
            "plan_search": {
                "thresh_grid": [THRESH_GRID[0], THRESH_GRID[-2], len(THRESH_GRID)],
                "K": "params' own + " + str(list(SCREEN_K)),
                "retention_ratio": "params' own + " + str(list(SCREEN_RETENTION)),
                "tolerance": PLAN_TOLERANCE,
                "screen_seed": CALIB_SEED,
                "screen_samples": screen_samples,
                "screen_order": SCREEN_ORDER,
                "screen_cache_dtype": "float32",
                "screen_metric": "pooled PSNR vs the uncached bf16 output",
            },
            "psnr_cap_db": PSNR_CAP_DB,
            "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "kind": "paired percentile, 95%"},
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
        },
        "models": models,
        "rows": rows,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def markdown(result: dict) -> str:
    lines = [
        "| model | target | K | thresh | order | passes c/u | speedup | PSNR fp32 cache | PSNR bf16 cache "
        "| delta (bf16 - fp32) [95% CI] | bytes/branch fp32 -> bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        passes = r["block_passes"]["float32"]
        b32, b16 = r["cache_bytes_per_branch"]["float32"], r["cache_bytes_per_branch"]["model"]
        low, high = r["delta_db_ci95"]
        lines.append(
            f"| {r['model']} | ~{r['target_speedup']:g}x | {r['K']} | {r['thresh']:g} | {r['order']} | "
            f"{passes.get('cond', 0)}/{passes.get('uncond', 0)} | {r['block_pass_speedup']:.2f}x | "
            f"{r['psnr_mean']['float32']:.2f} | {r['psnr_mean']['model']:.2f} | "
            f"{r['delta_db_mean']:+.3f} [{low:+.3f}, {high:+.3f}] | "
            f"{b32.get('cond', 0)} -> {b16.get('cond', 0)} |"
        )
    context = [
        f"{name}: {m['steps']} steps; uncached bf16 vs uncached fp32 model: "
        f"{m['uncached_bf16_vs_fp32_psnr_mean']:.2f} dB (mean per sample)"
        for name, m in result["models"].items()
    ]
    return "\n".join(lines + [""] + context)


def write_result(result: dict, path: Path) -> None:
    """Write ``result`` as JSON atomically (a temporary file beside ``path``, then ``os.replace``)."""
    with atomic_target(path) as tmp:
        tmp.write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES,
                        help="evaluation samples per model (sample i is digit i %% 10)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: each pipeline's own)")
    parser.add_argument("--orders", type=int, nargs="+", default=list(ORDERS))
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS), help="block-pass speedups to aim at")
    parser.add_argument("--models", nargs="+", type=Path, default=list(MODEL_DIRS), help="model directories")
    parser.add_argument("--screen-samples", type=int, default=DEFAULT_SCREEN_SAMPLES,
                        help="samples (other noise) on which the candidate plans near a target are compared")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = ElapsedLog()

    result = run_benchmark(
        args.models, args.samples, args.steps, args.targets, args.orders, TAYLOR_THRESHOLD, args.screen_samples,
        command=shlex.join(["python", "-m", "bench.cache_storage", *argv]), log=log,
    )  # fmt: skip
    print(markdown(result))
    write_result(result, args.out)
    log(f"wrote {args.out}")
    print(f"runtime: {log.seconds():.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
