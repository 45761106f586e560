"""DIAGNOSTIC pair sources built from the labels (``mine.oracle``): upper bounds on what mining could give.

Never a default and never a mining result: they answer "would correct pairs help, and how correct must
mined pairs be?". Every file made from them records ``oracle`` in its meta and leads with a ``diagnostic``
line (:func:`diagnostic_line`).

- ``nearest``: each image's first ``k`` same-class neighbours among its ``candidates`` nearest by the encoder
  (what perfect mining with this encoder would return: correct, but already close for the encoder).
- ``random``: ``k`` partners per image, each with probability ``precision`` a uniformly drawn other image of
  the same class and otherwise one of another class (correct pairs that carry new information, and a
  dial for the precision-gain curve).
"""
from __future__ import annotations

import numpy as np

from sepp.errors import SeppError

ORACLES = ("nearest", "random")


def diagnostic_line(oracle: str, precision: float | None = None) -> str:
    """The sentence every output made from oracle pairs starts with."""
    what = "nearest same-class neighbours by the encoder" if oracle == "nearest" else (
        f"random partners, same class with probability {precision:g}")
    return f"DIAGNOSTIC: pairs built from the labels (mine.oracle={oracle}: {what}), not mined"


def _labels(labels) -> np.ndarray:
    if labels is None or (np.asarray(labels) < 0).all():
        raise SeppError("mine.oracle needs a labelled training split (it builds pairs from the labels); "
                        "use mine.oracle=none for unlabelled data")
    return np.asarray(labels, dtype=np.int64)


def nearest_same_class(idx: np.ndarray, sim: np.ndarray, labels, k: int) -> tuple[np.ndarray, ...]:
    """Pairs (i, j, sim): the first ``k`` neighbours of each row of the search result ``idx``/``sim``
    ``[N, K]`` (best first) that share row i's label. Rows with fewer same-class candidates keep fewer."""
    labels = _labels(labels)
    idx, sim = np.asarray(idx), np.asarray(sim)
    n = idx.shape[0]
    rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)
    same = (idx >= 0) & (idx != rows) & (labels[np.clip(idx, 0, None)] == labels[rows]) & (labels[rows] >= 0)
    rank = np.cumsum(same, axis=1)
    keep = same & (rank <= k)
    return rows[keep].astype(np.int64), idx[keep].astype(np.int64), sim[keep].astype(np.float32)


def random_partners(labels, k: int, precision: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j): ``k`` partners per labelled image; each is, with probability ``precision``, a uniform
    draw among the other images of i's class, else a uniform draw among the images of other classes."""
    labels = _labels(labels)
    rng = np.random.default_rng([int(seed), 0x0AC1E])
    anchors = np.repeat(np.flatnonzero(labels >= 0), k)
    members = {c: np.flatnonzero(labels == c) for c in np.unique(labels[labels >= 0])}
    if min(len(m) for m in members.values()) < 2 or len(members) < 2:
        raise SeppError("mine.oracle=random needs at least two classes with two or more images each")
    correct = rng.random(len(anchors)) < precision
    partners = np.empty_like(anchors)
    for c, m in members.items():
        others = np.flatnonzero((labels >= 0) & (labels != c))
        here = labels[anchors] == c
        same = here & correct
        # a same-class draw that is not the anchor itself: a draw among the other len(m) - 1 members
        pos = np.searchsorted(m, anchors[same])
        draw = rng.integers(0, len(m) - 1, same.sum())
        partners[same] = m[draw + (draw >= pos)]
        diff = here & ~correct
        partners[diff] = others[rng.integers(0, len(others), diff.sum())]
    return anchors.astype(np.int64), partners.astype(np.int64)
