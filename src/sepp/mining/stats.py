"""Statistics of a mined pair set (JSON-serialisable). Labels only score the pairs; mining never sees them."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

QUANTILES = {"min": 0.0, "p5": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95, "max": 1.0}
TOP_CONFUSED = 10


def pair_correct(i: np.ndarray, j: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(known, correct): both ends labelled (label >= 0), and the labels agree (meaningful where known)."""
    if labels is None:
        return np.zeros(len(i), bool), np.zeros(len(i), bool)
    labels = np.asarray(labels)
    a, b = labels[i], labels[j]
    return (a >= 0) & (b >= 0), a == b


def mining_stats(i, j, sim, num_images: int, labels=None, classes: Sequence[str] | None = None) -> dict:
    """Summary of pairs (i, j, sim) over ``num_images`` images.

    ``coverage``: fraction of images in at least one pair, as anchor or as partner;
    ``anchor_coverage``: fraction with at least one partner of their own. ``sim``: quantiles of the pair
    similarities (None without pairs). With ``labels`` (``-1`` = unknown; pairs need both ends known):
    ``precision`` (fraction of same-label pairs), ``per_class`` precision and count by anchor class,
    ``confusion`` (C x C counts of wrong pairs, row = anchor class, column = partner class) and
    ``top_confused`` (the 10 most frequent wrong class pairs, unordered, by name).
    """
    i, j = np.asarray(i, np.int64), np.asarray(j, np.int64)
    sim = np.asarray(sim, np.float64)
    n_pairs = len(i)
    in_pair = np.zeros(num_images, bool)
    in_pair[i], in_pair[j] = True, True
    has_partner = np.zeros(num_images, bool)
    has_partner[i] = True
    out: dict = {
        "num_images": int(num_images),
        "num_pairs": int(n_pairs),
        "pairs_per_image": n_pairs / num_images if num_images else 0.0,
        "coverage": float(in_pair.mean()) if num_images else 0.0,
        "anchor_coverage": float(has_partner.mean()) if num_images else 0.0,
        "sim": {name: (float(np.quantile(sim, q)) if n_pairs else None) for name, q in QUANTILES.items()},
    }
    if labels is None:
        return out
    labels = np.asarray(labels, np.int64)
    known, correct = pair_correct(i, j, labels)
    names = list(classes or [])
    num_classes = max(len(names), int(labels.max()) + 1 if len(labels) else 0)
    names += [str(c) for c in range(len(names), num_classes)]
    a, b, ok = labels[i][known], labels[j][known], correct[known]
    out["labelled_pairs"] = int(known.sum())
    out["precision"] = float(ok.mean()) if len(ok) else None
    per_count = np.bincount(a, minlength=num_classes)
    per_ok = np.bincount(a[ok], minlength=num_classes)
    out["per_class"] = {names[c]: {"pairs": int(per_count[c]),
                                   "precision": float(per_ok[c] / per_count[c]) if per_count[c] else None}
                        for c in range(num_classes)}
    conf = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(conf, (a[~ok], b[~ok]), 1)
    out["confusion"] = conf.tolist()
    sym = np.triu(conf + conf.T, 1)
    r, c = np.nonzero(sym)
    order = np.lexsort((c, r, -sym[r, c]))[:TOP_CONFUSED]
    out["top_confused"] = [{"classes": [names[r[t]], names[c[t]]], "count": int(sym[r[t], c[t]])}
                           for t in order]
    return out


def shared_neighbours(idx: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """For every pair (i, j): how many entries of row i of ``idx`` (``[N, K]`` neighbour lists; -1 = none)
    also occur in row j. Labels play no part."""
    idx = np.asarray(idx)
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    out = np.empty(len(i), dtype=np.int64)
    for s in range(0, len(i), chunk):
        a, b = idx[i[s:s + chunk]], idx[j[s:s + chunk]]
        hit = (a[:, :, None] == b[:, None, :]).any(axis=2) & (a >= 0)
        out[s:s + chunk] = hit.sum(axis=1)
    return out


def neighbourhood_consistency(idx: np.ndarray, i, j) -> float | None:
    """A label-free quality signal of pairs: the mean fraction of shared neighbours of a pair's two images,
    ``|N(i) & N(j)| / K`` over the K-nearest-neighbour lists ``idx`` of the mining search. Pairs of one
    semantic region share much of their neighbourhood; a pair that only touches at one point does not.
    ``None`` without pairs."""
    if len(i) == 0:
        return None
    return float(shared_neighbours(idx, i, j).mean() / np.asarray(idx).shape[1])
