"""Selecting semantic positive pairs from k-NN results (the pairs themselves: :class:`sepp.data.pairs.Pairs`).

Pairs are directed: (i, j) says j is one of i's top-k neighbours above the threshold.
"""
from __future__ import annotations

import numpy as np

from sepp.mining.stats import shared_neighbours


def select_pairs(idx: np.ndarray, sim: np.ndarray, k: int, threshold: float, mutual: bool = False,
                 rank_from: int = 1, min_shared: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the neighbours at ranks ``rank_from..k`` (1-based; ``rank_from=1``: the first ``k``) of each row
    whose similarity is ``>= threshold``.

    ``idx``/``sim`` are ``[N, K]`` search results (rows sorted best first; idx -1 = no neighbour). A row's
    own index is never kept. ``k`` larger than K uses all K columns. With ``mutual`` a pair (i, j) is kept
    only if (j, i) is kept too. With ``min_shared`` > 0 a pair is kept only if the K-neighbour lists of
    rows i and j (all K search columns) share at least ``min_shared`` entries (shared-neighbour rule: both
    images sit in one dense region, not at the edge of two). Output is sorted by anchor i, then by rank.
    """
    idx, sim = np.asarray(idx), np.asarray(sim)
    if idx.shape != sim.shape or idx.ndim != 2:
        raise ValueError(f"idx {idx.shape} and sim {sim.shape} must be the same [N, K] shape")
    n, full_idx = idx.shape[0], idx
    idx, sim = idx[:, :max(0, int(k))], sim[:, :max(0, int(k))]
    rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], idx.shape)
    keep = (sim >= threshold) & (idx >= 0) & (idx != rows)
    keep[:, :max(0, int(rank_from) - 1)] = False
    i, j, s = rows[keep], idx[keep].astype(np.int64), sim[keep].astype(np.float32)
    if mutual and len(i):
        # Pair codes i * M + j; (i, j) survives when the reversed code was also kept.
        m = max(n, int(j.max()) + 1)
        keep = np.isin(j * m + i, i * m + j)
        i, j, s = i[keep], j[keep], s[keep]
    if min_shared > 0 and len(i):
        keep = shared_neighbours(full_idx, i, j) >= int(min_shared)
        i, j, s = i[keep], j[keep], s[keep]
    return i, j, s
