"""The command line of the quality benchmark (see the package docstring for the modes)."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ditcache.models import MODELS_DIR

import bench.quality
from bench.peers import NOT_APPLICABLE
from bench.quality.evaluate import Job, run_job, time_workload
from bench.quality.frontier import BANDS, frontier_table
from bench.quality.report import REPO, environment, frontier_markdown, plot, update_doc
from bench.quality.runners import FULL_GRID, OURS, PEERS, QUICK_GRID, SMOKE_GRID, Grid
from bench.quality.workload import CALIB_SEED, EVAL_SEED, make_batch, make_samples, make_workload

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
SCREEN_SEED = CALIB_SEED + 500_000  # screening samples: calibration-side seeds, none shared with evaluation


@dataclass(frozen=True)
class Mode:
    """Sizes of one mode; each may be overridden on the command line."""

    grid: Grid
    samples: int  # evaluation samples per workload (one request each) ...
    samples_at: dict[int, int]  # ... except at these step counts
    calib_samples: int  # calibration batch (curve, TeaCache polynomial)
    tune_samples: int  # of those, the ones whose residuals the tuner replays
    screen_samples: int
    timing_batch: int  # the benchmark batch of the efficiency timing
    reps_batch: int
    reps_one: int
    steps: list[int]
    timing_steps: int  # the step count the efficiency timing runs at
    models: list[str]
    classifier_epochs: int


MODES = {
    # 20 steps: a sample costs 2.5x less than at 50 and the margins are narrowest (4 of 20 steps at
    # 5x), so its workloads get 3x the evaluation samples
    "full": Mode(FULL_GRID, 12, {20: 36}, 8, 4, 5, 12, 4, 5, [20, 30, 50], 50,
                 ["reference-digits", "reference-digits-moe"], 2),  # fmt: skip
    "quick": Mode(QUICK_GRID, 6, {}, 4, 2, 2, 6, 1, 3, [20], 20, ["reference-digits"], 1),
    "smoke": Mode(SMOKE_GRID, 2, {}, 2, 2, 2, 2, 1, 1, [8], 8, ["reference-digits"], 1),
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=bench.quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="reduced grid, 6 samples, one model, 20 steps (about 1 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny end-to-end check (2 samples, 8 steps)")
    parser.add_argument("--samples", type=positive_int,
                        help="evaluation samples per workload, every step count (one request each; "
                             "default: the mode's, full: 36 at 20 steps, 12 otherwise)")
    parser.add_argument("--screen-samples", type=int, help="screening samples (calibration-side seeds)")
    parser.add_argument("--steps", type=int, nargs="+", help="step counts (default 20 30 50)")
    parser.add_argument("--shift", type=float, default=5.0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1: on a shared 2-core machine two OpenMP threads stall each other)")
    parser.add_argument("--jobs", type=positive_int, default=min(2, os.cpu_count() or 1),
                        help="workloads run at once, one process each (default: 2, or 1 on a 1-core machine); "
                             "the efficiency timing runs afterwards, alone")
    parser.add_argument("--models", nargs="+", help="folders under ditcache/models, or paths")
    parser.add_argument("--no-timing", action="store_true", help="skip the efficiency timing")
    parser.add_argument("--out-json", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--out-png", type=Path, default=RESULTS / "quality_pareto.png")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--update-doc", action="store_true", help=f"rewrite the table block in {DOC.relative_to(REPO)}")
    parser.add_argument("--from-json", type=Path,
                        help="run nothing: re-render the table, plot (and with --update-doc the doc block) from this JSON")
    return parser.parse_args(argv)


def render(result: dict, args: argparse.Namespace, log) -> None:
    """Table (printed), plot and doc block of a finished run's JSON."""
    if result["runs"] and not args.no_plot:
        plot(result["runs"], args.out_png, [OURS, *PEERS])
        log(f"wrote {args.out_png}")
    table = frontier_markdown(result["frontier"], result["screened_settings"], OURS)
    eff = efficiency_markdown(result["efficiency"])
    if args.update_doc:
        update_doc(DOC, table + "\n\n" + eff)
        log(f"updated {DOC}")
    print(table)
    print(eff)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    cpu0 = time.process_time()

    def cpu_seconds() -> float:
        """This process's CPU time plus that of its finished worker processes."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() - cpu0 + children.ru_utime + children.ru_stime

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f}s wall {cpu_seconds():7.1f}s cpu] {message}", flush=True)

    if args.from_json:
        render(json.loads(args.from_json.read_text()), args, log)
        return 0
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    mode = MODES[name]
    screen_n = args.screen_samples or mode.screen_samples
    step_counts = args.steps or mode.steps
    samples = {steps: args.samples or mode.samples_at.get(steps, mode.samples) for steps in step_counts}
    timing_steps = mode.timing_steps if mode.timing_steps in step_counts else max(step_counts)
    model_dirs = [MODELS_DIR / m if (MODELS_DIR / m).is_dir() else Path(m) for m in args.models or mode.models]
    calib_batch = make_batch(mode.calib_samples, CALIB_SEED)
    screen = make_samples(screen_n, SCREEN_SEED)
    present = [d for d in model_dirs if (d / "model_index.json").is_file()]
    for model_dir in model_dirs:
        if model_dir not in present:
            log(f"skipping {model_dir.name}: {model_dir} has no model_index.json")
    jobs = [
        Job(model_dir, steps, args.shift, args.guidance, calib_batch, screen, make_samples(samples[steps], EVAL_SEED),
            mode.grid, mode.tune_samples, mode.classifier_epochs, args.threads)
        for model_dir in present
        for steps in step_counts
    ]  # fmt: skip
    results = run_jobs(jobs, args.jobs, log)
    rows: list[dict] = []
    screening: list[dict] = []
    workloads: dict = {}
    efficiency: list[dict] = []
    for job, (w_rows, w_screen, meta, ours_plans) in zip(jobs, results):
        rows += w_rows
        screening += w_screen
        workloads.setdefault(job.model_dir.name, {})[str(job.steps)] = meta
        if job.steps == timing_steps and not args.no_timing:
            work = make_workload(job.model_dir, job.model_dir.name, job.steps, args.shift, args.guidance)
            timing = {"batch": make_batch(mode.timing_batch, EVAL_SEED), "one": make_samples(1, EVAL_SEED),
                      "reps_batch": mode.reps_batch, "reps_one": mode.reps_one}  # fmt: skip
            efficiency += time_workload(work, meta["flop_shares"], w_rows, ours_plans, timing, log)
    frontier = frontier_table(rows, OURS, PEERS)
    counts = {m: {s: meta["screened_settings"] for s, meta in per.items()} for m, per in workloads.items()}
    wall = time.perf_counter() - started
    env = environment(
        mode=name, models=[d.name for d in model_dirs], steps=step_counts, shift=args.shift,
        guidance_scale=args.guidance, eval_samples={str(k): n for k, n in samples.items()},
        eval_seeds=[EVAL_SEED, EVAL_SEED + max(samples.values()) - 1],
        screen_samples=screen_n, screen_seeds=[SCREEN_SEED, SCREEN_SEED + screen_n - 1],
        calibration_seed=CALIB_SEED, calibration_samples=mode.calib_samples, tune_samples=mode.tune_samples,
        timing_batch=mode.timing_batch, timing_steps=timing_steps, bands=list(BANDS), wall_time_s=round(wall, 1),
        cpu_time_s=round(cpu_seconds(), 1), jobs=args.jobs,
    )  # fmt: skip
    result = {
        "runs": rows,
        "frontier": frontier,
        "screened_settings": counts,
        "efficiency": efficiency,
        "workloads": workloads,
        "not_applicable": NOT_APPLICABLE,
        "env": env,
        "screening": screening,
    }
    args.out_json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out_json.with_name(args.out_json.name + ".partial")
    partial.write_text(json.dumps(result, indent=1) + "\n")
    partial.replace(args.out_json)  # atomic: a reader never sees half a file
    log(f"wrote {args.out_json}")
    render(result, args, log)
    log(f"done in {wall:.1f} s")
    return 0


def run_jobs(jobs: list[Job], workers: int, log: Callable[[str], None]) -> list[tuple]:
    """Every job's :func:`run_job` result, in ``jobs`` order: in this process with one worker, else in
    ``workers`` spawned processes (the longest jobs first, so the last to finish is a short one)."""
    if workers == 1 or len(jobs) == 1:
        return [run_job(job) for job in jobs]
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i].steps)
    log(f"{len(jobs)} workloads on {min(workers, len(jobs))} processes")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {i: pool.submit(run_job, jobs[i]) for i in order}
        return [futures[i].result() for i in range(len(jobs))]


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 1")
    return value


def efficiency_markdown(eff: list[dict]) -> str:
    if not eff:
        return ""
    lines = ["| model | steps | batch | passes | measured speedup | efficiency |", "|---|---|---|---|---|---|"]
    for e in eff:
        lines.append(f"| {e['model']} | {e['steps']} | {e['batch']} | {e['ideal_speedup']:.2f}x | "
                     f"{e['speedup']:.2f}x | {e['speedup_efficiency']:.3f} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
