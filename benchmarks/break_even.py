"""Where mined pairs would start to help (issue 15): the break-even pair precision measured by k-matched
training controls, and the encoder strength at which a label-free rule's pairs are predicted to reach it.

1. **Break-even precision**, per mining encoder: two continuation arms with the same anchors and pair counts
   (``mined``, and ``oracle_random`` = label-correct partners; ``benchmarks/pair_controls.py``) give
   SePP − baseline at two *effective* precisions (symmetric, de-duplicated known-positive sets: what the loss
   sees). The straight line through the two points crosses 0 at p*. Given from the seed means and for each
   seed (paired differences), so its spread is visible. Two points: an estimate, not a measured curve.
2. **Encoder strength**: over every encoder scored by ``benchmarks/pair_rules.py`` (rows carry the encoder's
   kNN), one rule's label precision against kNN, a least-squares line; kNN* is where it reaches p*.

    python benchmarks/break_even.py --study E1=logs/cont_e1/continuation.json,logs/pairs/e1_t9636_controls/controls.json \
        --rules logs/rules_2enc/rules.json --rules logs/rules_strength/rules.json --out logs/break_even

Writes ``break_even.json``, ``break_even.md`` and ``break_even.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np


def crossing(p_lo: float, d_lo: float, p_hi: float, d_hi: float) -> float | None:
    """Where the line through ``(p_lo, d_lo)`` and ``(p_hi, d_hi)`` crosses 0; None when it does not rise, or
    when it is still below 0 at precision 1 (no precision breaks even)."""
    if d_hi <= d_lo or p_hi == p_lo:
        return None
    p = p_lo - d_lo * (p_hi - p_lo) / (d_hi - d_lo)
    return p if p <= 1.0 else None


def fit_line(x, y) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: ``(a, b, r²)``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(x, y, 1)
    resid = y - (a + b * x)
    r2 = 1.0 - float(resid @ resid) / float(((y - y.mean()) ** 2).sum())
    return float(a), float(b), r2


def study(continuation: dict, controls: list[dict], low: str, high: str, score: str) -> dict:
    """Break-even precision from one encoder's continuation runs and its control files' precisions."""
    prec = {c["file"]: c["effective_precision"] for c in controls}
    runs = continuation["runs"]
    by_seed = {arm: {r["seed"]: r[score] for r in runs[arm]} for arm in ("baseline", low, high)}
    seeds = sorted(set.intersection(*(set(v) for v in by_seed.values())))
    if not seeds:
        raise SystemExit(f"no seed has all of baseline, {low} and {high}; finish those arms first")
    diff = {arm: np.array([by_seed[arm][s] - by_seed["baseline"][s] for s in seeds]) for arm in (low, high)}
    per_seed = [crossing(prec[low], diff[low][k], prec[high], diff[high][k]) for k in range(len(seeds))]
    return {"seeds": seeds, "precision": {low: prec[low], high: prec[high]},
            "difference_mean": {a: float(d.mean()) for a, d in diff.items()},
            "break_even": crossing(prec[low], diff[low].mean(), prec[high], diff[high].mean()),
            "break_even_per_seed": per_seed}


def strength(rows: list[dict], rule: str, exclude: tuple[str, ...] = ()) -> dict:
    """The rule's precision against encoder kNN over every encoder that has both (but ``exclude``); the
    fitted line; and, per encoder, how well the label-free consistency orders all of its rules (Spearman)."""
    pick = {}
    for r in rows:
        if (re.fullmatch(rule, r["rule"]) and r.get("encoder_knn") is not None and r["precision_report"] is not None
                and r["encoder"] not in exclude):
            pick[r["encoder"]] = r
    if len(pick) < 2:
        raise SystemExit(f"fewer than 2 encoders have rule {rule!r} with a kNN; run pair_rules.py with --encoder")
    pts = [{"encoder": e, "knn": r["encoder_knn"], "precision": r["precision_report"], "coverage": r["coverage"],
            "consistency": r["consistency"]} for e, r in pick.items()]
    a, b, r2 = fit_line([p["knn"] for p in pts], [p["precision"] for p in pts])
    within = {}
    for enc in dict.fromkeys(r["encoder"] for r in rows):
        xy = [(r["consistency"], r["precision_report"]) for r in rows if r["encoder"] == enc
              and r["consistency"] is not None and r["precision_report"] is not None]
        if len(xy) > 2:
            within[enc] = {"rules": len(xy), "spearman": spearman(*zip(*xy))}
    return {"rule": rule, "points": sorted(pts, key=lambda p: p["knn"]), "intercept": a, "slope": b, "r2": r2,
            "excluded": list(exclude), "consistency_within_encoder": within}


def spearman(x, y) -> float:
    rx, ry = (np.argsort(np.argsort(v)).astype(float) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def report(studies: dict, fit: dict) -> tuple[dict, str]:
    a, b = fit["intercept"], fit["slope"]
    lines = [f"Rule `{fit['rule']}`: label precision = {100 * a:.1f} % + {100 * b:.2f} % per kNN point "
             f"(r² {fit['r2']:.2f}, {len(fit['points'])} encoders)", "",
             "| encoder | kNN | coverage | precision | consistency |", "|---|---|---|---|---|"]
    for p in fit["points"]:
        cons = "—" if p["consistency"] is None else f"{p['consistency']:.3f}"
        lines.append(f"| {p['encoder']} | {p['knn']:.2f} | {100 * p['coverage']:.1f} % | "
                     f"{100 * p['precision']:.1f} % | {cons} |")
    cons = [(p["consistency"], p["precision"]) for p in fit["points"] if p["consistency"] is not None]
    fit["consistency_spearman"] = spearman(*zip(*cons)) if len(cons) > 2 else None
    if fit["consistency_spearman"] is not None:
        lines += ["", f"Across these encoders (this rule), Spearman(consistency, precision) = "
                      f"{fit['consistency_spearman']:.2f}; within each encoder, over all its rules: "
                  + ", ".join(f"{e} {w['spearman']:.2f} ({w['rules']} rules)"
                              for e, w in fit["consistency_within_encoder"].items()) + "."]
    if fit["excluded"]:
        lines += ["", f"Left out of the line: {', '.join(fit['excluded'])}."]
    lines += ["", "| mining encoder | seeds | effective precision (low / high arm) | SePP − baseline (low / high) | "
              "break-even p* (means) | p* per seed | predicted kNN at p* |", "|---|---|---|---|---|---|---|"]
    for name, s in studies.items():
        (lo, plo), (hi, phi) = s["precision"].items()
        pe = s["break_even"]
        s["knn_at_break_even"] = None if pe is None or b <= 0 else (pe - a) / b
        seeds = ", ".join("—" if p is None else f"{100 * p:.1f} %" for p in s["break_even_per_seed"])
        knn = "—" if s["knn_at_break_even"] is None else f"{s['knn_at_break_even']:.1f}"
        lines.append(f"| {name} | {s['seeds']} | {lo} {100 * plo:.1f} % / {hi} {100 * phi:.1f} % | "
                     f"{s['difference_mean'][lo]:+.2f} / {s['difference_mean'][hi]:+.2f} | "
                     f"{'—' if pe is None else f'{100 * pe:.1f} %'} | {seeds} | {knn} |")
    return {"studies": studies, "strength": fit}, "\n".join(lines) + "\n"


def plot(result: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fit = result["strength"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [p["knn"] for p in fit["points"]]
    ax.scatter(xs, [100 * p["precision"] for p in fit["points"]], s=14)
    for p in fit["points"]:
        ax.annotate(p["encoder"], (p["knn"], 100 * p["precision"]), fontsize=6, xytext=(3, -3),
                    textcoords="offset points")
    top = max([xs[-1]] + [s["knn_at_break_even"] or 0 for s in result["studies"].values()]) + 2
    grid = np.linspace(min(xs) - 2, top, 50)
    ax.plot(grid, 100 * (fit["intercept"] + fit["slope"] * grid), "k--", lw=1, label="least-squares line")
    for name, s in result["studies"].items():
        if s["break_even"] is not None:
            ax.axhline(100 * s["break_even"], lw=1, color="C3", alpha=0.6)
            ax.annotate(f"break-even ({name})", (grid[0], 100 * s["break_even"]), fontsize=7, color="C3")
    ax.set(xlabel="encoder kNN top-1 (%)", ylabel="label precision of the rule's pairs (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--study", action="append", default=[],
                   help="NAME=continuation.json,controls.json (repeat per mining encoder)")
    p.add_argument("--rules", action="append", default=[], help="rules.json of pair_rules.py (repeat)")
    p.add_argument("--rule", default=r"threshold t=\S+ \(1/img\)", help="regular expression for the rule name")
    p.add_argument("--title", default="the dataset's most similar top-20 pairs, 1 per image",
                   help="the picture's title: the rule in words")
    p.add_argument("--low", default="mined")
    p.add_argument("--high", default="oracle_random")
    p.add_argument("--score", default="knn_top1")
    p.add_argument("--exclude", action="append", default=[],
                   help="an encoder left out of the precision-kNN line (e.g. one trained with label-built pairs)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    studies = {}
    for spec in args.study:
        name, files = spec.split("=", 1)
        cont, ctrl = files.split(",")
        studies[name] = study(json.loads(Path(cont).read_text()), json.loads(Path(ctrl).read_text()),
                              args.low, args.high, args.score)
    rows = [r for f in args.rules for r in json.loads(Path(f).read_text())]
    result, text = report(studies, strength(rows, args.rule, tuple(args.exclude)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "break_even.json").write_text(json.dumps(result, indent=1))
    (out / "break_even.md").write_text(text)
    plot(result, out / "break_even.png", args.title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
