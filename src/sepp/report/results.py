"""The results of `sepp run` as types: the compared arms (with their labels, defined here once), one arm over
its seeds (:class:`ArmResult`) and the whole experiment (:class:`ExperimentResults`), serialised to the
``results.json`` layout; and the terminal table made from that layout."""
from __future__ import annotations

from dataclasses import dataclass, field

from sepp.eval.stats import SCORES, format_difference, format_mean_std, summarize


@dataclass(frozen=True)
class Arm:
    """One compared arm: ``name`` (key in results.json, folder of the run), ``label`` (pictures), ``table``
    and ``report`` (after the method's name in the terminal table and in report.md)."""
    name: str
    label: str
    table: str
    report: str


ARMS = (Arm("baseline", "baseline", "baseline", "baseline (same optimizer steps)"),
        Arm("control", "control (extra views)", "control (same views as SePP)",
            "control: baseline with the SePP arm's views, all of the image itself (same compute)"),
        Arm("sepp", "SePP", "+ SePP", "+ SePP"))
ARM = {arm.name: arm for arm in ARMS}
RUN_KEYS = ("seed", *(key for key, _ in SCORES.values()), "pair_cosine", "dir")  # one seed's entry


@dataclass
class ArmResult:
    """One arm over its seeds: per score its statistics over seeds (``summarize``), the training budget, the
    pair cosines and each seed's entry; ``setting`` describes the SePP arm (mode, init, masks)."""
    scores: dict
    epochs: int
    steps: int
    num_pairs: int
    views: int
    images_forwarded: int | None
    dir: str
    pair_cosine: float | None
    random_pair_cosine: float | None
    runs: list
    setting: dict = field(default_factory=dict)

    @classmethod
    def from_runs(cls, runs: list[dict], setting: dict | None = None) -> "ArmResult":
        """From each seed's entry (score keys, budget, ``pair_cosine`` ``{"pairs", "random"}``, ``dir``)."""
        first = runs[0]
        cosine = {k: summarize([(r.get("pair_cosine") or {}).get(k) for r in runs])["mean"]
                  for k in ("pairs", "random")}
        return cls({name: summarize([r[key] for r in runs]) for name, (key, _) in SCORES.items()},
                   first["epochs"], first["steps"], first["num_pairs"], first["views"], first["images_forwarded"],
                   first["dir"], cosine["pairs"], cosine["random"], [{k: r.get(k) for k in RUN_KEYS} for r in runs],
                   dict(setting or {}))

    def to_dict(self) -> dict:
        """A new dict each call: ``knn_top1``/``linear_top1``/... are the means (what the table prints),
        ``knn``/``linear``/... their statistics, ``runs`` each seed's entry."""
        return {**{key: self.scores[name]["mean"] for name, (key, _) in SCORES.items()},
                **{name: dict(stats) for name, stats in self.scores.items()},
                "epochs": self.epochs, "steps": self.steps, "num_pairs": self.num_pairs, "views": self.views,
                "images_forwarded": self.images_forwarded, "dir": self.dir, "pair_cosine": self.pair_cosine,
                "random_pair_cosine": self.random_pair_cosine, "runs": [dict(r) for r in self.runs],
                **self.setting}


@dataclass
class ExperimentResults:
    """What `sepp run` measured (``results.json``): descriptions taken from the artifacts used (the
    checkpoints' configs, the pair file's meta), the arms, the mining summary and the paired differences."""
    dataset: str
    method: str
    backbone: str
    num_images: int
    device: str
    world_size: int
    seeds: list
    out: str
    arms: dict  # name -> ArmResult, in ARMS order
    mining: dict
    budget: str
    seconds: dict
    evals: list
    difference: dict = field(default_factory=dict)
    diagnostic: str | None = None  # set when the pairs came from the labels (mine.oracle)
    embed_plot: str | None = None

    def to_dict(self) -> dict:
        return {**({"diagnostic": self.diagnostic} if self.diagnostic else {}),
                "dataset": self.dataset, "method": self.method, "backbone": self.backbone,
                "num_images": self.num_images, "device": self.device, "world_size": self.world_size,
                "seeds": self.seeds, "out": self.out, **{n: a.to_dict() for n, a in self.arms.items()},
                "mining": self.mining, "budget": self.budget, "seconds": self.seconds, "evals": self.evals,
                "difference": self.difference, "embed_plot": self.embed_plot}


def comparison_table(results: dict) -> str:
    """The terminal table of `sepp run` (from the results.json layout): each arm's scores (mean ± std over
    seeds), the SePP − other differences with their 95 % intervals and the pairs' statistics."""
    scored = [m for m in SCORES if m in results.get("evals", ["knn", "linear"])]
    rows = [("model", "epochs", "steps", "images fwd", *(SCORES[m][1] for m in scored))]
    for arm in ARMS:
        if arm.name in results:
            r = results[arm.name]
            rows.append((f"{results['method']} {arm.table}", str(r["epochs"]), str(r["steps"]),
                         str(r.get("images_forwarded", "—")), *(format_mean_std(r[m]) for m in scored)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if results.get("diagnostic"):
        lines.insert(0, results["diagnostic"])
    for key, d in [(k, d) for k, d in results.get("difference", {}).items() if d]:
        n = next(iter(d.values()))["n"]
        lines.append(f"{key.replace('sepp-', 'SePP - ')}: " + ", ".join(
            f"{SCORES[m][1].split(' ')[0]} {format_difference(v)}" for m, v in d.items()) + f" ({n} seed(s), paired)")
    m = results["mining"]
    prec = "" if m.get("precision") is None else f", label precision {100 * m['precision']:.1f} %"
    lines.append(f"pairs: {m['num_pairs']} (coverage {100 * m['coverage']:.1f} %{prec})")
    return "\n".join(lines)
