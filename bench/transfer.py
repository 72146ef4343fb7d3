"""Curve transfer and auto-tune: sigma- vs index-resampled curves across step counts/shifts, auto-tune vs hand rule.

1. Transfer: the curve is calibrated at 50 steps / shift 3 (calibration seeds) and used at
   30 steps / shift 5 and 20 steps / shift 5. For each run configuration and each resample rule the
   AdaTaylorCache (order 1) is swept over thresh x K; the table gives the best PSNR at a compute
   fraction at or under each budget (matched compute).
2. Auto-tune: residuals of calibration samples are recorded at 50 steps / shift 5 and the tuner
   chooses a plan for 1.5x, 2x and 2.5x fewer block passes; it is compared with the hand rule
   (the shipped K=4, retention 0.2, thresh scanned to the closest pass count).

PSNR is pooled over all evaluation samples against the uncached samples of the same run.

Every run is the public pipeline call of the quality benchmark (``bench.quality.workload.generate``)
with a built cache; block passes come from the request's telemetry.

    python -m bench.transfer [--samples 30] [--out bench/results/transfer.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ditcache.cache import AdaTaylorCache, Calibrator
from ditcache.cache.recorder import ResidualRecorder
from ditcache.cache.schedule import resample_by_sigma
from ditcache.cache.tune import PlanReplayer, thresh_for_budget, tune, tuned_params
from ditcache.models import REFERENCE_DIGITS
from ditcache.params import params_from_dict

from bench.progress import ElapsedLog
from bench.quality.metrics import psnr_from_mse, telemetry_block_calls
from bench.quality.workload import CALIB_SEED, EVAL_SEED, Batch, Workload, generate, make_batch, make_workload

REPO = Path(__file__).resolve().parent.parent

THRESHOLDS = [round(0.01 * 1.2**i, 5) for i in range(26)]  # 0.01 .. ~1
KS = [2, 3, 4, 6]
BUDGETS = [0.6, 0.5, 0.4]  # compute fractions the transfer table is matched at
TARGETS = [1.5, 2.0, 2.5]


def run(work: Workload, batch: Batch, cache: Any) -> tuple[torch.Tensor, dict[str, int]]:
    """The pipeline on ``batch`` with the built ``cache`` (None: uncached): frames and block executions."""
    out = generate(work.pipeline, work, batch, cache)
    return out.frames, telemetry_block_calls(out, work.num_layers, 0)


def pooled_psnr(frames, reference) -> float:
    return round(float(psnr_from_mse((frames.double() - reference.double()).pow(2).mean())), 3)


def calibrate_curve(steps: int, shift: float, guidance: float, calib_batch: Batch):
    work = make_workload(REFERENCE_DIGITS, "reference-digits", steps, shift, guidance)
    cal = Calibrator(steps, shift, "Reference-Digits-bench", sigmas=work.sigmas)
    run(work, calib_batch, cal)
    return params_from_dict(cal.result())


def transfer_rows(params, eval_configs, samples, guidance, log) -> list[dict]:
    rows = []
    for steps, shift in eval_configs:
        work = make_workload(REFERENCE_DIGITS, "reference-digits", steps, shift, guidance)
        batch = make_batch(samples, EVAL_SEED)
        reference, ref_calls = run(work, batch, None)
        uncached = sum(ref_calls.values())
        sigmas = work.sigmas
        for rule in ("index", "sigma"):
            seen = set()
            for K in KS:
                for thresh in THRESHOLDS:
                    cache = AdaTaylorCache(params=params_from_dict({**_as_dict(params), "K": K, "thresh": thresh}),
                                           num_inference_steps=steps, sigmas=sigmas, resample=rule)  # fmt: skip
                    plan = (tuple(cache.planned_compute_steps(True)), tuple(cache.planned_compute_steps(False)))
                    if plan in seen:
                        continue
                    seen.add(plan)
                    frames, calls = run(work, batch, cache)
                    rows.append({"steps": steps, "shift": shift, "rule": rule, "K": K, "thresh": thresh,
                                 "compute_fraction": round(sum(calls.values()) / uncached, 4),
                                 "psnr": pooled_psnr(frames, reference)})  # fmt: skip
            log(f"transfer {steps} steps / shift {shift}: {rule} rule, {len(seen)} plans")
    return rows


def _as_dict(params) -> dict:
    return {"K": params.K, "thresh": params.thresh, "retention_ratio": params.retention_ratio,
            "cond_mag_ratios": list(params.cond_mag_ratios), "uncond_mag_ratios": list(params.uncond_mag_ratios),
            "sigmas": list(params.sigmas), "sigma_shift": params.sigma_shift}  # fmt: skip


def matched(rows, budgets) -> list[dict]:
    table = []
    for (steps, shift) in sorted({(r["steps"], r["shift"]) for r in rows}, reverse=True):
        for budget in budgets:
            entry = {"steps": steps, "shift": shift, "compute_fraction_at_most": budget}
            for rule in ("index", "sigma"):
                ok = [r for r in rows if (r["steps"], r["shift"], r["rule"]) == (steps, shift, rule)
                      and r["compute_fraction"] <= budget]  # fmt: skip
                best = max(ok, key=lambda r: r["psnr"], default=None)
                entry[rule] = None if best is None else {k: best[k] for k in ("psnr", "compute_fraction", "K", "thresh")}
            table.append(entry)
    return table


def autotune_rows(samples, calib_n, guidance, log) -> list[dict]:
    steps, shift = 50, 5.0
    work = make_workload(REFERENCE_DIGITS, "reference-digits", steps, shift, guidance)
    sigmas = work.sigmas
    calib_batch = make_batch(calib_n, CALIB_SEED)
    cal = Calibrator(steps, shift, "Reference-Digits-bench", sigmas=sigmas)
    recorder = ResidualRecorder(steps)
    run(work, calib_batch, cal)
    run(work, calib_batch, recorder)
    params = params_from_dict(cal.result())
    replayer = PlanReplayer({c: recorder.trajectories(c) for c in (True, False)}, sigmas, guidance)

    batch = make_batch(samples, EVAL_SEED)
    reference, ref_calls = run(work, batch, None)
    uncached = sum(ref_calls.values())
    rows = []
    for target in TARGETS:
        t0 = time.perf_counter()
        result = tune(replayer, params, target_speedup=target, sigmas=sigmas)
        tuned = params_from_dict(tuned_params(params, result, steps, {"target_speedup": target}))
        tune_s = time.perf_counter() - t0
        frames, calls = run(work, batch, AdaTaylorCache(params=tuned, num_inference_steps=steps, sigmas=sigmas))
        achieved = uncached / sum(calls.values())
        hand = hand_rule(params, steps, sigmas, round(steps / target))
        hframes, hcalls = run(work, batch, AdaTaylorCache(params=hand, num_inference_steps=steps, sigmas=sigmas))
        rows.append({
            "target_speedup": target,
            "tuned_method": result.chosen.method,
            "tuned_achieved_speedup": round(achieved, 3),
            "tuned_psnr": pooled_psnr(frames, reference),
            "hand_thresh": hand.thresh,
            "hand_achieved_speedup": round(uncached / sum(hcalls.values()), 3),
            "hand_psnr": pooled_psnr(hframes, reference),
            "tune_seconds": round(tune_s, 2),
        })
        log(f"auto-tune {target}x: {rows[-1]}")
    return rows


def hand_rule(params, steps, sigmas, budget):
    """The shipped-style rule (K=4, retention 0.2) with the thresh whose pass count is closest to ``budget``."""
    curve = resample_by_sigma(params.cond_mag_ratios, params.sigmas, sigmas)
    thresh = thresh_for_budget(curve, steps, budget, 4, 0.2)
    return params_from_dict({**_as_dict(params), "K": 4, "retention_ratio": 0.2, "thresh": thresh})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "transfer.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = ElapsedLog()

    params = calibrate_curve(50, 3.0, args.guidance, make_batch(args.calib_samples, CALIB_SEED))
    log("calibrated at 50 steps / shift 3")
    rows = transfer_rows(params, [(30, 5.0), (20, 5.0)], args.samples, args.guidance, log)
    table = matched(rows, BUDGETS)
    tuned = autotune_rows(args.samples, args.calib_samples, args.guidance, log)
    out = {"transfer": {"calibrated_at": {"steps": 50, "shift": 3.0}, "matched": table, "runs": rows},
           "autotune": tuned, "samples": args.samples, "wall_time_s": round(log.seconds(), 1)}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print("\ntransfer (curve from 50 steps / shift 3), best pooled PSNR at compute fraction <= budget")
    print(f"{'run':>14} {'budget':>6} {'index rule':>22} {'sigma rule':>22}")
    for e in table:
        cells = [f"{e[r]['psnr']:6.2f} dB @ {e[r]['compute_fraction']:.2f}" if e[r] else "-" for r in ("index", "sigma")]
        print(f"{e['steps']:>3} st / sh {e['shift']:<4} {e['compute_fraction_at_most']:>6} {cells[0]:>22} {cells[1]:>22}")
    print("\nauto-tune vs hand-picked thresh (50 steps, shift 5)")
    print(f"{'target':>6} {'tuned x':>8} {'tuned dB':>9} {'hand x':>7} {'hand dB':>8} {'method':>10}")
    for r in tuned:
        print(f"{r['target_speedup']:>6} {r['tuned_achieved_speedup']:>8.2f} {r['tuned_psnr']:>9.2f} "
              f"{r['hand_achieved_speedup']:>7.2f} {r['hand_psnr']:>8.2f} {r['tuned_method']:>10}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
