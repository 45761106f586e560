"""DIAGNOSTIC controls for a mined pair file at its own k and coverage (issue 15, point 3).

Every control keeps the mined file's anchors and each anchor's number of partners, so it differs from the
mined pairs only in *which* partners they are; the labels build them, so every file is DIAGNOSTIC:

- ``dropped``: the mined pairs with their wrong partners removed (precision 1, fewer pairs);
- ``replaced``: wrong partners replaced by random images of another class (the mined precision, but errors
  that do not look like the anchor);
- ``oracle_random``: every partner a random image of the anchor's class (precision 1, same count);
- ``oracle_nearest``: an anchor's nearest same-class neighbours by the mining encoder (precision 1, same
  count; needs ``--encoder``);
- ``oracle_at_p``: random partners, each of the anchor's class with the mined precision.

    python benchmarks/pair_controls.py --pairs logs/pairs/e1.npz --out logs/pairs/e1_controls \
        [--encoder logs/enc1_50k_s0.pt] [--config demo data.subset=0]

Prints each file's pairs, coverage and label precision, and the *effective* precision of the known-positive
sets the loss uses (``sepp.methods.known``: pairs made symmetric and de-duplicated).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sepp.config import load_config
from sepp.data.datasets import build_dataset
from sepp.data.pairs import Pairs, load_pairs, save_pairs
from sepp.data.recipes import mean_std
from sepp.data.transforms import uint8_normalizer
from sepp.mining.embed import embed
from sepp.mining.encoder import load_encoder
from sepp.mining.oracle import nearest_same_class
from sepp.mining.search import topk


def effective_precision(i: np.ndarray, j: np.ndarray, labels: np.ndarray) -> float | None:
    """Label precision of the symmetric, de-duplicated known-positive sets (what the loss sees)."""
    if len(i) == 0:
        return None
    n = int(max(i.max(), j.max())) + 1
    codes = np.unique(np.concatenate([i * n + j, j * n + i]))
    a, b = codes // n, codes % n
    keep = a != b
    return float((labels[a[keep]] == labels[b[keep]]).mean())


def random_of(labels: np.ndarray, anchors: np.ndarray, same: np.ndarray, rng) -> np.ndarray:
    """One random partner per anchor: of the anchor's class where ``same``, else of another class."""
    by_class = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    others = {c: np.flatnonzero(labels != c) for c in by_class}
    out = np.empty(len(anchors), dtype=np.int64)
    for c in by_class:
        for want, pool in ((True, by_class[c]), (False, others[c])):
            rows = np.flatnonzero((labels[anchors] == c) & (same == want))
            out[rows] = rng.choice(pool, size=len(rows))
    bad = (out == anchors)  # a class-mate draw may hit the anchor itself: redraw those
    while bad.any():
        rows = np.flatnonzero(bad)
        out[rows] = [rng.choice(by_class[labels[a]]) for a in anchors[rows]]
        bad = out == anchors
    return out


def nearest_controls(mined: Pairs, labels: np.ndarray, encoder: str, cfg) -> np.ndarray:
    """For every mined pair, the anchor's r-th nearest same-class neighbour (r = the pair's rank among the
    anchor's partners) among its 200 nearest by ``encoder``; -1 where there are too few."""
    model, _ = load_encoder(encoder)
    ds = build_dataset(cfg.data, cfg.data.split)
    emb = embed(model, ds.uint8_images(), "cpu", normalize=uint8_normalizer(*mean_std(cfg.data.name)))
    idx, sim = topk(emb, 200, "exact", device="cpu")
    ni, nj, _ = nearest_same_class(idx, sim, labels, 200)  # sorted by anchor, then by rank
    order = np.r_[0, np.flatnonzero(np.diff(ni)) + 1]
    rows = dict(zip(ni[order].tolist(), np.split(nj, order[1:])))
    starts = np.r_[0, np.flatnonzero(np.diff(mined.i)) + 1]
    rank = np.arange(len(mined)) - np.repeat(starts, np.diff(np.r_[starts, len(mined)]))
    return np.array([rows[a][r] if a in rows and r < len(rows[a]) else -1 for a, r in zip(mined.i, rank)])


def controls(mined: Pairs, labels: np.ndarray, seed: int, encoder: str | None, cfg) -> dict[str, Pairs]:
    rng = np.random.default_rng(seed)
    correct = labels[mined.i] == labels[mined.j]
    prec = float(correct.mean())
    base = {**mined.meta, "mined_precision": prec, "controls_of": mined.path}
    out = {}

    def make(kind, i, j, note):
        meta = {**base, "oracle": "control", "control": kind,
                "diagnostic": f"DIAGNOSTIC: pairs built from the labels ({note}), not mined"}
        out[kind] = Pairs(i, j, np.full(len(i), np.nan, np.float32), meta)

    make("dropped", mined.i[correct], mined.j[correct], "the mined pairs with their wrong partners dropped")
    j = mined.j.copy()
    j[~correct] = random_of(labels, mined.i[~correct], np.zeros((~correct).sum(), bool), rng)
    make("replaced", mined.i, j, "wrong partners replaced by random images of other classes")
    make("oracle_random", mined.i, random_of(labels, mined.i, np.ones(len(mined), bool), rng),
         "random class-mates, the mined anchors and counts")
    make("oracle_at_p", mined.i, random_of(labels, mined.i, rng.random(len(mined)) < prec, rng),
         f"random partners of the anchor's class with probability {prec:.3f}, the mined anchors and counts")
    if encoder:
        nj = nearest_controls(mined, labels, encoder, cfg)
        ok = nj >= 0
        make("oracle_nearest", mined.i[ok], nj[ok], "nearest class-mates by the encoder, the mined anchors and counts")
    return out


def describe(name: str, p: Pairs, labels: np.ndarray, n: int) -> dict:
    return {"file": name, "pairs": len(p), "per_image": len(p) / n, "coverage": len(np.unique(p.i)) / n,
            "precision": float((labels[p.i] == labels[p.j]).mean()) if len(p) else None,
            "effective_precision": effective_precision(p.i, p.j, labels)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--encoder", default=None)
    ap.add_argument("--config", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", default=["data.subset=0"])
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    labels = np.asarray(build_dataset(cfg.data, cfg.data.split).labels)
    mined = load_pairs(args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [describe("mined", mined, labels, len(labels))]
    for kind, p in controls(mined, labels, args.seed, args.encoder, cfg).items():
        save_pairs(out / f"{kind}.npz", p)
        rows.append(describe(kind, p, labels, len(labels)))
    (out / "controls.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
