"""Label-free pair selection rules as precision-coverage curves (issue 15).

For every encoder file given, embed the un-augmented training images (and their horizontal flips), search
each image's ``--k`` nearest neighbours over the whole training set, and score selection rules that use no
labels; the labels only score them:

- ``nn_fraction``: each anchor's nearest neighbour, keeping the fraction f of anchors most similar to theirs;
- ``threshold``: all top-k pairs with cosine >= t (t at quantiles that give 0.25 .. 5 pairs per image);
- ``mutual``: mutual top-k neighbours;
- ``shared``: top-k pairs whose anchors share at least s of their top-k lists (shared-neighbour count);
- ``flip_*``: the rules above on embeddings averaged over the image and its horizontal flip;
- ``agree``: pairs that two independently trained encoders both have in their top-k (one row per encoder
  pair).

Each point gives pairs per image, coverage (anchors with a partner), label precision on the held-out
"choice" anchors (``--choice-fraction`` of the images, fixed seed: where settings are chosen) and on the
others (where they are reported), and the label-free quality signal ``consistency`` (mean fraction of
shared top-k neighbours of a pair's two images, :func:`sepp.mining.stats.neighbourhood_consistency`).

    python benchmarks/pair_rules.py --encoder ../shared/encoders/simclr_narrow_cifar10_50k_10ep.pt \
        --encoder logs/enc_demo_s1/last.pt --subset 0 --out logs/rules   # both over all 50,000 images
    python benchmarks/pair_rules.py --mined E1=logs/pairs/e1_k20/pairs.npz --out logs/rules   # no flip rules

``--mined NAME=pairs.npz`` reads the top-k lists from a `sepp mine` file that kept every image's k nearest
(``mine.k=K mine.threshold=-1``), so nothing is embedded again; the flip rules need ``--encoder``.

Writes ``rules.json``, ``rules.md`` and ``rules.png`` into ``--out``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from sepp.config import load_config
from sepp.data.datasets import build_dataset
from sepp.data.pairs import load_pairs
from sepp.errors import SeppError
from sepp.data.recipes import mean_std
from sepp.data.transforms import uint8_normalizer
from sepp.eval.knn import knn_top1
from sepp.mining.embed import embed
from sepp.mining.encoder import encoder_config, load_encoder
from sepp.mining.pairs import select_pairs
from sepp.mining.search import topk
from sepp.mining.stats import neighbourhood_consistency, shared_neighbours


def embeddings(path: str, root: str | None, flip: bool, subset: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(features, features averaged with the flipped image's, labels, kNN)`` of the training split: the
    images the encoder was trained on, or ``subset`` of them (0: the whole split). ``kNN`` is the weighted kNN
    top-1 (percent; ``eval.knn_k``, ``eval.knn_t``) of the test split with those images as memory: the
    encoder's strength on the same features the rules search."""
    overrides = ["device=cpu"] + ([f"data.root={root}"] if root else []) + (
        [f"data.subset={subset}"] if subset is not None else [])
    cfg = encoder_config(path, None, overrides)
    encoder, _ = load_encoder(path)
    ds = build_dataset(cfg.data, cfg.data.split)
    images = ds.uint8_images()
    norm = uint8_normalizer(*mean_std(cfg.data.name))
    plain = embed(encoder, images, "cpu", normalize=norm)
    labels = np.asarray(ds.labels)
    test = build_dataset(OmegaConf.merge(cfg.data, {"subset": cfg.data.eval_subset}), cfg.data.eval_split)
    knn = knn_top1(torch.from_numpy(plain), torch.from_numpy(labels),
                   torch.from_numpy(embed(encoder, test.uint8_images(), "cpu", normalize=norm)),
                   torch.as_tensor(np.asarray(test.labels)), len(test.classes), cfg.eval.knn_k, cfg.eval.knn_t)
    if not flip:
        return plain, plain, labels, knn
    flipped = embed(encoder, torch.flip(images, dims=[3]), "cpu", normalize=norm)
    avg = plain + flipped
    avg /= np.linalg.norm(avg, axis=1, keepdims=True)
    return plain, avg.astype(np.float32), labels, knn


def rule_points(idx: np.ndarray, sim: np.ndarray, k: int, prefix: str = "") -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, i, j)`` for every operating point of the single-encoder rules."""
    n = len(idx)
    out = []
    order = np.argsort(-sim[:, 0], kind="stable")
    for f in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        a = np.sort(order[: int(round(f * n))])
        out.append((f"{prefix}nn_fraction f={f:g}", a, idx[a, 0].astype(np.int64)))
    flat = np.sort(sim[:, :k].ravel())[::-1]
    for per_image in (0.25, 0.5, 1, 2, 5):
        t = float(flat[min(len(flat) - 1, int(per_image * n))])
        i, j, _ = select_pairs(idx, sim, k, t)
        out.append((f"{prefix}threshold t={t:.4f} ({per_image:g}/img)", i, j))
    for kk in (1, 2, 5, 10):
        i, j, _ = select_pairs(idx, sim, kk, -1.0, mutual=True)
        out.append((f"{prefix}mutual k={kk}", i, j))
    for s in (6, 10, 14):
        for kk in (1, 5):
            i, j, _ = select_pairs(idx, sim, kk, -1.0)
            keep = shared_neighbours(idx[:, :k], i, j) >= s
            out.append((f"{prefix}shared s>={s} of {k} (top-{kk})", i[keep], j[keep]))
    return out


def score(name: str, i, j, labels, n: int, choice: np.ndarray, idx: np.ndarray, encoder: str,
          knn: float | None = None) -> dict:
    correct = labels[i] == labels[j]
    in_choice = choice[i]
    return {"encoder": encoder, "encoder_knn": knn, "rule": name, "pairs": int(len(i)), "per_image": len(i) / n,
            "coverage": len(np.unique(i)) / n,
            "precision_choice": float(correct[in_choice].mean()) if in_choice.any() else None,
            "precision_report": float(correct[~in_choice].mean()) if (~in_choice).any() else None,
            "consistency": neighbourhood_consistency(idx, i, j)}


def top_lists(path: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(idx, sim, meta)``: every image's top-k list from a pair file that kept all of them."""
    pairs = load_pairs(path)
    n = int(pairs.meta["num_images"])
    k = len(pairs) // n
    if k == 0 or len(pairs) != n * k or not (pairs.i.reshape(n, k) == np.arange(n)[:, None]).all():
        raise SeppError(f"{path} does not hold every image's top-k list; mine it with mine.threshold=-1")
    return pairs.j.reshape(n, k), pairs.sim.reshape(n, k), pairs.meta


def searches(args):
    """``(name, [(prefix, idx, sim)], labels, kNN)`` per encoder: plain (and flip-averaged) top-k lists; kNN
    is None for ``--mined`` files (nothing is embedded)."""
    for spec in args.mined:
        name, path = spec.split("=", 1)
        idx, sim, meta = top_lists(path)
        yield name, [("", idx[:, :args.k], sim[:, :args.k])], training_labels(args.root, meta), None
    for spec in args.encoder:
        name, path = spec.split("=", 1) if "=" in spec else (None, spec)
        name = name or (Path(path).parent.name if Path(path).name == "last.pt" else Path(path).stem)
        plain, avg, labels, knn = embeddings(path, args.root, args.flip, args.subset)
        found = [(prefix, *topk(emb, args.k, "exact", device="cpu"))
                 for prefix, emb in ((("", plain), ("flip_", avg)) if args.flip else (("", plain),))]
        yield name, found, labels, knn


def training_labels(root: str | None, meta: dict) -> np.ndarray:
    """The labels of the images a pair file was mined on (its dataset, split and class-balanced subset)."""
    overrides = [f"data.name={meta['name']}", f"data.split={meta['split']}", f"data.subset={meta['num_images']}"]
    cfg = load_config("demo", overrides + ([f"data.root={root}"] if root else []))
    ds = build_dataset(cfg.data, cfg.data.split)
    if ds.fingerprint() != meta["fingerprint"]:
        raise SeppError("the pair file was mined on other images than data.root holds; pass --root")
    return np.asarray(ds.labels)


def run(args) -> list[dict]:
    rows, knn, images = [], {}, {}
    for name, found, labels, strength in searches(args):
        images[name] = labels
        t0 = time.time()
        n = len(labels)
        choice = np.random.default_rng(12345).random(n) < args.choice_fraction
        for prefix, idx, sim in found:
            if not prefix:
                knn[name] = idx
            for rule, i, j in rule_points(idx, sim, idx.shape[1], prefix):
                rows.append(score(rule, i, j, labels, n, choice, idx, name, strength))
        print(f"{name}: {time.time() - t0:.0f} s" + ("" if strength is None else f", kNN {strength:.2f}"),
              flush=True)
    for (a, ia), (b, ib) in itertools.combinations(knn.items() if args.agree else (), 2):
        if not np.array_equal(images[a], images[b]):
            raise SeppError(f"{a} and {b} searched other images (their training subsets differ), so their pairs "
                            "cannot be compared; pass --subset 0 (or the same subset) for every encoder")
        for kk in sorted({kk for kk in (1, 5, 10, 20) if kk < ia.shape[1]} | {ia.shape[1]}):
            i, j, _ = select_pairs(ia, np.zeros(ia.shape, np.float32), kk, -1.0)
            keep = np.isin(i * n + j, _codes(ib[:, :kk], n))
            rows.append(score(f"agree top-{kk} with {b}", i[keep], j[keep], labels, n, choice, ia, a,
                              rows_knn(rows, a)))
    return rows


def rows_knn(rows: list[dict], encoder: str) -> float | None:
    return next((r["encoder_knn"] for r in rows if r["encoder"] == encoder), None)


def _codes(idx: np.ndarray, n: int) -> np.ndarray:
    rows = np.broadcast_to(np.arange(len(idx))[:, None], idx.shape)
    return (rows * n + idx).ravel()


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "rules.json").write_text(json.dumps(rows, indent=1))
    lines = ["| encoder | rule | pairs/img | coverage | precision (choice) | precision (report) | consistency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pc = "—" if r["precision_choice"] is None else f"{100 * r['precision_choice']:.1f} %"
        pr = "—" if r["precision_report"] is None else f"{100 * r['precision_report']:.1f} %"
        lines.append(f"| {r['encoder']} | {r['rule']} | {r['per_image']:.2f} | {100 * r['coverage']:.1f} % | "
                     f"{pc} | {pr} | {'—' if r['consistency'] is None else format(r['consistency'], '.3f')} |")
    (out / "rules.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "rules.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in rows if r["precision_report"] is not None and r["consistency"] is not None]  # no pairs
    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    fig, axes = plt.subplots(1, len(encoders) + 1, figsize=(5 * (len(encoders) + 1), 4.2))
    axes = np.atleast_1d(axes)
    for ax, enc in zip(axes, encoders):
        mine = [r for r in rows if r["encoder"] == enc]
        for family in dict.fromkeys(r["rule"].split(" ")[0] for r in mine):
            pts = sorted((r["coverage"], r["precision_report"]) for r in mine if r["rule"].split(" ")[0] == family)
            ax.plot([100 * c for c, _ in pts], [100 * p for _, p in pts], "o-", ms=3, label=family)
        ax.set(title=enc, xlabel="coverage (% of images with a partner)", ylabel="label precision (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    for enc in encoders:
        mine = [r for r in rows if r["encoder"] == enc]
        ax.scatter([r["consistency"] for r in mine], [100 * r["precision_report"] for r in mine], s=8, label=enc)
    ax.set(title="label-free signal vs precision", xlabel="neighbourhood consistency", ylabel="label precision (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", action="append", default=[],
                   help="[NAME=]encoder file (repeat for several; NAME defaults to the file's name)")
    p.add_argument("--mined", action="append", default=[], help="NAME=pairs.npz with every image's top-k list")
    p.add_argument("--root", default=None, help="data.root (default: the checkpoint's config / $SEPP_DATA)")
    p.add_argument("--subset", type=int, default=None,
                   help="data.subset for every --encoder (default: each encoder's own; 0: the whole split)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--choice-fraction", type=float, default=0.1)
    p.add_argument("--no-flip", dest="flip", action="store_false")
    p.add_argument("--no-agree", dest="agree", action="store_false",
                   help="skip the two-encoder agreement rows (e.g. for checkpoints of one run)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    write(run(args), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
