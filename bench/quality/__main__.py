"""The command line of the quality benchmark (see the package docstring for the modes)."""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ditcache.models import MODELS_DIR

import bench.quality
from bench.quality.calibration import calibrate
from bench.quality.evaluate import efficiency_check, run_model
from bench.quality.metrics import train_classifier
from bench.quality.report import REPO, compact, environment, markdown_tables, matched_table, plot, update_doc
from bench.quality.runners import FULL_GRID, QUICK_GRID, SMOKE_GRID, Grid
from bench.quality.workload import CALIB_SEED, EVAL_SEED, make_batch, make_workload

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
MOE_EVAL_BANDS = [1.9, 2.85, 3.3, 5.0]  # the two-expert variant: around the matched ~2x / ~3x points only


@dataclass(frozen=True)
class Mode:
    """Sizes of one mode; each may be overridden on the command line."""

    grid: Grid
    samples: int
    calib_samples: int
    screen_samples: int
    timing_samples: int
    reps: int
    steps: int
    bands: list[float]  # ideal-speedup bands: each method's best screened setting per band is evaluated
    models: list[str]


MODES = {
    "full": Mode(
        FULL_GRID, 100, 20, 5, 10, 5, 50, [1.5, 1.9, 2.4, 2.85, 3.3, 5.0], ["reference-digits", "reference-digits-moe"]
    ),
    "quick": Mode(QUICK_GRID, 20, 10, 10, 5, 3, 50, [1.9, 2.85, 5.0], ["reference-digits"]),
    "smoke": Mode(SMOKE_GRID, 4, 4, 4, 4, 1, 10, [1.0, 100.0], ["reference-digits"]),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=bench.quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced grid, 20 samples, one model")
    parser.add_argument("--smoke", action="store_true", help="tiny end-to-end check (4 samples, 10 steps, 1 rep)")
    parser.add_argument("--samples", type=int, help="evaluation samples per model (sample i is class i %% 10)")
    parser.add_argument("--calib-samples", type=int, help="calibration samples (another seed)")
    parser.add_argument("--screen-samples", type=int, help="screening samples (the first calibration ones)")
    parser.add_argument("--timing-samples", type=int, help="samples of the timing batch (the first evaluation ones)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 50; 10 with --smoke)")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--reps", type=int, help="timing repeats, interleaved (minimum is quoted)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two OpenMP threads stall each other)")
    parser.add_argument("--models", nargs="+", help="folders under ditcache/models, or paths")
    parser.add_argument("--out-json", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--out-png", type=Path, default=RESULTS / "quality_pareto.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--update-doc", action="store_true", help=f"rewrite the table block in {DOC.relative_to(REPO)}")
    parser.add_argument("--efficiency-check", action="store_true",
                        help="only: time uncached vs ditcache order 1 at the matched settings of --out-json on the "
                        "whole evaluation batch and add the result to that JSON")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s] {message}", flush=True)

    if args.efficiency_check:
        efficiency_check(args.out_json, MODELS_DIR, args.reps or 3, log)
        return 0
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    samples = args.samples or mode.samples
    calib_n = args.calib_samples or mode.calib_samples
    screen_n = min(calib_n, args.screen_samples or mode.screen_samples)
    timing_n = min(samples, args.timing_samples or mode.timing_samples)
    reps, steps = args.reps or mode.reps, args.steps or mode.steps
    model_dirs = [MODELS_DIR / m if (MODELS_DIR / m).is_dir() else Path(m) for m in args.models or mode.models]
    calib_batch, eval_batch = make_batch(calib_n, CALIB_SEED), make_batch(samples, EVAL_SEED)
    classifier = train_classifier(epochs=1 if args.smoke else 4)
    log("classifier trained")
    rows: list[dict] = []
    screening: list[dict] = []
    calibrations: dict = {}
    for model_dir in model_dirs:
        if not (model_dir / "model_index.json").is_file():
            log(f"skipping {model_dir.name}: {model_dir} has no model_index.json")
            continue
        work = make_workload(model_dir, model_dir.name, steps, args.shift, args.guidance)
        calib = calibrate(work, calib_batch)
        calibrations[work.name] = {
            "model_type": work.model_type,
            "seeds": [CALIB_SEED],
            "samples": calib_n,
            "seconds": round(calib.seconds, 2),
            "cond_mag_ratios": [round(v, 5) for v in calib.params.cond_mag_ratios],
            "uncond_mag_ratios": [round(v, 5) for v in calib.params.uncond_mag_ratios],
            "teacache_coefficients": calib.teacache_coefficients,
            "teacache_points": calib.teacache_points,
        }
        log(f"[{work.name}] calibrated on seed {CALIB_SEED} in {calib.seconds:.1f} s")
        bands = MOE_EVAL_BANDS if name == "full" and len(work.used_experts()) > 1 else mode.bands
        model_rows, model_screening = run_model(
            work, calib, calib_batch.head(screen_n), eval_batch, mode.grid, bands, classifier, reps, timing_n, log
        )
        rows += model_rows
        screening += model_screening
    wall = time.perf_counter() - started
    env = environment(
        mode=name, models=[d.name for d in model_dirs], samples_per_model=samples, eval_seeds=[EVAL_SEED],
        steps=steps, shift=args.shift, guidance_scale=args.guidance, timing_reps=reps, timing_samples=timing_n,
        screening_samples=screen_n, eval_bands_ideal_speedup=mode.bands,
        eval_bands_ideal_speedup_two_expert=MOE_EVAL_BANDS if name == "full" else mode.bands,
        calibration=calibrations, wall_time_s=round(wall, 1),
    )  # fmt: skip
    result: dict = {"runs": rows, "env": env, "screening": screening}
    if rows:
        result["matched"] = {
            "by_block_passes": compact(matched_table(rows, "ideal_speedup")),
            "by_wall_clock": compact(matched_table(rows, "speedup")),
        }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    args.out_json.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out_json}")
    if rows and not args.no_plot:
        plot(rows, args.out_png)
        log(f"wrote {args.out_png}")
    if rows and args.update_doc:
        update_doc(DOC, rows)
        log(f"updated {DOC}")
    if rows:
        print(markdown_tables(rows))
    log(f"done in {wall:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
