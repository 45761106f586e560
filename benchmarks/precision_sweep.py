"""The precision-gain curve: how correct must semantic pairs be before they pay off?

On one encoder and one training budget, `sepp run` is repeated with the pairs mined by that encoder and with
DIAGNOSTIC oracle pairs (``mine.oracle=random``: each partner of the same class with probability P) at
several precisions, every point over the same seeds. The baseline and the extra-view control do not depend
on the pairs (same seeds, same steps), so they are trained once, in the first point, and shared by the
others (``--baseline-from`` links them from an earlier run instead; `sepp run` checks each linked arm's
fingerprint and trains it afresh, with the link moved aside, when its settings differ). Writes
``precision_sweep.json``, ``precision_sweep.md`` (the table) and ``precision_gain.png`` (SePP - baseline and
SePP - control, kNN and linear, with 95 % intervals, against precision; the mined point marked) under
``--out``; each point is described by what its run used (the pair file's meta), and the outputs carry the
DIAGNOSTIC line of the oracle points.

    python benchmarks/precision_sweep.py --encoder runs/demo/pretrain/last.pt --out runs/precision_sweep \
        [--precisions 0.3,0.5,0.7,0.9,1.0] [--seeds 0,1,2] [key=value ...]

Overrides are `sepp run` config keys on top of ``--config``. Default: the demo config in the setting where
label-correct pairs pay off (benchmarks/RESULTS.md, 2026-12-03): both arms continue from ``--encoder`` for 8
epochs, k = 400 partners per image, a partner replaces the second view half of the time and the views of
known partners in the batch are further positives (``sepp.batch_positives``, negatives masked).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from matplotlib.figure import Figure

from sepp.config import load_config
from sepp.engine.experiment import run_experiment
from sepp.eval.stats import format_difference

DEFAULTS = ["run.init=baseline", "run.sepp_epochs=8", "sepp.mode=substitute", "sepp.p=0.5", "sepp.mask_negatives=true",
            "sepp.batch_positives=true", "mine.k=400", "mine.threshold=0.0"]


DIAGNOSTIC = ("DIAGNOSTIC: the oracle points' pairs are built from the labels (mine.oracle=random), not mined; "
              "they bound what mining could give")


def _points(value: str) -> list:
    return [x if x == "mined" else float(x) for x in value.split(",")]


def _point_overrides(point: str) -> list[str]:
    return ["mine.oracle=none"] if point == "mined" else ["mine.oracle=random", f"mine.oracle_precision={point}"]


def _share_arms(first: Path, here: Path, seeds: list[int]) -> None:
    """Link the first point's baseline/control runs into this point (their configs do not involve pairs)."""
    for seed in seeds:
        for arm in ("baseline", "control"):
            src = (first / f"seed_{seed}" / arm) if len(seeds) > 1 else first / arm
            dst = (here / f"seed_{seed}" / arm) if len(seeds) > 1 else here / arm
            if src.is_dir() and not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src.resolve(), dst)


def sweep(args) -> dict:
    out = Path(args.out)
    points = [str(p) for p in args.precisions]
    if "mined" not in points and not args.no_mined:
        points.append("mined")
    seeds = [int(s) for s in args.seeds]
    rows = {}
    first = Path(args.baseline_from) if args.baseline_from else None
    for point in points:
        here = out / ("mined" if point == "mined" else f"oracle_p{point}")
        if first is not None:
            _share_arms(first, here, seeds)
        overrides = [*DEFAULTS, *args.overrides, f"run.baseline_checkpoint={args.encoder}",
                     f"run.seeds=[{','.join(map(str, seeds))}]", f"out={here}", *_point_overrides(point)]
        print(f"== point {point}: {' '.join(overrides)}", flush=True)
        res = run_experiment(load_config(args.config, overrides), progress=False)
        first = first or here
        mining = res["mining"]  # what the point's run used (its pair file's meta), not what was asked
        rows[point] = {**({"diagnostic": res["diagnostic"]} if res.get("diagnostic") else {}),
                       "oracle": mining["oracle"], "oracle_precision": mining["oracle_precision"], "k": mining["k"],
                       "precision": mining["precision"], "num_pairs": mining["num_pairs"],
                       "pair_sim_p50": (res["mining"].get("pair_sim") or {}).get("p50"),
                       "difference": res["difference"], "sepp": {m: res["sepp"][m] for m in ("knn", "linear")},
                       "baseline": {m: res["baseline"][m] for m in ("knn", "linear")}}
        result = write_outputs(args, out, seeds, rows)  # after every point: a stopped sweep keeps what it measured
    return result


def write_outputs(args, out: Path, seeds: list[int], rows: dict) -> dict:
    oracle = any(r.get("diagnostic") for r in rows.values())
    result = {**({"diagnostic": DIAGNOSTIC} if oracle else {}), "encoder": args.encoder, "config": args.config,
              "overrides": [*DEFAULTS, *args.overrides], "seeds": seeds, "points": rows,
              "break_even": break_even(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "precision_sweep.json").write_text(json.dumps(result, indent=2))
    (out / "precision_sweep.md").write_text(table(result))
    plot(result, out / "precision_gain.png")
    return result


def break_even(rows: dict, metric: str = "knn", against: str = "sepp-baseline") -> dict:
    """The lowest oracle precision whose gain is positive with its 95 % interval above 0 (``significant``)
    and the precision where the mean gain crosses 0 (linear interpolation between neighbouring points)."""
    pts = sorted((float(p), r["difference"][against][metric]) for p, r in rows.items() if p != "mined")
    significant = next((p for p, d in pts if d.get("ci95") and d["ci95"][0] > 0), None)
    crossing = None
    for (p0, d0), (p1, d1) in zip(pts, pts[1:]):
        if d0["mean"] <= 0 < d1["mean"]:
            crossing = p0 + (p1 - p0) * (-d0["mean"]) / (d1["mean"] - d0["mean"])
            break
    if crossing is None and pts and pts[0][1]["mean"] > 0:
        crossing = pts[0][0]  # positive already at the lowest precision measured
    return {"metric": metric, "against": against, "mean_crosses_zero_at": crossing,
            "lowest_significant_precision": significant}


def table(result: dict) -> str:
    against = [k for k in next(iter(result["points"].values()))["difference"]]
    head = "| pairs | label precision | pair cos (p50, mining encoder) | " + " | ".join(
        f"{a.replace('sepp-', 'SePP − ')} kNN | {a.replace('sepp-', 'SePP − ')} linear" for a in against) + " |"
    lines = [f"> **{result['diagnostic']}**", ""] if result.get("diagnostic") else []
    lines += [head, "|" + "---|" * (3 + 2 * len(against))]
    for point, r in result["points"].items():
        name = "mined" if r.get("oracle", "none") == "none" else f"oracle, P = {r['oracle_precision']}"
        prec = "—" if r["precision"] is None else f"{100 * r['precision']:.1f} %"
        sim = "—" if r["pair_sim_p50"] is None else f"{r['pair_sim_p50']:.3f}"
        cells = [format_difference(r["difference"][a][m]) for a in against for m in ("knn", "linear")]
        lines.append(f"| {name} | {prec} | {sim} | " + " | ".join(cells) + " |")
    be = result["break_even"]
    lines += ["", f"Seeds {result['seeds']}; encoder `{result['encoder']}`. Break-even ({be['metric']}, "
              f"{be['against']}): mean gain crosses 0 at precision {be['mean_crosses_zero_at']}, lowest precision "
              f"whose 95 % interval excludes 0: {be['lowest_significant_precision']}.", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    points = result["points"]
    oracle = sorted((float(p), r) for p, r in points.items() if p != "mined")
    for ax, metric in zip(axes, ("knn", "linear")):
        for against, style in (("sepp-baseline", "o-"), ("sepp-control", "s--")):
            if not oracle or against not in oracle[0][1]["difference"]:
                continue
            xs = [p for p, _ in oracle]
            ds = [r["difference"][against][metric] for _, r in oracle]
            ys = [d["mean"] for d in ds]
            err = [[(d["mean"] - d["ci95"][0]) if d.get("ci95") else 0 for d in ds],
                   [(d["ci95"][1] - d["mean"]) if d.get("ci95") else 0 for d in ds]]
            line = ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"oracle: {against}")
            mined = points.get("mined")
            if mined and mined["precision"] is not None:
                d = mined["difference"][against][metric]
                ax.errorbar([mined["precision"]], [d["mean"]], fmt="*", markersize=14, capsize=3,
                            color=line[0].get_color(),
                            yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]] if d.get("ci95") else None,
                            label=f"mined pairs: {against}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("label precision of the pairs")
        ax.set_ylabel(f"Δ {metric} top-1 (points, 95 % CI)")
        ax.set_title(f"{metric}: gain over the baseline vs pair precision")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if result.get("diagnostic"):
        fig.suptitle(result["diagnostic"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", required=True, help="sepp checkpoint whose encoder mines (and scores) the pairs")
    p.add_argument("--config", default="demo")
    p.add_argument("--out", default="runs/precision_sweep")
    p.add_argument("--precisions", type=_points, default=[0.3, 0.5, 0.7, 0.9, 1.0],
                   help="comma-separated oracle precisions, run in this order (default 0.3,0.5,0.7,0.9,1.0); the "
                   "word 'mined' places the mined point in the order (default: last)")
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2],
                   help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--no-mined", action="store_true", help="skip the point with the encoder's mined pairs")
    p.add_argument("--baseline-from", help="an earlier `sepp run` out dir with the same config and seeds whose "
                   "baseline/control arms are reused instead of trained")
    p.add_argument("overrides", nargs="*", help="sepp run config overrides, key=value")
    args = p.parse_args(argv)
    result = sweep(args)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
