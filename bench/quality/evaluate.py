"""Calibration, tuning, screening, evaluation and timing of one workload (model x step count).

Selection never sees the evaluation samples: the curve, TeaCache's polynomial and the residuals the
tuner replays come from calibration samples (seed ``CALIB_SEED``); every peer setting is screened on
other calibration-seed samples; per peer, the screening front points around each band are
evaluated on the evaluation samples (seeds ``EVAL_SEED + i``). Ours: per budget and order the tuner's
plan, chosen on the calibration samples' residuals; per budget the order that screens better is
evaluated. Workloads are independent (:class:`Job`), so a run may spread them over processes; the
timing (:func:`time_workload`) runs afterwards, alone.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ditcache.cache.recorder import ResidualRecorder
from ditcache.cache.tune import PlanReplayer, tune_budgets, tuned_params
from ditcache.runtime.reference import prompt_for_label

from bench.progress import ElapsedLog
from bench.quality.calibration import Calibration, calibrate
from bench.quality.frontier import BANDS, front
from bench.quality.metrics import block_flop_shares, quality_metrics, to_images, train_classifier
from bench.quality.runners import OURS, PEERS, Grid, MethodRun, MethodSet, add_tuned, build_peers
from bench.quality.workload import Batch, Samples, Workload, generate, make_workload

Log = Callable[[str], None]


def tune_plans(work: Workload, calib: Calibration, batch: Batch, grid: Grid, bands=BANDS,
               max_tokens: int = 256) -> tuple[list[dict], dict]:  # fmt: skip
    """Record the calibration batch's residuals, then per budget and per order the plan of least
    predicted error over the grid's (order, taylor_threshold) pairs (the order is then chosen by
    screening on calibration-seed samples, :func:`pick_ours`: the replay predicts one forecast's error
    on the uncached trajectory, not how errors compound, which matters most for order 2 at long gaps).
    Budgets: each tune target's, and floor/ceil of N / band for every band, so the tuned front brackets
    every band."""
    started = time.perf_counter()
    n = work.steps
    recorder = ResidualRecorder(n, max_tokens=max_tokens)
    generate(work.pipeline, work, batch, recorder)
    trajectories = {c: recorder.trajectories(c) for c in (True, False)}
    sigmas = work.sigmas
    starts = [work.first_step(e) for e in work.used_experts()]
    budgets = {max(2, round(n / t)) for t in grid.tune_targets}
    for band in bands:
        budgets |= {max(2, math.floor(n / band)), max(2, math.ceil(n / band))}
    per_pair = {}
    candidates = 0
    for order, tt in grid.tune_orders:
        replayer = PlanReplayer(trajectories, sigmas, work.guidance, order, tt, segment_starts=starts)
        per_pair[(order, tt)] = tune_budgets(replayer, calib.params, sorted(budgets), sigmas=sigmas)
        candidates += sum(r.candidates_evaluated for r in per_pair[(order, tt)].values())
    plans = []
    for budget in sorted(budgets, reverse=True):
        for order in sorted({o for o, _ in grid.tune_orders}):  # per budget: the tuner's best plan of each order
            options = [(pair, res[budget]) for pair, res in per_pair.items() if pair[0] == order and budget in res]
            if not options:
                continue
            (_, tt), best = min(options, key=lambda o: o[1].chosen.predicted_error)
            data = tuned_params(calib.params, best, n, {"budget": budget})
            plans.append({
                "budget": budget, "order": order, "taylor_threshold": tt, "method": best.chosen.method,
                "settings": dict(best.chosen.settings), "predicted_error": best.chosen.predicted_error,
                "predicted_speedup": best.predicted_speedup, "params": data,
                "cond": best.chosen.compute_steps[True], "uncond": best.chosen.compute_steps[False],
            })  # fmt: skip
    meta = {"seconds": round(time.perf_counter() - started, 2), "budgets": sorted(budgets),
            "order_pairs": [list(p) for p in grid.tune_orders], "candidates_evaluated": candidates,
            "calibration_samples": len(batch), "max_tokens": max_tokens}  # fmt: skip
    return plans, meta


def run_all(work: Workload, runs: list[MethodRun], samples: Samples, log: Log, what: str) -> list[dict]:
    """Every run once on ``samples`` (one request per sample); frames and block compute per run."""
    started = time.perf_counter()
    done = []
    for k, run in enumerate(runs):
        frames, counts, outs = run(work, samples)
        done.append({"run": run, "frames": frames, "counts": counts})
        if (k + 1) % 25 == 0:
            log(f"  {what}: {k + 1}/{len(runs)} runs, {time.perf_counter() - started:.0f} s")
    log(f"  {what}: {len(runs)} runs x {len(samples)} samples in {time.perf_counter() - started:.1f} s")
    return done


def rows_of(work: Workload, samples: Samples, done: list[dict], classifier: Any) -> list[dict]:
    """One row per run: compute fraction and quality against ``done[0]`` (the uncached run)."""
    base = done[0]
    assert base["run"].method == "uncached"
    reference = to_images(base["frames"])
    labels = torch.tensor(samples.labels)
    base_total = sum(base["counts"].values())
    rows = []
    for d in done:
        run = d["run"]
        fraction = sum(d["counts"].values()) / base_total
        row: dict[str, Any] = {
            "model": work.name, "steps": work.steps, "method": run.method, "setting": run.setting,
            "compute_fraction": round(fraction, 5), "ideal_speedup": round(1 / fraction, 4) if fraction else None,
        }  # fmt: skip
        row |= quality_metrics(to_images(d["frames"]), reference, classifier, labels)
        row["block_compute_per_branch"] = {k: round(v, 3) for k, v in d["counts"].items()}
        row |= run.extra
        rows.append(row)
    return rows


def pick_for_evaluation(rows: list[dict], runs: list[MethodRun], bands=BANDS) -> list[MethodRun]:
    """Per peer, the screening-front points around each band: the slowest at least as fast as the band
    and the fastest slower than it."""
    picked: list[MethodRun] = []
    for method in PEERS:
        mine = [(row, run) for row, run in zip(rows, runs) if run.method == method]
        fr = front([row for row, _ in mine])
        ids = {id(row) for row in fr}
        pts = [(row, run) for row, run in mine if id(row) in ids]
        for band in bands:
            phi = 1 / band
            faster = [p for p in pts if p[0]["compute_fraction"] <= phi]
            slower = [p for p in pts if p[0]["compute_fraction"] > phi]
            for chosen in (max(faster, key=lambda p: p[0]["compute_fraction"], default=None),
                           min(slower, key=lambda p: p[0]["compute_fraction"], default=None)):  # fmt: skip
                if chosen is not None and chosen[1] not in picked:
                    picked.append(chosen[1])
    return picked


def pick_ours(rows: list[dict], runs: list[MethodRun]) -> list[MethodRun]:
    """Per budget, the tuned candidate (one per order) with the best screening PSNR."""
    best: dict[int, tuple[float, MethodRun]] = {}
    for row, run in zip(rows, runs):
        if run.method != OURS:
            continue
        budget = run.setting["budget"]
        if budget not in best or row["psnr"] > best[budget][0]:
            best[budget] = (row["psnr"], run)
    return [run for _, run in sorted(best.values(), key=lambda pr: -pr[1].setting["budget"])]


def run_workload(work: Workload, calib_batch: Batch, screen: Samples, evals: Samples, grid: Grid, classifier: Any,
                 tune_samples: int, log: Log) -> tuple[list[dict], list[dict], dict, list[dict]]:  # fmt: skip
    """Calibrate, tune, screen, evaluate one workload. Returns (evaluation rows, screening rows, meta,
    the tuned plans of ours' evaluated runs in row order, for :func:`time_workload`)."""
    t0 = time.perf_counter()
    shares = block_flop_shares(work.pipeline, prompt_for_label(0))
    calib = calibrate(work, calib_batch)
    log(f"[{work.name} {work.steps} steps] calibrated on {len(calib_batch)} samples in {calib.seconds:.1f} s")
    tuned, tune_meta = tune_plans(work, calib, calib_batch.head(tune_samples), grid)
    log(f"[{work.name} {work.steps} steps] tuned {len(tuned)} plans in {tune_meta['seconds']:.1f} s "
        f"({tune_meta['candidates_evaluated']} candidates)")  # fmt: skip
    methods = MethodSet(work, shares)
    base = methods.direct("uncached", {}, None)
    build_peers(methods, calib, grid)
    add_tuned(methods, tuned)
    screen_runs = list(methods.runs)
    screened = run_all(work, [base, *screen_runs], screen, log, f"{work.name} {work.steps} screening")
    screen_rows = rows_of(work, screen, screened, classifier)[1:]
    chosen = pick_for_evaluation(screen_rows, screen_runs)
    ours = pick_ours(screen_rows, screen_runs)
    eval_runs = [base, *chosen, *ours]
    evaluated = run_all(work, eval_runs, evals, log, f"{work.name} {work.steps} evaluation")
    rows = rows_of(work, evals, evaluated, classifier)
    for row in screen_rows:
        row.pop("per_image_mse", None)
    counts = {m: sum(r["method"] == m for r in screen_rows) for m in [*PEERS, OURS]}
    meta = {
        "flop_shares": shares,
        "calibration": {"samples": len(calib_batch), "seconds": round(calib.seconds, 2),
                        "cond_mag_ratios": [round(v, 5) for v in calib.params.cond_mag_ratios],
                        "teacache_coefficients": calib.teacache_coefficients},  # fmt: skip
        "tuning": tune_meta,
        "screened_settings": counts,
        "evaluated_settings": {m: sum(r["method"] == m for r in rows) for m in [OURS, *PEERS]},
        "seconds": round(time.perf_counter() - t0, 1),
        "tuned_plans": [{k: v for k, v in plan.items() if k != "params"} for plan in tuned],
    }
    return rows, screen_rows, meta, [run.plan for run in ours]


@dataclass(frozen=True)
class Job:
    """One workload of a run as a worker process gets it: everything it needs, all picklable."""

    model_dir: Path
    steps: int
    shift: float
    guidance: float
    calib_batch: Batch
    screen: Samples
    evals: Samples
    grid: Grid
    tune_samples: int
    classifier_epochs: int
    threads: int


@functools.cache
def _classifier(epochs: int) -> Any:
    """The digit classifier, trained once per process (seeded: every process gets the same one)."""
    return train_classifier(epochs=epochs)


@functools.cache
def _process_log() -> ElapsedLog:
    """This process's progress log: a worker starts with the run, so its stamps are the run's."""
    return ElapsedLog()


def run_job(job: Job) -> tuple[list[dict], list[dict], dict, list[dict]]:
    """:func:`run_workload` of ``job`` in this process (a worker of a parallel run, or the main one)."""
    torch.set_num_threads(job.threads)
    work = make_workload(job.model_dir, job.model_dir.name, job.steps, job.shift, job.guidance)
    log = _process_log()
    result = run_workload(work, job.calib_batch, job.screen, job.evals, job.grid, _classifier(job.classifier_epochs),
                          job.tune_samples, log)  # fmt: skip
    log(f"[{work.name} {work.steps} steps] done in {result[2]['seconds']:.0f} s")
    return result


def time_workload(work: Workload, shares: dict[str, float], rows: list[dict], ours_plans: list[dict], timing: dict,
                  log: Log) -> list[dict]:  # fmt: skip
    """:func:`efficiency` of one evaluated workload, rebuilt from its block FLOP ``shares`` (its meta's),
    rows and ours' tuned plans, so the timing can run alone after every workload (in parallel runs
    nothing else shares the machine then). ``timing``: {"batch", "one", "reps_batch", "reps_one"}."""
    methods = MethodSet(work, shares)
    base = methods.direct("uncached", {}, None)
    add_tuned(methods, ours_plans)
    ours_rows = [row for row in rows if row["method"] == OURS]
    base_row = next(row for row in rows if row["method"] == "uncached")
    assert len(ours_rows) == len(methods.runs), "ours' rows and plans must pair up"
    return efficiency(work, [base_row, *ours_rows], [base, *methods.runs], timing["batch"], timing["one"],
                      timing["reps_batch"], timing["reps_one"], log)  # fmt: skip


def time_runs(work: Workload, runs: list[MethodRun], call: Callable[[MethodRun], None], reps: int) -> list[float]:
    """Minimum wall time of ``call(run)`` per run over ``reps`` repeats, runs interleaved in a fresh
    shuffled order per repeat (a slow moment of a shared machine hits every run alike)."""
    rng = random.Random(12345)
    times = [[] for _ in runs]
    for _ in range(reps):
        order = list(range(len(runs)))
        rng.shuffle(order)
        for i in order:
            t = time.perf_counter()
            call(runs[i])
            times[i].append(time.perf_counter() - t)
    return [min(t) for t in times]


def efficiency(work: Workload, rows: list[dict], methods_runs: list[MethodRun], batch: Batch, one: Samples,
               reps_batch: int, reps_one: int, log: Log, bands=BANDS) -> list[dict]:  # fmt: skip
    """Speedup efficiency (measured wall speedup x compute fraction) of ours at the plan nearest each
    band, at batch 1 (one request of one sample) and at the benchmark batch (one request of
    ``len(batch)`` samples); the uncached run is timed alongside."""
    ours = [(row, run) for row, run in zip(rows, methods_runs) if run.method == OURS]
    base = next(run for run in methods_runs if run.method == "uncached")
    picked: list[tuple[dict, MethodRun]] = []
    for band in bands:
        near = min(ours, key=lambda rr: abs(rr[0]["ideal_speedup"] - band), default=None)
        if near is not None and near not in picked:
            picked.append(near)
    runs = [base, *[run for _, run in picked]]
    out = []
    for label, call, reps in (
        ("batch_1", lambda run: run(work, one), reps_one),
        (f"batch_{len(batch)}", lambda run: generate(run.pipeline, work, batch, run.cache), reps_batch),
    ):
        t = time.perf_counter()
        walls = time_runs(work, runs, call, reps)
        log(f"[{work.name} {work.steps} steps] timing {label}: {len(runs)} runs x {reps} in "
            f"{time.perf_counter() - t:.1f} s")  # fmt: skip
        for (row, run), wall in zip(picked, walls[1:]):
            speedup = walls[0] / wall
            out.append({
                "model": work.name, "steps": work.steps, "batch": label, "method": run.method,
                "setting": run.setting, "compute_fraction": row["compute_fraction"],
                "ideal_speedup": row["ideal_speedup"], "speedup": round(speedup, 4),
                "speedup_efficiency": round(speedup * row["compute_fraction"], 4),
                "uncached_wall_s_min": round(walls[0], 4), "wall_s_min": round(wall, 4), "reps": reps,
            })  # fmt: skip
    return out
