"""AdaTaylorCache's two order-2 forecasts, ``taylor_form="newton"`` vs ``"taylor"``, measured.

The module docstring of ``ditcache.cache.ada_taylor`` says which form forecasts a model's residuals
better is measured, not derived: this is that measurement. Both forms skip the same steps (the form
changes only the forecast), so each pair of runs is at equal compute and the PSNR difference is the
forecast's alone (the script asserts that both forms ran the same steps). Per bundled model (its
shipped params at thresh x1 and x3), taylor_threshold 2 and 3 and 20/30/50 steps, 10 prompts (digits 0-9) with seed 11 run through the public pipeline at the
model directory's shift and guidance, scored by pooled PSNR against the uncached output of the same
pipeline, request and seed. It prints, per model and step count, which form is better.

    python -m bench.taylor_form [--out bench/results/taylor_form.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch

import ditcache
from ditcache.models import MODELS_DIR
from ditcache.params import load_params
from ditcache.runtime.reference import prompt_for_label

from bench.progress import ElapsedLog
from bench.quality.metrics import psnr_from_mse

REPO = Path(__file__).resolve().parents[1]
MODELS = {"reference-digits": "Reference-Digits", "reference-digits-moe": "Reference-Digits-MoE"}
FORMS = ("newton", "taylor")
THRESH_SCALES = (1, 3)
TAYLOR_THRESHOLDS = (2, 3)
STEPS = (20, 30, 50)
SEED = 11


def pooled_psnr(frames: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR over every sample and pixel (frames in [0, 1])."""
    return round(float(psnr_from_mse((frames.double() - reference.double()).pow(2).mean())), 4)


def model_rows(model_dir: Path, model_type: str, log: Any) -> list[dict]:
    """One row per (steps, thresh scale, taylor_threshold): both forms' PSNR and the compute they used."""
    pipe = ditcache.load_pipeline(model_dir)
    params = load_params(model_type)
    prompts = [prompt_for_label(k) for k in range(10)]
    rows = []
    for steps in STEPS:
        reference = pipe(prompts, num_inference_steps=steps, seed=SEED, progress=False).frames
        for scale in THRESH_SCALES:
            scaled = dataclasses.replace(params, thresh=params.thresh * scale)
            for taylor_threshold in TAYLOR_THRESHOLDS:
                row: dict[str, Any] = {
                    "model": model_dir.name,
                    "steps": steps,
                    "thresh_scale": scale,
                    "thresh": round(scaled.thresh, 6),
                    "taylor_threshold": taylor_threshold,
                }
                passes = set()
                for form in FORMS:
                    config = ditcache.AdaTaylorConfig(
                        params=scaled, n_derivatives=2, taylor_threshold=taylor_threshold, taylor_form=form
                    )
                    out = pipe(prompts, num_inference_steps=steps, seed=SEED, cache=config, progress=False)
                    row[f"psnr_{form}"] = pooled_psnr(out.frames, reference)
                    passes.add(tuple(sorted(out.total_stack_passes().items())))
                assert len(passes) == 1, f"the forms ran different steps: {passes}"
                ran = dict(passes.pop())
                row["block_pass_speedup"] = round(2 * steps / sum(ran.values()), 4)
                row["newton_minus_taylor_db"] = round(row["psnr_newton"] - row["psnr_taylor"], 4)
                rows.append(row)
                log(
                    f"{model_dir.name} {steps} steps thresh x{scale} tt {taylor_threshold}: "
                    f"{row['block_pass_speedup']:.2f}x, "
                    f"newton {row['psnr_newton']:.2f} / taylor {row['psnr_taylor']:.2f} dB"
                )
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per model: how often each form wins (ties when equal to 0.01 dB) and the mean difference."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        diffs = [r["newton_minus_taylor_db"] for r in rows if r["model"] == model]
        out[model] = {
            "settings": len(diffs),
            "newton_wins": sum(d > 0.01 for d in diffs),
            "taylor_wins": sum(d < -0.01 for d in diffs),
            "ties": sum(abs(d) <= 0.01 for d in diffs),
            "mean_newton_minus_taylor_db": round(statistics.fmean(diffs), 4),
            "min_db": min(diffs),
            "max_db": max(diffs),
        }
    return out


def per_steps(rows: list[dict]) -> list[dict]:
    """Per model and step count: which form is better (mean difference over the identical-plan pairs;
    "tie" within 0.05 dB), with the wins of each."""
    out = []
    for model, steps in dict.fromkeys((r["model"], r["steps"]) for r in rows):
        diffs = [r["newton_minus_taylor_db"] for r in rows if r["model"] == model and r["steps"] == steps]
        mean = statistics.fmean(diffs)
        out.append({
            "model": model, "steps": steps, "settings": len(diffs), "mean_newton_minus_taylor_db": round(mean, 4),
            "newton_wins": sum(d > 0.01 for d in diffs), "taylor_wins": sum(d < -0.01 for d in diffs),
            "better": "tie" if abs(mean) <= 0.05 else "newton" if mean > 0 else "taylor",
        })  # fmt: skip
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | steps | thresh | tt | passes | newton dB | taylor dB | newton - taylor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['steps']} | x{r['thresh_scale']} | {r['taylor_threshold']} | "
            f"{r['block_pass_speedup']:.2f}x | {r['psnr_newton']:.2f} | {r['psnr_taylor']:.2f} | "
            f"{r['newton_minus_taylor_db']:+.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "taylor_form.json")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = ElapsedLog()

    rows = [row for folder, model_type in MODELS.items() for row in model_rows(MODELS_DIR / folder, model_type, log)]
    summary = summarize(rows)
    print(markdown(rows))
    print(json.dumps(summary, indent=1))
    better = per_steps(rows)
    for b in better:
        verdict = "tie (within 0.05 dB)" if b["better"] == "tie" else f"{b['better']} better"
        print(f"{b['model']} {b['steps']} steps: {verdict} (mean newton - taylor "
              f"{b['mean_newton_minus_taylor_db']:+.3f} dB; newton wins {b['newton_wins']}, taylor wins "
              f"{b['taylor_wins']} of {b['settings']})")  # fmt: skip
    result = {
        "what": "AdaTaylorCache order 2, taylor_form newton vs taylor; pooled PSNR vs the uncached output of the "
        f"same pipeline; 10 prompts (digits 0-9), seed {SEED}; shipped params with thresh scaled",
        "summary": summary,
        "per_model_steps": better,
        "rows": rows,
        "wall_time_s": round(log.seconds(), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
