"""What a finished run reports: the frontier table, the Pareto plot, the doc block, the JSON's "env"."""

from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from bench.quality.metrics import PSNR_CAP_DB

REPO = Path(__file__).resolve().parents[2]
TABLE_BEGIN, TABLE_END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"
METHOD_COLORS = {
    "ditcache-tuned": "#d62728", "teacache": "#8c564b", "diffusers-fbc": "#e377c2", "diffusers-magcache": "#7f7f7f",
    "diffusers-taylorseer": "#17becf", "diffusers-seacache": "#2ca02c", "diffusers-pab": "#bcbd22",
}  # fmt: skip


def fmt_margin(m: dict | None) -> str:
    if m is None:
        return "n/a"
    lo, hi = m["ci95"]
    return f"{m['margin_db']:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def frontier_markdown(frontier: dict, counts: dict, ours: str) -> str:
    """Per model and step count: per band our interpolated PSNR, the best peer's, and our margin [95% CI]."""
    out = []
    for model, per_steps in frontier.items():
        for steps, per_band in per_steps.items():
            screened = counts.get(model, {}).get(steps, {})
            out.append(f"**{model}, {steps} steps** (settings screened per method: "
                       + ", ".join(f"{m} {n}" for m, n in screened.items()) + ")\n")  # fmt: skip
            out.append("| band | ours dB | best peer | peer dB | margin dB [95% CI] | peers not reaching |")
            out.append("|---|---|---|---|---|---|")
            for band, cell in per_band.items():
                mine = cell["methods"].get(ours)
                peer = cell["best_peer"]
                peer_v = cell["methods"][peer] if peer else None
                missing = [m for m, v in cell["methods"].items() if v is None and m != ours]
                ours_txt = "n/a" if mine is None else f"{mine['psnr']:.2f}" + ("*" if mine["kind"] == "staircase" else "")
                peer_txt = "n/a" if peer_v is None else f"{peer_v['psnr']:.2f}" + ("*" if peer_v["kind"] == "staircase" else "")
                out.append(f"| {band} | {ours_txt} | {peer or 'none'} | {peer_txt} | "
                           f"{fmt_margin(cell['margin_vs_best_peer'])} | {', '.join(missing) or '-'} |")  # fmt: skip
            out.append("")
    out.append("`*`: no evaluated setting of that method lies on both sides of the band; the value is its best "
               "setting at least that fast (a lower bound of its front there).")  # fmt: skip
    return "\n".join(out)


def plot(rows: list[dict], path: Path, methods: list[str]) -> None:
    """PSNR vs block-pass speedup per model (rows) and step count (columns): each method's Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.quality.frontier import BANDS, front

    keys = sorted({(r["model"], r["steps"]) for r in rows})
    models = list(dict.fromkeys(k[0] for k in keys))
    steps = sorted({k[1] for k in keys})
    fig, axes = plt.subplots(len(models), len(steps), figsize=(5.5 * len(steps), 4.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, n in enumerate(steps):
            ax = axes[i][j]
            for method in methods:
                pts = [r for r in rows if r["model"] == model and r["steps"] == n and r["method"] == method]
                if not pts:
                    continue
                color = METHOD_COLORS.get(method, "black")
                ax.scatter([1 / p["compute_fraction"] for p in pts], [p["psnr"] for p in pts], s=9, color=color, alpha=0.4)
                fr = front(pts)
                ax.plot([1 / p["compute_fraction"] for p in fr], [p["psnr"] for p in fr],
                        "-" if is_ours(method) else "--", marker="o", ms=3, lw=2.4 if is_ours(method) else 1.2,
                        color=color, label=method)  # fmt: skip
            for band in BANDS:
                ax.axvline(band, color="k", lw=0.5, ls=":")
            ax.set_xlim(1.2, 6.5)
            ax.set_xlabel("block-pass speedup = 1 / compute fraction (x)")
            ax.set_ylabel("pooled PSNR vs uncached (dB)")
            ax.set_title(f"{model}, {n} steps")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def update_doc(doc: Path, block_text: str) -> None:
    """Replace the table block between the markers in ``doc``."""
    text = doc.read_text() if doc.exists() else ""
    block = f"{TABLE_BEGIN}\n{block_text}\n{TABLE_END}"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text + "\n" + block + "\n"
    doc.write_text(text)


def is_ours(method: str) -> bool:
    return method.startswith("ditcache-")


def git_commit() -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()
    except OSError:
        return "unknown"


def environment(**run: Any) -> dict[str, Any]:
    """The JSON's "env": the machine and library versions, then ``run`` (the run's own settings), then
    what the numbers mean."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "torchmetrics": __import__("torchmetrics").__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": git_commit(),
        **run,
        "labels": "sample i is class i % 10; prompt 'a handwritten <i % 10>', negative ''; the batch's noise is "
        "drawn by the pipeline from one seed (eval_seeds; calibration seeds under calibration)",
        "timing": "wall time of the public pipeline call (encode, denoise, decode), at batch 1 (one sample) and at "
        "the benchmark batch (one request of timing_batch samples); runs interleaved in a fresh shuffled order per "
        "repeat; minimum over repeats; speedup = uncached min / run min; efficiency = speedup x compute fraction",
        "selection": "peers: every grid setting screened on calibration-seed samples (one request each); per peer "
        "the screening-front points around each band are evaluated. ours: the tuner's plan per budget, chosen on "
        "the calibration samples' recorded residuals. Evaluation samples: seeds eval_seed + i, one request each",
        "psnr_cap_db": PSNR_CAP_DB,
        "psnr": "pooled = 10 log10(1 / MSE over all samples and pixels), psnr_ci95 its 95% bootstrap interval "
        "over samples; per image = mean of per-image PSNRs (each capped); images in [0, 1]",
        "compute_fraction": "block compute that really ran / the uncached run's: forward hooks on every block's "
        "self-attention, cross-attention and FFN, each weighted by its FLOP share (flop_shares); whole-block "
        "methods are counted in whole blocks",
        "frontier": "per method the Pareto front of its evaluated settings (pooled PSNR vs compute fraction), "
        "interpolated linearly in compute fraction at each band; margin = ours - peer with a paired bootstrap "
        "95% interval over the evaluation samples",
    }
