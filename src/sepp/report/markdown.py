"""report.md for `sepp run`: what was compared, the numbers, what was mined, and the pictures."""
from __future__ import annotations

from pathlib import Path

from sepp.eval.stats import SCORES, format_difference, format_mean_std
from sepp.report.results import ARMS


def _pct(v, scale=1.0):
    return "—" if v is None else f"{scale * v:.2f}"


SCORE_LABELS = {name: f"{label} (%)" for name, (_, label) in SCORES.items()}


def _header(results: dict, scored: list[str]) -> list[str]:
    """The DIAGNOSTIC banner (oracle pairs), the title, the setting and the head of the results table."""
    s = results["sepp"]
    seeds = results.get("seeds", [])
    lines = [f"> **{results['diagnostic']}** — an upper bound for research, not a result of mining.", ""] \
        if results.get("diagnostic") else []
    lines += [
        f"# SePP experiment: {results['method']} on {results['dataset']}",
        "",
        f"Backbone `{results['backbone']}`, {results['num_images']} training images, device `{results['device']}`"
        f" × {results['world_size']} process(es). Budget matched by **{results['budget']}**; the SePP model "
        f"starts from **{s['init']}**, pairs used in **{s['mode']}** mode"
        f"{', negatives masked' if s.get('mask_negatives') else ''}"
        f"{', partners in the batch counted as positives' if s.get('batch_positives') else ''}. Seeds: {', '.join(map(str, seeds))} "
        "(every arm is trained once per seed; mean ± std over seeds).",
        "",
        "## Results",
        "",
        "| model | epochs | optimizer steps | views / sample | images forwarded |"
        + "".join(f" {SCORE_LABELS[m]} |" for m in scored),
        "|---|---|---|---|---|" + "---|" * len(scored),
    ]
    return lines


def _results(results: dict, scored: list[str]) -> list[str]:
    """One row per arm, the paired differences, the pair cosines, the per-seed table and the curves."""
    seeds = results.get("seeds", [])
    lines = []
    for arm in ARMS:
        if arm.name in results:
            r = results[arm.name]
            lines.append(f"| {results['method']} {arm.report} | {r['epochs']} | {r['steps']} | {r.get('views', 2)} | "
                         f"{r.get('images_forwarded', '—')} |" + "".join(f" {format_mean_std(r[m])} |" for m in scored))
    lines.append("")
    for key, d in [(k, d) for k, d in results.get("difference", {}).items() if d]:
        other = key.split("-", 1)[1]
        n = next(iter(d.values()))["n"] if d else 0
        lines.append(f"**SePP − {other}** (paired by seed, {n} seed(s)): " + ", ".join(
            f"{SCORE_LABELS[m].split(' (')[0]} {format_difference(v, ' points')}" for m, v in d.items()) + ".")
        lines.append("")
    if results.get("embed_plot"):
        lines += [f"![2-D embedding of the evaluation split, arms side by side]({results['embed_plot']})", ""]
    cosines = [(a.label, results[a.name]) for a in ARMS
               if a.name in results and results[a.name].get("pair_cosine") is not None]
    if cosines:
        lines += ["How close the pairs are for each trained model (mean cosine of backbone features over the pairs; "
                  "random image pairs for reference): " + "; ".join(
                      f"{n} {r['pair_cosine']:.3f} (random {r['random_pair_cosine']:.3f})" for n, r in cosines) + ".",
                  ""]
    if len(seeds) > 1:
        present = [a.name for a in ARMS if a.name in results]
        keys = {name: key for name, (key, _) in SCORES.items()}
        lines += ["| seed | " + " | ".join(f"{n} {' / '.join(scored)}" for n in present) + " |",
                  "|---|" + "---|" * len(present)]
        for k, seed in enumerate(seeds):
            cells = [" / ".join(_pct(results[n]["runs"][k][keys[m]]) for m in scored) for n in present]
            lines.append(f"| {seed} | " + " | ".join(cells) + " |")
        lines.append("")
    if results["dataset"] == "cifar10":
        lines += ["CIFAR-10 here may be the JPEG-degraded copy of the development machines: compare the two "
                  "rows with each other, not with published tables.", ""]
    curves = "kNN accuracy and loss" if "knn" in scored else "training loss"
    lines += [f"![{curves} against optimizer steps](curves.png)", ""]
    return lines


def _sha(m: dict) -> str:
    return f" (SHA-256 `{m['encoder_sha256']}`)" if m.get("encoder_sha256") else ""


def _pairs(m: dict, stats: dict) -> list[str]:
    """Where the pairs come from, their statistics (precision only for reporting) and pictures."""
    source = (f"DIAGNOSTIC pairs from the labels (`mine.oracle={m['oracle']}`"
              + (f", precision {m['oracle_precision']}" if m.get("oracle_precision") is not None else "")
              + f"), k = {m['k']}; similarities from encoder `{m['encoder']}`." if m.get("oracle", "none") != "none"
              else f"Encoder `{m['encoder']}`{_sha(m)}, features `{m['features']}`, top-k = {m['k']} (ranks "
                   f"{m.get('rank_from', 1)}..{m['k']}), threshold = {m['threshold']}, mutual = {m['mutual']}.")
    labelled = m.get("precision") is not None  # no label column at all without labels
    lines = ["## Pairs", "", source, "",
             "| pairs | images | coverage |" + (" label precision (never used for mining) |" if labelled else ""),
             "|---|---|---|" + ("---|" if labelled else ""),
             f"| {m['num_pairs']} | {m['num_images']} | {_pct(m['coverage'], 100)} % |"
             + (f" {_pct(m['precision'], 100)} % |" if labelled else ""), ""]
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
              "Browse the pairs, least similar first: [pairs.html](pairs.html).", "",
              "![similarity of mined pairs](similarity_hist.png)", ""]
    return lines


def write_report(out: Path, results: dict, stats: dict) -> Path:
    """``out/report.md``: the setting, the arms' scores and paired differences, the pairs, the time per phase."""
    scored = [m for m in SCORE_LABELS if m in results.get("evals", ["knn", "linear"])]
    lines = _header(results, scored) + _results(results, scored) + _pairs(results["mining"], stats)
    lines += ["## Time", "", "| phase | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in results["seconds"].items()]
    lines += ["", "Full configuration: `config.yaml`; per-epoch metrics: `*/metrics.csv`; machine-readable "
              "results: `results.json`.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
