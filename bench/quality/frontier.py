"""Fair matching: each method's Pareto front, interpolated at fixed speedups, and paired-bootstrap margins.

A method's front is its evaluated runs not beaten by another of its runs that is both cheaper and
better (pooled PSNR vs compute fraction). At a target speedup x (compute fraction 1/x) the front is
interpolated linearly in compute fraction between the two front points around 1/x. When the
method has front points only faster than x, its value is the best of those ("staircase": a
setting at least as fast gives at least that); with none at least as fast, the method does not
reach x (``None``); nothing is extrapolated.

The margin of ours over a peer at x is the difference of the two interpolated pooled PSNRs. Its 95%
interval is a paired bootstrap over the evaluation samples: every run saw the same samples (same
prompts, same noise), so one resample of sample indices is applied to every run involved, the
pooled PSNRs are recomputed from the per-image MSEs, interpolated with the same weights, and
differenced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

BANDS = (1.5, 2.0, 3.0, 4.0, 5.0)
BOOTSTRAP = 2000


def pooled_psnr(mse: np.ndarray) -> np.ndarray:
    """Pooled PSNR over the last axis of per-image MSEs (images in [0, 1]); 100 dB cap."""
    m = np.asarray(mse, dtype=float).mean(axis=-1)
    return np.where(m > 0, 10 * np.log10(1.0 / np.maximum(m, 1e-30)), 100.0).clip(max=100.0)


def front(points: Sequence[dict]) -> list[dict]:
    """Pareto front of runs (``compute_fraction`` lower is better, ``psnr`` higher is better), by fraction."""
    out: list[dict] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p["compute_fraction"], -p["psnr"])):
        if p["psnr"] > best:
            out.append(p)
            best = p["psnr"]
    return out


def interpolation(points: Sequence[dict], target: float) -> dict | None:
    """How the front of ``points`` gives its PSNR at ``target`` speedup: {"kind", "runs", "weights"} or None.

    ``runs`` are indices into ``points``; PSNR = sum(weights * psnr(runs))."""
    phi = 1.0 / target
    fr = front(points)
    index = {id(p): i for i, p in enumerate(points)}
    faster = [p for p in fr if p["compute_fraction"] <= phi + 1e-12]
    slower = [p for p in fr if p["compute_fraction"] > phi + 1e-12]
    if not faster:
        return None
    lo = max(faster, key=lambda p: p["compute_fraction"])  # the slowest front point at least as fast
    if not slower:
        best = max(faster, key=lambda p: p["psnr"])
        return {"kind": "staircase" if best["compute_fraction"] < phi - 1e-12 else "exact",
                "runs": [index[id(best)]], "weights": [1.0]}  # fmt: skip
    if abs(lo["compute_fraction"] - phi) <= 1e-12:
        return {"kind": "exact", "runs": [index[id(lo)]], "weights": [1.0]}
    hi = min(slower, key=lambda p: p["compute_fraction"])
    w = (hi["compute_fraction"] - phi) / (hi["compute_fraction"] - lo["compute_fraction"])
    return {"kind": "interpolated", "runs": [index[id(lo)], index[id(hi)]], "weights": [w, 1.0 - w]}


def value(points: Sequence[dict], how: dict, mse_rows: np.ndarray | None = None) -> np.ndarray | float:
    """The interpolated PSNR; with ``mse_rows`` ([runs, resamples, samples] per-image MSEs of ``points``
    already resampled), one value per resample."""
    if mse_rows is None:
        return float(sum(w * points[i]["psnr"] for i, w in zip(how["runs"], how["weights"])))
    return sum(w * pooled_psnr(mse_rows[i]) for i, w in zip(how["runs"], how["weights"]))


def paired_margin(
    ours: Sequence[dict], how_ours: dict, peer: Sequence[dict], how_peer: dict, resamples: int = BOOTSTRAP,
    seed: int = 0,
) -> dict[str, Any]:
    """Margin (ours - peer, dB) of the interpolated pooled PSNRs and its paired 95% bootstrap interval.

    Every run must carry ``per_image_mse`` over the same samples in the same order."""
    n = len(ours[how_ours["runs"][0]]["per_image_mse"])
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))

    def resampled(points: Sequence[dict], how: dict) -> np.ndarray:
        rows = {i: np.asarray(points[i]["per_image_mse"], dtype=float)[picks] for i in how["runs"]}
        return sum(w * pooled_psnr(rows[i]) for i, w in zip(how["runs"], how["weights"]))

    diffs = resampled(ours, how_ours) - resampled(peer, how_peer)
    margin = value(ours, how_ours) - value(peer, how_peer)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {
        "margin_db": round(float(margin), 3),
        "ci95": [round(float(low), 3), round(float(high), 3)],
        "p_ours_not_better": round(float((diffs <= 0).mean()), 4),
    }


def describe(points: Sequence[dict], how: dict | None) -> dict | None:
    """What the JSON keeps of one method's value at one band."""
    if how is None:
        return None
    return {
        "psnr": round(value(points, how), 3),
        "kind": how["kind"],
        "from": [
            {"compute_fraction": points[i]["compute_fraction"], "psnr": points[i]["psnr"], "setting": points[i]["setting"],
             "weight": round(w, 4)}
            for i, w in zip(how["runs"], how["weights"])
        ],
    }  # fmt: skip


def frontier_table(rows: list[dict], ours: str, peer_methods: Sequence[str], bands: Sequence[float] = BANDS) -> dict:
    """{model: {steps: {band: {...}}}} over evaluated rows (each with model, steps, method, setting,
    compute_fraction, psnr, per_image_mse)."""
    table: dict = {}
    keys = sorted({(r["model"], r["steps"]) for r in rows if r["method"] != "uncached"}, key=lambda k: (k[0], k[1]))
    for model, steps in keys:
        mine = [r for r in rows if r["model"] == model and r["steps"] == steps]
        by_method = {m: [r for r in mine if r["method"] == m] for m in [ours, *peer_methods]}
        per_band = {}
        for band in bands:
            hows = {m: interpolation(pts, band) if pts else None for m, pts in by_method.items()}
            methods = {m: describe(by_method[m], hows[m]) for m in by_method}
            reached = {m: v["psnr"] for m, v in methods.items() if v is not None and m != ours}
            best_peer = max(reached, key=reached.get) if reached else None
            margins = {}
            if hows[ours] is not None:
                for m in reached:
                    margins[m] = paired_margin(by_method[ours], hows[ours], by_method[m], hows[m])
            per_band[f"{band:g}x"] = {
                "methods": methods,
                "ours": ours,
                "best_peer": best_peer,
                "margin_vs_best_peer": margins.get(best_peer) if best_peer else None,
                "margins": margins,
            }
        table.setdefault(model, {})[str(steps)] = per_band
    return table
