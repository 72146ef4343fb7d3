"""How far any fixed skip plan can go at a low budget: every plan, run and measured.

At 4 computed steps of 20 per branch (5x fewer block passes) the quality benchmark finds ours and
TeaCache's rule level, with intervals that straddle zero. This script asks whether a better plan
exists for ditcache's forecaster to find. Per reference model it runs *every* plan with ``budget``
computed steps per branch (one plan for both branches; every plan computes the first step and each
expert's first, as every tuned placement does; ``--last-step``: only plans that also compute the
last step, the space before tuned plans could leave it out) through AdaTaylorCache with each forecast
of ``FORECASTS`` (plain residual reuse, order-1 Taylor with taylor_threshold 2 and 3), on the
quality benchmark's evaluation samples. Beside them: the tuner's own choices at this budget (tuned
on the calibration samples, as the quality benchmark does) and TeaCache's rule over a dense
threshold grid and its warm-ups, interpolated at the same compute on its Pareto front.

The best plan is picked on the evaluation samples themselves, so its margin is an optimistic bound
on what any plan choice (ours or anyone's) could reach with these forecasts, not a method's result.
TeaCache's decision signal on this model family is the timestep modulation, the same for every
sample and both branches, so its schedule is a fixed plan too; the JSON records it.

    python -m bench.plan_ceiling [--steps 20] [--budget 4] [--samples 12] [--last-step] [--models ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ditcache
from ditcache.cache import TeaCacheConfig
from ditcache.cache.tune import Candidate, TuneResult, fixed_steps, tuned_params
from ditcache.models import MODELS_DIR
from ditcache.params import params_from_dict
from ditcache.runtime.io import atomic_target

from bench.progress import ElapsedLog
from bench.quality.calibration import calibrate
from bench.quality.evaluate import tune_plans
from bench.quality.frontier import interpolation, paired_margin, pooled_psnr, value
from bench.quality.metrics import to_images
from bench.quality.runners import FULL_GRID
from bench.quality.workload import CALIB_SEED, EVAL_SEED, Samples, Workload, generate_each, make_batch, make_samples
from bench.quality.workload import make_workload

REPO = Path(__file__).resolve().parents[1]
FORECASTS = ((0, 1), (1, 2), (1, 3))  # (n_derivatives, taylor_threshold)
TEACACHE_THRESH = tuple(round(0.05 * 1.15**i, 4) for i in range(24))  # 0.05 .. ~1.2
TEACACHE_WARMUP = (1, 2, 3)


def all_plans(work: Workload, budget: int, last_step: bool) -> list[list[int]]:
    """Every plan with ``budget`` computed steps that computes the steps every placement computes
    (and the last one, with ``last_step``)."""
    fixed = fixed_steps(work.steps, (work.first_step(e) for e in work.used_experts()))
    fixed |= {work.steps - 1} if last_step else set()
    free = [s for s in range(work.steps) if s not in fixed]
    if budget < len(fixed):
        raise SystemExit(f"error: --budget {budget} is below the {len(fixed)} steps every plan computes ({sorted(fixed)})")
    return [sorted({*fixed, *extra}) for extra in itertools.combinations(free, budget - len(fixed))]


class Runner:
    """Runs a cache on the evaluation samples; per-image MSE against the uncached output, block-pass fraction."""

    def __init__(self, work: Workload, samples: Samples) -> None:
        self.work, self.samples = work, samples
        self.reference = to_images(self.frames(None)[0])

    def frames(self, cache: Any) -> tuple[torch.Tensor, float, list[int]]:
        outs = generate_each(self.work.pipeline, self.work, self.samples, cache)
        passes = sum(n for out in outs for per in out.stack_passes.values() for n in per.values())
        full = sum(self.work.steps * len(out.branch_steps) for out in outs)
        computed = sorted({s for out in outs for per in out.cache_stats.values() for b in per.values()
                           for s in b.get("computed_steps", [])})  # fmt: skip
        return torch.cat([o.frames for o in outs]), passes / full, computed

    def row(self, cache: Any, **fields: Any) -> dict:
        frames, fraction, computed = self.frames(cache)
        mse = (to_images(frames).double() - self.reference.double()).pow(2).flatten(1).mean(1)
        per_image = [float(f"{v:.6g}") for v in mse.tolist()]
        return {**fields, "compute_fraction": round(fraction, 5), "psnr": round(float(pooled_psnr(np.array(per_image))), 4),
                "computed_steps": computed, "per_image_mse": per_image}  # fmt: skip


def plan_config(params: Any, plan: list[int], steps: int, order: int, taylor_threshold: int) -> ditcache.AdaTaylorConfig:
    """AdaTaylorCache running exactly ``plan`` on both branches."""
    candidate = Candidate("placement", {True: plan, False: list(plan)}, math.nan)
    data = tuned_params(params, TuneResult(candidate, 1.0, 1.0, 1), steps, {})
    return ditcache.AdaTaylorConfig(params=params_from_dict(data, source="<plan_ceiling>"), n_derivatives=order,
                                    taylor_threshold=taylor_threshold)  # fmt: skip


def model_result(model: str, args: argparse.Namespace, log: ElapsedLog) -> dict:
    work = make_workload(MODELS_DIR / model, model, args.steps, args.shift, args.guidance)
    calib_batch = make_batch(8, CALIB_SEED)
    calib = calibrate(work, calib_batch)
    runner = Runner(work, make_samples(args.samples, EVAL_SEED))
    plans = all_plans(work, args.budget, args.last_step)
    log(f"[{model}] {len(plans)} plans x {len(FORECASTS)} forecasts on {args.samples} samples")
    rows = []
    for k, (plan, (order, tt)) in enumerate(itertools.product(plans, FORECASTS)):
        config = plan_config(calib.params, plan, work.steps, order, tt)
        rows.append(runner.row(config, plan=plan, n_derivatives=order, taylor_threshold=tt))
        if (k + 1) % 100 == 0:
            log(f"[{model}]   {k + 1}/{len(plans) * len(FORECASTS)} runs")
    tuned, _ = tune_plans(work, calib, calib_batch.head(4), FULL_GRID, bands=(work.steps / args.budget,))
    tuner_rows = [
        runner.row(plan_config(calib.params, t["cond"], work.steps, t["order"], t["taylor_threshold"]),
                   plan=t["cond"], n_derivatives=t["order"], taylor_threshold=t["taylor_threshold"])
        for t in tuned if t["budget"] == args.budget
    ]  # fmt: skip
    tea = []
    for warmup, thresh in itertools.product(TEACACHE_WARMUP, TEACACHE_THRESH):
        config = TeaCacheConfig(coefficients=tuple(calib.teacache_coefficients), thresh=thresh, warmup=warmup)
        tea.append(runner.row(config, thresh=thresh, warmup=warmup))
    log(f"[{model}] {len(rows)} plan runs, {len(tuner_rows)} tuned, {len(tea)} TeaCache settings")
    return summarize(model, args, rows, tuner_rows, tea)


def summarize(model: str, args: argparse.Namespace, rows: list[dict], tuner_rows: list[dict], tea: list[dict]) -> dict:
    """Best plan, the tuner's plans (their rank among all plans), TeaCache at the same compute, margins."""
    band = args.steps / args.budget
    best = max(rows, key=lambda r: r["psnr"])
    ranked = sorted((r["psnr"] for r in rows), reverse=True)
    how_tea = interpolation(tea, band)
    if how_tea is None:
        raise SystemExit(f"error: no TeaCache setting reached {band:.2f}x; widen TEACACHE_THRESH")
    tea_value = value(tea, how_tea)
    exact = {"kind": "exact", "runs": [0], "weights": [1.0]}

    def against_tea(row: dict) -> dict:
        return paired_margin([row], exact, tea, how_tea)

    def brief(row: dict) -> dict:
        keep = ("plan", "n_derivatives", "taylor_threshold", "psnr", "compute_fraction")
        return {k: row[k] for k in keep} | {"rank": 1 + sum(p > row["psnr"] for p in ranked)}

    return {
        "model": model, "steps": args.steps, "budget": args.budget, "speedup": round(band, 4), "last_step": args.last_step,
        "plans": len(rows) // len(FORECASTS), "runs": len(rows),
        "best_plan": brief(best) | {"vs_teacache": against_tea(best)},
        "tuner": [brief(r) | {"vs_teacache": against_tea(r)} for r in tuner_rows],
        "psnr_quantiles": {q: round(float(np.quantile([r["psnr"] for r in rows], q)), 3) for q in (0.5, 0.9, 0.99)},
        "teacache": {"psnr": round(float(tea_value), 4), "interpolation": how_tea["kind"],
                     "settings": [{k: tea[i][k] for k in ("thresh", "warmup", "compute_fraction", "psnr", "computed_steps")}
                                  for i in how_tea["runs"]]},  # fmt: skip
        "all_plans": [{k: r[k] for k in ("plan", "n_derivatives", "taylor_threshold", "psnr")} for r in rows],
    }  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["reference-digits", "reference-digits-moe"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=int, default=4, help="computed steps per branch (default 4: 5x at 20 steps)")
    parser.add_argument("--samples", type=int, default=12, help="evaluation samples (the quality benchmark's seeds)")
    parser.add_argument("--last-step", action="store_true", help="only plans that compute the last step")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "plan_ceiling.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    log = ElapsedLog()
    results = [model_result(model, args, log) for model in args.models]
    print(f"\n{'model':22s} {'plans':>6s} {'best plan (order, tt)':34s} {'best':>7s} {'tuner':>14s} {'TeaCache':>9s}  best - TeaCache [95% CI]")
    for r in results:
        b = r["best_plan"]
        tuner = ", ".join(f"{t['psnr']:.2f}#{t['rank']}" for t in r["tuner"])
        m, label = b["vs_teacache"], f"{b['plan']} ({b['n_derivatives']}, {b['taylor_threshold']})"
        print(f"{r['model']:22s} {r['plans']:6d} {label:34s} "
              f"{b['psnr']:7.2f} {tuner:>14s} {r['teacache']['psnr']:9.2f}  {m['margin_db']:+.2f} [{m['ci95'][0]:+.2f}, {m['ci95'][1]:+.2f}]")  # fmt: skip
    with atomic_target(args.out) as tmp:
        tmp.write_text(json.dumps({"results": results, "seconds": round(log.seconds(), 1), "samples": args.samples}, indent=1))
    print(f"{sum(r['runs'] for r in results)} plan runs in {log.seconds():.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
