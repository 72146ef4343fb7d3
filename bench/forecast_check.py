"""What the auto-tuner's forecast check buys: ``ditcache calibrate --target-speedup X`` as it runs
now (a plan per forecast of ``FORECAST_GRID``, the finalists run on the tune prompts, the closest to
the uncached latents written with its forecast) against the tuner with one fixed forecast (order 1,
taylor_threshold 2: the seed's default, what the command tuned for before).

Both are the real command on the bundled reference models (8 calibration prompts, digits 0-7, seeds
from ``CALIB_SEED``; the first 4 tune the plan); each written params file is then run on the quality
benchmark's 12 evaluation samples (other seeds, one request each) through
``AdaTaylorConfig(params=file)``, exactly as a user runs it. PSNR is pooled over the samples against
their uncached outputs; the difference has a paired bootstrap 95% interval over the samples.

    python -m bench.forecast_check [--models reference reference-moe] [--steps 20 30 50] [--targets 2 3 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ditcache import AdaTaylorConfig
from ditcache.launch import calibrate
from ditcache.models import MODELS_DIR
from ditcache.params import load_params
from ditcache.runtime.io import atomic_target

from bench.plan_ceiling import Runner
from bench.progress import ElapsedLog
from bench.quality.frontier import paired_margin
from bench.quality.workload import CALIB_SEED, EVAL_SEED, make_samples, make_workload

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"reference": "reference-digits", "reference-moe": "reference-digits-moe"}
FIXED = ("--order", "1", "--taylor-threshold", "2")
EXACT = {"kind": "exact", "runs": [0], "weights": [1.0]}


def tuned_file(model: str, steps: int, target: float, shift: float, out: Path, *extra: str) -> Path:
    """``ditcache calibrate --target-speedup`` into ``out`` (the command's own code path)."""
    argv = ["--model", model, "--steps", str(steps), "--shift", str(shift), "--target-speedup", str(target),
            "--seed", str(CALIB_SEED), "--batch-size", "8", "--no-progress", "--output", str(out),
            *(a for k in range(8) for a in ("--prompt", f"a handwritten {k}")), *extra]  # fmt: skip
    if calibrate.main(argv) != 0:
        raise SystemExit(f"error: calibrate failed for {model} {steps} steps {target}x")
    return out


def cell(model: str, steps: int, target: float, args: argparse.Namespace, runner: Runner, tmp: Path) -> dict:
    rows = {}
    for name, extra in (("fixed", FIXED), ("checked", ())):
        path = tuned_file(model, steps, target, args.shift, tmp / f"{model}-{steps}-{target:g}-{name}.json", *extra)
        params = load_params(path)
        rows[name] = runner.row(AdaTaylorConfig(params=params), forecast=params.forecast,
                                checked=params.provenance["tuned"]["forecasts_checked"])  # fmt: skip
    margin = paired_margin([rows["checked"]], EXACT, [rows["fixed"]], EXACT)
    return {
        "model": model, "steps": steps, "target": target,
        **{f"{name}_{key}": row[key] for name, row in rows.items() for key in ("psnr", "compute_fraction", "forecast")},
        "checked_candidates": rows["checked"]["checked"], "checked_minus_fixed": margin,
    }  # fmt: skip


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FOLDERS), choices=list(FOLDERS))
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 30, 50])
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0, 5.0])
    parser.add_argument("--samples", type=int, default=12, help="evaluation samples (the quality benchmark's seeds)")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=4.0, help="the reference pipelines' default guidance")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "forecast_check.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(1)
    log = ElapsedLog()
    results = []
    with tempfile.TemporaryDirectory(prefix="forecast-check-") as tmp:
        for model in args.models:
            for steps in args.steps:
                work = make_workload(MODELS_DIR / FOLDERS[model], FOLDERS[model], steps, args.shift, args.guidance)
                runner = Runner(work, make_samples(args.samples, EVAL_SEED))
                for target in args.targets:
                    results.append(cell(model, steps, target, args, runner, Path(tmp)))
                    r = results[-1]
                    log(f"{model} {steps} steps {target:g}x: fixed {r['fixed_psnr']:.2f} dB, checked "
                        f"{r['checked_psnr']:.2f} dB {r['checked_forecast']}")  # fmt: skip
    print(f"\n| model | steps | target | fixed (1, 2) dB | checked dB | chosen (order, tt) | checked - fixed [95% CI] |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m, f = r["checked_minus_fixed"], r["checked_forecast"]
        print(f"| {r['model']} | {r['steps']} | {r['target']:g}x | {r['fixed_psnr']:.2f} | {r['checked_psnr']:.2f} | "
              f"({f['n_derivatives']}, {f['taylor_threshold']}) | {m['margin_db']:+.2f} [{m['ci95'][0]:+.2f}, {m['ci95'][1]:+.2f}] |")  # fmt: skip
    with atomic_target(args.out) as tmp_out:
        tmp_out.write_text(json.dumps({"results": results, "seconds": round(log.seconds(), 1), "samples": args.samples,
                                       "shift": args.shift}, indent=1))  # fmt: skip
    print(f"{len(results)} cells in {log.seconds():.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
