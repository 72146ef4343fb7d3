"""What a finished run reports: matched-compute tables, the Pareto plot, the doc block, the JSON document.

Methods are compared at equal compute: per method, the best pooled PSNR among its runs that are at
least ``MATCH_TOLERANCE`` x the target speedup (by block passes, and separately by measured wall
time), never a cached method's best point against another's at a different speed.
"""

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
CACHED_METHODS_ORDER = [
    "ditcache-ada_taylor-o0", "ditcache-ada_taylor-o1", "ditcache-ada_taylor-o2", "ditcache-ada_taylor-o1-wancurve",
    "taylorseer-interval-o1", "taylorseer-interval-o2", "teacache", "first-block", "diffusers-fbc",
    "diffusers-magcache", "diffusers-magcache-wancurve", "diffusers-taylorseer-o1", "diffusers-taylorseer-o2",
]  # fmt: skip
METHOD_COLORS = {
    "ditcache-ada_taylor-o0": "#1f77b4", "ditcache-ada_taylor-o1": "#d62728", "ditcache-ada_taylor-o2": "#ff7f0e",
    "ditcache-ada_taylor-o1-wancurve": "#9467bd", "taylorseer-interval-o1": "#2ca02c", "taylorseer-interval-o2": "#98df8a",
    "teacache": "#8c564b", "first-block": "#f7b6d2", "diffusers-fbc": "#e377c2", "diffusers-magcache": "#7f7f7f",
    "diffusers-magcache-wancurve": "#bcbd22", "diffusers-taylorseer-o1": "#17becf", "diffusers-taylorseer-o2": "#9edae5",
}  # fmt: skip
MATCHED = {"2x": 2.0, "3x": 3.0}
MATCH_TOLERANCE = 0.95  # "about 2x": at least 0.95 * 2 = 1.9x fewer block passes
COMPACT_KEYS = ("setting", "psnr", "psnr_ci95", "psnr_mean_per_image", "ssim", "accuracy", "compute_fraction", "speedup")


def is_ours(method: str) -> bool:
    return method.startswith("ditcache-")


def best_at(rows: list[dict], model: str, method: str, target: float, key: str = "ideal_speedup") -> dict | None:
    """The run of ``method`` with the best pooled PSNR among those at least ~target x faster by ``key``."""
    least = MATCH_TOLERANCE * target
    pool = [r for r in rows if r["model"] == model and r["method"] == method and (r.get(key) or 0) >= least]
    return max(pool, key=lambda r: r["psnr"], default=None)


def matched_table(rows: list[dict], key: str = "ideal_speedup") -> dict:
    """{model: {label: {"best": {method: run}, winner, best peer, margin of ours (order 1) over it}}}."""
    table: dict = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        methods = [m for m in CACHED_METHODS_ORDER if any(r["model"] == model and r["method"] == m for r in rows)]
        table[model] = {}
        for label, target in MATCHED.items():
            best = {m: best_at(rows, model, m, target, key) for m in methods}
            ours = best.get("ditcache-ada_taylor-o1")
            peers = [(m, r) for m, r in best.items() if r is not None and not is_ours(m)]
            best_peer = max(peers, key=lambda mr: mr[1]["psnr"], default=(None, None))
            runs = [(m, r) for m, r in best.items() if r is not None]
            winner = max(runs, key=lambda mr: mr[1]["psnr"], default=(None, None))
            table[model][label] = {
                "best": best,
                "best_peer": best_peer[0],
                "margin_db_o1_vs_best_peer": (
                    round(ours["psnr"] - best_peer[1]["psnr"], 3) if ours and best_peer[1] else None
                ),
                "winner": winner[0],
            }
    return table


def compact(table: dict) -> dict:
    """The matched table as stored in the JSON: each best run reduced to its headline numbers."""
    return {
        model: {
            label: {
                "winner": m["winner"],
                "best_peer": m["best_peer"],
                "margin_db_o1_vs_best_peer": m["margin_db_o1_vs_best_peer"],
                "best": {
                    method: None if r is None else {k: r[k] for k in COMPACT_KEYS if k in r}
                    for method, r in m["best"].items()
                },
            }
            for label, m in per_label.items()
        }
        for model, per_label in table.items()
    }


def fmt_setting(setting: dict) -> str:
    short = {"retention_ratio": "r", "taylor_threshold": "tt", "thresh": "th", "threshold": "th",
             "max_skip_steps": "K", "cache_interval": "int", "interval": "int"}  # fmt: skip
    skip = {"curve", "warmup", "disable_cache_before_step", "cache_identifiers"}
    return " ".join(f"{short.get(k, k)}={v:g}" if isinstance(v, float) else f"{short.get(k, k)}={v}"
                    for k, v in setting.items() if k not in skip)  # fmt: skip


def fmt_psnr(run: dict) -> str:
    """Pooled PSNR with its 95% interval, then the mean per image."""
    ci = run.get("psnr_ci95")
    interval = f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""
    return f"{run['psnr']:.2f}{interval} ({run['psnr_mean_per_image']:.2f})"


def markdown_tables(rows: list[dict], key: str = "ideal_speedup") -> str:
    table = matched_table(rows, key)
    out = []
    basis = "block passes (ideal speedup)" if key == "ideal_speedup" else "measured wall-clock speedup"
    head = " PSNR [95% CI] (per-image) dB | SSIM | acc | passes | speedup | setting |"
    for model, per_label in table.items():
        out.append(f"**{model}**: best pooled PSNR of each method at >= {MATCH_TOLERANCE:g} x target by {basis}\n")
        out.append("| method |" + "".join(f" ~{label}:" + head for label in MATCHED))
        out.append("|---|" + "---|---|---|---|---|---|" * len(MATCHED))
        for method in CACHED_METHODS_ORDER:
            if method not in per_label["2x"]["best"]:
                continue
            cells = [method]
            for label in MATCHED:
                r = per_label[label]["best"].get(method)
                if r is None:
                    cells += ["n/a (cannot reach)", "", "", "", "", ""]
                else:
                    speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"
                    cells += [fmt_psnr(r), f"{r['ssim']:.4f}", f"{r['accuracy']:.2f}",
                              f"{1 / r['compute_fraction']:.2f}x", speedup, fmt_setting(r["setting"])]  # fmt: skip
            out.append("| " + " | ".join(cells) + " |")
        margins = []
        for label in MATCHED:
            m = per_label[label]
            margin = m["margin_db_o1_vs_best_peer"]
            margins.append(
                f"~{label}: winner {m['winner']}; ditcache o1 vs best peer ({m['best_peer']}): "
                + (f"{margin:+.2f} dB" if margin is not None else "n/a")
            )
        out.append("\n" + "; ".join(margins) + "\n")
    return "\n".join(out)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated in (higher x, higher y), sorted by x."""
    front, best_y = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return sorted(front)


def plot(rows: list[dict], path: Path) -> None:
    """PSNR vs measured speedup (top) and vs block-pass speedup (bottom), one line per method (its Pareto front)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(7.5 * len(models), 11), squeeze=False)
    panels = [("speedup", "measured wall-clock speedup vs uncached (x)"),
              ("ideal_speedup", "block-pass speedup = 1 / compute fraction (x)")]  # fmt: skip
    for col, model in enumerate(models):
        for row_i, (key, label) in enumerate(panels):
            ax = axes[row_i][col]
            for method in CACHED_METHODS_ORDER:
                pts = [(r[key], r["psnr"]) for r in rows if r["model"] == model and r["method"] == method and key in r]
                if not pts:
                    continue
                ours = is_ours(method)
                color = METHOD_COLORS.get(method, "black")
                ax.scatter(*zip(*pts), s=10, color=color, alpha=0.4)
                ax.plot(*zip(*pareto_front(pts)), "-" if ours else "--", marker="o" if ours else "s", ms=4,
                        lw=2.6 if method == "ditcache-ada_taylor-o1" else 1.4, color=color, label=method)  # fmt: skip
            for target in MATCHED.values():
                ax.axvline(MATCH_TOLERANCE * target, color="k", lw=0.6, ls=":")
            ax.set_xlabel(label)
            ax.set_ylabel("PSNR vs uncached, pooled over samples (dB)")
            ax.set_title(f"{model}: PSNR vs {'measured' if key == 'speedup' else 'block-pass'} speedup")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Pareto front per method (lines); dots: every evaluated setting; dotted: 1.9x and 2.85x", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def update_doc(doc: Path, rows: list[dict]) -> None:
    """Replace the table block between the markers in ``doc`` (written from the rows of the JSON)."""
    text = doc.read_text() if doc.exists() else ""
    tables = (
        "#### Matched by block passes (compute fraction)\n\n" + markdown_tables(rows, "ideal_speedup")
        + "\n#### Matched by measured wall-clock speedup\n\n" + markdown_tables(rows, "speedup")
    )  # fmt: skip
    block = f"{TABLE_BEGIN}\n{tables}\n{TABLE_END}"
    if TABLE_BEGIN in text and TABLE_END in text:
        head, rest = text.split(TABLE_BEGIN, 1)
        text = head + block + rest.split(TABLE_END, 1)[1]
    else:
        text = text + "\n" + block + "\n"
    doc.write_text(text)


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
        "timing": "wall time of the public pipeline call (encode, denoise, decode) on the first timing_samples "
        "evaluation samples; methods interleaved in a fresh shuffled order per repeat; minimum over repeats. "
        "speedup = uncached min / run min. speedup_cpu_time: the same with process CPU time (insensitive to "
        "other processes on a shared machine)",
        "selection": "every grid setting is screened on the calibration seed's batch; per method and per band of "
        "ideal speedup the best screening PSNR is evaluated on the evaluation seed's batch",
        "psnr_cap_db": PSNR_CAP_DB,
        "psnr": "pooled = 10 log10(1 / MSE over all samples and pixels), psnr_ci95 its 95% bootstrap interval "
        "over samples; per image = mean of per-image PSNRs (each capped); images in [0, 1]",
        "compute_fraction": "real block executions / those of the uncached run: from the request's telemetry "
        "(stack passes x layers, plus the first-block rule's probe on skipped steps), or counted by forward "
        "hooks on every block's FFN for diffusers' hooks",
    }
