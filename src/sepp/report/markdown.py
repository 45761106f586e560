"""report.md for `sepp run`: what was compared, the numbers, what was mined, and the pictures."""
from __future__ import annotations

from pathlib import Path


def _pct(v, scale=1.0):
    return "—" if v is None else f"{scale * v:.2f}"


def write_report(out: Path, results: dict, stats: dict, cfg) -> Path:
    m, b, s = results["mining"], results["baseline"], results["sepp"]
    lines = [
        f"# SePP experiment: {results['method']} on {results['dataset']}",
        "",
        f"Backbone `{results['backbone']}`, {results['num_images']} training images, device `{results['device']}`"
        f" × {results['world_size']} process(es). Budget matched by **{results['budget']}**; the SePP model "
        f"starts from **{s['init']}**, pairs used in **{s['mode']}** mode.",
        "",
        "## Results",
        "",
        "| model | epochs | optimizer steps | kNN top-1 (%) | linear top-1 (%) |",
        "|---|---|---|---|---|",
        f"| {results['method']} baseline | {b['epochs']} | {b['steps']} | {_pct(b['knn_top1'])} | {_pct(b['linear_top1'])} |",
        f"| {results['method']} + SePP | {s['epochs']} | {s['steps']} | {_pct(s['knn_top1'])} | {_pct(s['linear_top1'])} |",
        "",
    ]
    if b["knn_top1"] is not None and s["knn_top1"] is not None:
        lines.append(f"Difference (SePP − baseline): kNN {s['knn_top1'] - b['knn_top1']:+.2f} points"
                     + (f", linear {s['linear_top1'] - b['linear_top1']:+.2f} points"
                        if b["linear_top1"] is not None and s["linear_top1"] is not None else "") + ".")
        lines.append("")
    if results["dataset"] == "cifar10":
        lines += ["CIFAR-10 here may be the JPEG-degraded copy of the development machines: compare the two "
                  "rows with each other, not with published tables.", ""]
    lines += ["![kNN accuracy and loss per epoch](curves.png)", "", "## Mining", "",
              f"Encoder `{m['encoder']}`, features `{m['features']}`, top-k = {m['k']}, threshold = "
              f"{m['threshold']}, mutual = {m['mutual']}.", "",
              "| pairs | images | coverage | label precision |", "|---|---|---|---|",
              f"| {m['num_pairs']} | {m['num_images']} | {_pct(m['coverage'], 100)} % | "
              f"{'n/a (no labels; never used for mining)' if m['precision'] is None else _pct(m['precision'], 100) + ' %'} |",
              ""]
    q = stats.get("sim")
    if q and None not in q.values():
        lines += ["Cosine similarity of kept pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in q.items()), ""]
    per_class = stats.get("per_class")
    if per_class:
        lines += ["| anchor class | pairs | precision (%) |", "|---|---|---|"]
        lines += [f"| {name} | {c['pairs']} | {_pct(c['precision'], 100)} |" for name, c in per_class.items()]
        lines.append("")
    confused = stats.get("top_confused")
    if confused:
        lines += ["Most frequent wrong-class pairs: " + ", ".join(
            f"{' / '.join(c['classes'])} ({c['count']})" for c in confused[:10]) + ".", ""]
    lines += ["![anchors and their mined partners](pairs_gallery.png)", "",
              "![similarity of mined pairs](similarity_hist.png)", "", "## Time", "",
              "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()]
    lines += ["", "Full configuration: `config.yaml`; per-epoch metrics: `*/metrics.csv`; machine-readable "
              "results: `results.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
