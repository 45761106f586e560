"""Epoch plans: which two images make each training sample.

A plan is a pair of index arrays ``(ids1, ids2)``: sample ``s`` of the epoch is a view of image ``ids1[s]``
and a view of image ``ids2[s]``. Without semantic pairs ``ids1 == ids2`` (the usual two views of one image).
With semantic pairs ``(i, j)`` mined from a pretrained encoder:

- ``enlarge`` (default; our reading of Alkhalefi et al.): the epoch visits every self-pair ``(n, n)`` once and
  every semantic pair ``(i, j)`` once, shuffled, so an epoch has ``N + num_pairs`` samples and the semantic
  pairs act as extra positives next to the augmented pairs.
- ``substitute``: the epoch keeps ``N`` samples; the second image of anchor ``n`` is, with probability ``p``,
  a partner drawn uniformly from ``n``'s partners (anchors without partners keep their own image).

Plans are a pure function of ``(seed, epoch)`` so that every process of a distributed job builds the same
plan and takes a disjoint shard of it; this is also what makes resumed runs repeat the exact sample order.
"""
from __future__ import annotations

import numpy as np

MODES = ("enlarge", "substitute")


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), 0x5E99])


def epoch_plan(num_images: int, epoch: int, seed: int, pairs=None, mode: str = "enlarge",
               p: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """The shuffled ``(ids1, ids2)`` int64 arrays of one epoch (same on every process)."""
    if mode not in MODES:
        raise ValueError(f"unknown pair mode {mode!r}; choose one of {', '.join(MODES)}")
    rng = _rng(seed, epoch)
    base = np.arange(num_images, dtype=np.int64)
    if pairs is None or len(pairs[0]) == 0:
        order = rng.permutation(num_images)
        return base[order], base[order].copy()
    pi = np.asarray(pairs[0], dtype=np.int64)
    pj = np.asarray(pairs[1], dtype=np.int64)
    if mode == "enlarge":
        ids1 = np.concatenate([base, pi])
        ids2 = np.concatenate([base, pj])
        order = rng.permutation(len(ids1))
        return ids1[order], ids2[order]
    # substitute: CSR adjacency of the directed pairs, then one uniform partner per anchor where drawn.
    order = np.argsort(pi, kind="stable")
    pi, pj = pi[order], pj[order]
    starts = np.searchsorted(pi, base, side="left")
    counts = np.searchsorted(pi, base, side="right") - starts
    anchors = rng.permutation(num_images).astype(np.int64)
    draw = rng.random(num_images) < p
    pick = rng.random(num_images)
    c = counts[anchors]
    use = draw & (c > 0)
    offset = np.minimum((pick * c).astype(np.int64), np.maximum(c - 1, 0))
    partners = anchors.copy()
    partners[use] = pj[starts[anchors[use]] + offset[use]]
    return anchors, partners


def shard(ids1: np.ndarray, ids2: np.ndarray, rank: int, world: int, batch_size: int,
          drop_last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """This process's part of a plan: strided, equal length on every rank, whole batches when ``drop_last``."""
    per_rank = len(ids1) // world
    if drop_last:
        per_rank = (per_rank // batch_size) * batch_size
    return ids1[rank::world][:per_rank], ids2[rank::world][:per_rank]


def steps_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    """Optimizer steps of one epoch of ``num_samples`` plan entries (per-process batch, drop_last)."""
    return (num_samples // world) // batch_size
