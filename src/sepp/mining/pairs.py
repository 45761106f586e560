"""Selecting semantic positive pairs from k-NN results (the pairs themselves: :class:`sepp.data.pairs.Pairs`).

Pairs are directed: (i, j) says j is one of i's top-k neighbours above the threshold.
"""
from __future__ import annotations

import numpy as np


def select_pairs(idx: np.ndarray, sim: np.ndarray, k: int, threshold: float, mutual: bool = False,
                 rank_from: int = 1, per_image: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the neighbours at ranks ``rank_from..k`` (1-based; ``rank_from=1``: the first ``k``) of each row
    whose similarity is ``>= threshold``.

    ``idx``/``sim`` are ``[N, K]`` search results (rows sorted best first; idx -1 = no neighbour). A row's
    own index is never kept. ``k`` larger than K uses all K columns. With ``mutual`` a pair (i, j) is kept
    only if (j, i) is kept too. With ``per_image`` > 0 the threshold is raised to the similarity of the
    ``round(per_image * N)``-th most similar neighbour at ranks ``rank_from..k`` (ties kept): the most
    similar pairs of the whole dataset, about ``per_image`` per image, wherever they are
    (:func:`per_image_threshold`).
    Output is sorted by anchor i, then by rank.
    """
    idx, sim = np.asarray(idx), np.asarray(sim)
    if idx.shape != sim.shape or idx.ndim != 2:
        raise ValueError(f"idx {idx.shape} and sim {sim.shape} must be the same [N, K] shape")
    n = idx.shape[0]
    idx, sim = idx[:, :max(0, int(k))], sim[:, :max(0, int(k))]
    rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], idx.shape)
    keep = (idx >= 0) & (idx != rows)
    keep[:, :max(0, int(rank_from) - 1)] = False
    keep &= sim >= max(threshold, per_image_threshold(sim[keep], n, per_image))
    i, j, s = rows[keep], idx[keep].astype(np.int64), sim[keep].astype(np.float32)
    if mutual and len(i):
        # Pair codes i * M + j; (i, j) survives when the reversed code was also kept.
        m = max(n, int(j.max()) + 1)
        keep = np.isin(j * m + i, i * m + j)
        i, j, s = i[keep], j[keep], s[keep]
    return i, j, s


def per_image_threshold(candidates: np.ndarray, n: int, per_image: float) -> float:
    """The similarity of the ``round(per_image * n)``-th largest of ``candidates`` (-inf when ``per_image``
    is 0 or asks for at least all of them): a label-free threshold that keeps about ``per_image`` pairs per
    image over a dataset of ``n`` images, the dataset's most similar pairs first."""
    count = int(round(per_image * n))
    if per_image <= 0 or count >= len(candidates):
        return -np.inf
    if count <= 0:
        return np.inf
    return float(np.partition(np.asarray(candidates).ravel(), len(candidates) - count)[len(candidates) - count])
