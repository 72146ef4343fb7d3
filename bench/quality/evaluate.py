"""Screening, evaluation and timing: which settings are evaluated, and what each evaluated run measures.

Selection never sees the evaluation batch: every grid setting is screened on the calibration seed's
noise (stage 1, then stage 2 on the best plans), and per method and band of block-pass speedup only
the best screened setting is evaluated on the evaluation seed's batch. Timing interleaves the
evaluated runs in a fresh shuffled order per repeat and quotes the minimum, so a slow moment of a
shared machine hits every method alike.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.quality.calibration import Calibration, calibrate
from bench.quality.metrics import quality_metrics, to_images
from bench.quality.runners import Grid, MethodRun, build_methods, refinements, ada_config, with_settings
from bench.quality.workload import CALIB_SEED, EVAL_SEED, Batch, Workload, make_batch, make_workload

Log = Callable[[str], None]


@dataclass
class RunRecord:
    """What one run did: frames and block executions of its quality run, wall and CPU times of its repeats."""

    run: MethodRun
    times: list[float] = field(default_factory=list)
    cpu_times: list[float] = field(default_factory=list)
    full_batch_s: float | None = None
    frames: torch.Tensor | None = None
    calls: dict[str, int] | None = None
    plan: dict | None = None


def cache_plan(stats: dict[str, dict[str, dict]]) -> dict:
    """Per expert and branch, what the cache computed and skipped (the request's ``cache_stats``)."""
    keep = ("num_computed", "num_skipped", "computed_steps")
    return {
        expert: {branch: {k: v for k, v in s.items() if k in keep} for branch, s in per_branch.items()}
        for expert, per_branch in stats.items()
    }


def quality_pass(work: Workload, batch: Batch, records: list[RunRecord], log: Log, what: str) -> None:
    """Every run once on ``batch``; keeps frames, block executions, the cache's plan and the wall time."""
    started = time.perf_counter()
    for n, rec in enumerate(records):
        t0 = time.perf_counter()
        out, rec.calls = rec.run(work, batch)
        rec.full_batch_s = time.perf_counter() - t0
        rec.frames = out.frames
        rec.plan = cache_plan(out.cache_stats) if rec.run.cache is not None else None
        if (n + 1) % 20 == 0:
            log(f"  {what}: {n + 1}/{len(records)} runs, {time.perf_counter() - started:.0f} s")
    log(f"  {what}: {len(records)} runs on {len(batch)} samples in {time.perf_counter() - started:.1f} s")


def timing_pass(work: Workload, batch: Batch, records: list[RunRecord], reps: int, log: Log) -> None:
    """``reps`` repeats over every run, interleaved in a fresh shuffled order each repeat."""
    rng = random.Random(12345)
    for rep in range(reps):
        order = list(range(len(records)))
        rng.shuffle(order)
        started = time.perf_counter()
        for i in order:
            rec = records[i]
            c0, t0 = time.process_time(), time.perf_counter()
            rec.run(work, batch)
            rec.times.append(time.perf_counter() - t0)
            rec.cpu_times.append(time.process_time() - c0)
        log(f"  timing rep {rep + 1}/{reps} ({len(batch)} samples): {time.perf_counter() - started:.1f} s")


def rows_of(work: Workload, batch: Batch, records: list[RunRecord], classifier: Any) -> list[dict]:
    """One JSON row per run: compute, speedups (when timed), quality against ``records[0]`` (uncached)."""
    base = records[0]
    assert base.run.method == "uncached" and base.frames is not None and base.calls is not None
    reference = to_images(base.frames)
    labels = torch.tensor(batch.labels)
    base_calls = sum(base.calls.values())
    rows = []
    for rec in records:
        assert rec.frames is not None and rec.calls is not None
        calls = sum(rec.calls.values())
        fraction = calls / base_calls
        row: dict[str, Any] = {
            "model": work.name,
            "method": rec.run.method,
            "setting": rec.run.setting,
            "compute_fraction": round(fraction, 5),
            "ideal_speedup": round(1 / fraction, 4) if fraction else None,
        }
        if base.times and rec.times:
            speedup = min(base.times) / min(rec.times)
            speedup_cpu = min(base.cpu_times) / min(rec.cpu_times)
            row |= {
                "speedup": round(speedup, 4),
                "speedup_efficiency": round(speedup * fraction, 4),
                "speedup_cpu_time": round(speedup_cpu, 4),
                "speedup_efficiency_cpu_time": round(speedup_cpu * fraction, 4),
            }
        row |= quality_metrics(to_images(rec.frames), reference, classifier, labels)
        row |= {
            "block_calls": calls,
            "block_calls_per_branch": rec.calls,
            "stack_passes": round(calls / work.num_layers, 3),
        }
        if rec.times:
            row |= {
                "wall_s_min": round(min(rec.times), 4),
                "wall_s_all": [round(t, 4) for t in rec.times],
                "cpu_s_min": round(min(rec.cpu_times), 4),
                "wall_s_quality_run": round(rec.full_batch_s or 0.0, 3),
            }
        if rec.plan:
            row["plan"] = rec.plan
        rows.append(row)
    return rows


def band_of(ideal: float, bands: list[float]) -> int | None:
    return next((i for i in range(len(bands) - 1) if bands[i] <= ideal < bands[i + 1]), None)


def best_per_band(rows: list[dict], runs: list[MethodRun], bands: list[float]) -> dict[tuple, MethodRun]:
    """Per method and band of ideal speedup, the run with the best screening PSNR (and the uncached run)."""
    chosen: dict[tuple, tuple[float, MethodRun]] = {}
    for row, run in zip(rows, runs):
        if run.method == "uncached":
            chosen[("base",)] = (math.inf, run)
            continue
        band = band_of(row["ideal_speedup"] or 0, bands)
        if band is None:
            continue
        slot = (run.method, band)
        if slot not in chosen or row["psnr"] > chosen[slot][0]:
            chosen[slot] = (row["psnr"], run)
    return {slot: run for slot, (_, run) in chosen.items()}


def screen(work: Workload, calib: Calibration, batch: Batch, grid: Grid, bands: list[float], classifier: Any,
           log: Log) -> tuple[list[MethodRun], list[dict]]:  # fmt: skip
    """Stage 1 over the grid, stage 2 on the best stage-1 plans; returns the runs and their screening rows."""
    methods = build_methods(work, calib, grid, (bands[0], bands[-1]))
    log(f"[{work.name}] stage-1 screening: {len(methods.runs)} settings on {len(batch)} calibration-seed samples")
    records = [RunRecord(run) for run in methods.runs]
    quality_pass(work, batch, records, log, "screening")
    stage1 = rows_of(work, batch, records, classifier)
    extra = refinements(methods, list(best_per_band(stage1, methods.runs, bands).values()), grid.taylor_thresholds)
    if extra:
        log(f"[{work.name}] stage-2 screening: {len(extra)} AdaTaylorCache variants (orders 0-2, "
            f"taylor_threshold {grid.taylor_thresholds}) on the best plans")  # fmt: skip
        more = [RunRecord(run) for run in extra]
        quality_pass(work, batch, more, log, "screening-2")
        records += more
    return methods.runs, rows_of(work, batch, records, classifier)


def run_model(work: Workload, calib: Calibration, screen_batch: Batch, eval_batch: Batch, grid: Grid,
              bands: list[float], classifier: Any, reps: int, timing_samples: int,
              log: Log) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """Screen, then evaluate per method and band the best screened setting: quality on the whole
    evaluation batch, timing on its first ``timing_samples`` samples. Returns (rows, screening rows)."""
    runs, screen_rows = screen(work, calib, screen_batch, grid, bands, classifier, log)
    picked = set(best_per_band(screen_rows, runs, bands).values())
    chosen = [run for run in runs if run in picked]
    log(f"[{work.name}] evaluating {len(chosen)} settings on {len(eval_batch)} samples, "
        f"timing x{reps} on {timing_samples}")  # fmt: skip
    records = [RunRecord(run) for run in chosen]
    quality_pass(work, eval_batch, records, log, "evaluation")
    timing_pass(work, eval_batch.head(timing_samples), records, reps, log)
    screening = [
        {k: row[k] for k in ("model", "method", "setting", "compute_fraction", "psnr", "psnr_mean_per_image", "ssim")}
        | {"evaluated": run in picked}
        for row, run in zip(screen_rows, runs)
    ]
    return rows_of(work, eval_batch, records, classifier), screening


def efficiency_check(json_path: Path, models_dir: Path, reps: int, log: Log) -> dict:
    """Time the uncached run and ditcache order 1 at its matched ~2x / ~3x settings (from a finished
    run's JSON) on the whole evaluation batch, interleaved, ``reps`` repeats; store the result in the
    JSON under "efficiency_full_batch". The curve is re-measured on the same calibration batch
    (deterministic), and each run's block executions are checked against the JSON."""
    data = json.loads(json_path.read_text())
    env = data["env"]
    samples, steps = env["samples_per_model"], env["steps"]
    out: dict[str, list[dict]] = {}
    for model, per_label in data["matched"]["by_block_passes"].items():
        work = make_workload(models_dir / model, model, steps, env["shift"], env["guidance_scale"])
        calib = calibrate(work, make_batch(env["calibration"][model]["samples"], CALIB_SEED))
        records = [RunRecord(MethodRun("uncached", {}, work.pipeline))]
        expected = [1.0]
        for label, matched in per_label.items():
            best = matched["best"].get("ditcache-ada_taylor-o1")
            if best is None:
                continue
            st = best["setting"]
            config = ada_config(with_settings(calib.params, st["thresh"], st["K"], st["retention_ratio"]), 1,
                                st["taylor_threshold"])  # fmt: skip
            run = MethodRun("ditcache-ada_taylor-o1", st | {"matched": label}, work.pipeline, config)
            records.append(RunRecord(run))
            expected.append(best["compute_fraction"])
        batch = make_batch(samples, EVAL_SEED)
        calls = [sum(rec.run(work, batch)[1].values()) for rec in records]
        for rec, n, fraction in zip(records, calls, expected):
            assert abs(n / calls[0] - fraction) < 1e-4, f"{model}: compute fraction {n / calls[0]} != JSON's {fraction}"
        timing_pass(work, batch, records, reps, log)
        base = records[0]
        out[model] = []
        for rec, n in zip(records[1:], calls[1:]):
            fraction = n / calls[0]
            sp, sp_cpu = min(base.times) / min(rec.times), min(base.cpu_times) / min(rec.cpu_times)
            out[model].append({
                "method": rec.run.method, "setting": rec.run.setting, "compute_fraction": round(fraction, 5),
                "ideal_speedup": round(1 / fraction, 4), "speedup": round(sp, 4),
                "speedup_efficiency": round(sp * fraction, 4), "speedup_cpu_time": round(sp_cpu, 4),
                "speedup_efficiency_cpu_time": round(sp_cpu * fraction, 4),
                "uncached_wall_s_min": round(min(base.times), 3), "wall_s_min": round(min(rec.times), 3),
            })  # fmt: skip
            log(f"[{model}] o1 {rec.run.setting['matched']}: {1 / fraction:.2f}x fewer passes, {sp:.3f}x measured, "
                f"efficiency {sp * fraction:.3f} (cpu time {sp_cpu * fraction:.3f})")  # fmt: skip
    data["efficiency_full_batch"] = {
        "what": f"uncached vs ditcache order 1 at its matched settings on all {samples} evaluation samples, "
        f"{reps} interleaved repeats, minimum",
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "models": out,
    }
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    return out
