"""Seed statistics: mean ± std of an accuracy over seeds, and the 95 % interval of a paired difference.

Two arms trained with the same seeds share their data order and initialisation draws, so the difference is
taken seed by seed (paired) and its interval is Student's t: ``mean ± t(0.975, n-1) · std / sqrt(n)``.
"""
from __future__ import annotations

import math

# the per-arm scores of `sepp run`, the one list of them: evaluation name (run.evals) -> (result key, label);
# `sepp.eval.RUN_EVALS` (the allowed run.evals) is these and embed_plot
SCORES = {"knn": ("knn_top1", "kNN top-1"), "linear": ("linear_top1", "linear top-1"),
          "finetune": ("finetune_top1", "fine-tune top-1"), "transfer": ("transfer_score", "transfer")}

# two-sided 95 % quantiles t(0.975, df) of Student's t for df = 1..30; the normal 1.96 beyond
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        raise ValueError("a t interval needs at least two values")
    return T975[df - 1] if df <= len(T975) else 1.96


def summarize(values: list[float | None]) -> dict:
    """``{"mean", "std", "n", "values"}`` (std with ddof=1; None for one value); None entries are ignored
    and an all-None list gives mean None."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    mean = sum(xs) / n if n else None
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "n": n, "values": list(values)}


def paired_difference(a: list[float | None], b: list[float | None]) -> dict:
    """Statistics of ``a[s] - b[s]`` over the seeds where both exist, with the 95 % t interval ``ci95``
    ([low, high]; None with fewer than two seeds) and whether it excludes 0."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    out = summarize(diffs)
    if out["n"] >= 2:
        half = t975(out["n"] - 1) * out["std"] / math.sqrt(out["n"])
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
        out["excludes_zero"] = out["ci95"][0] > 0 or out["ci95"][1] < 0
    else:
        out["ci95"], out["excludes_zero"] = None, None
    return out


def format_difference(d: dict, unit: str = "") -> str:
    """``+1.23 [95 % CI +0.10, +2.36]`` (or just the mean with one seed)."""
    if d["mean"] is None:
        return "—"
    if d.get("ci95") is None:
        return f"{d['mean']:+.2f}{unit} (1 seed, no interval)"
    lo, hi = d["ci95"]
    return f"{d['mean']:+.2f}{unit} [95 % CI {lo:+.2f}, {hi:+.2f}]"


def format_mean_std(s: dict) -> str:
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.2f}" if s["std"] is None else f"{s['mean']:.2f} ± {s['std']:.2f}"
