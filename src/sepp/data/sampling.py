"""Epoch plans: which two images make each training sample.

A plan is a pair of index arrays ``(ids1, ids2)``: sample ``s`` of the epoch is a view of image ``ids1[s]``
and a view of image ``ids2[s]``. Without semantic pairs ``ids1 == ids2`` (the usual two views of one image).
With semantic pairs ``(i, j)`` mined from a pretrained encoder:

- ``enlarge`` (default; our reading of Alkhalefi et al.): the epoch visits every self-pair ``(n, n)`` once and
  every semantic pair ``(i, j)`` once, shuffled, so an epoch has ``N + num_pairs`` samples and the semantic
  pairs act as extra positives next to the augmented pairs.
- ``substitute``: the epoch keeps ``N`` samples; the second image of anchor ``n`` is, with probability ``p``,
  a partner drawn uniformly from ``n``'s partners (anchors without partners keep their own image).
- ``multi``: the epoch keeps ``N`` samples, each anchor keeps both of its own views, and a third entry
  ``ids3`` names a partner drawn uniformly from its partners (anchors without partners: the image itself);
  the partner view is an extra positive in the same loss term instead of displacing a self-pair.

With ``views=3`` a plan has a third array ``ids3`` (``multi``: the partner; otherwise the anchor itself: three
views of one image, the extra-view control of the same compute).

Plans are a pure function of ``(seed, epoch)`` so that every process of a distributed job builds the same
plan and takes a disjoint shard of it; this is also what makes resumed runs repeat the exact sample order.
"""
from __future__ import annotations

import numpy as np

from sepp.data.pairs import Pairs

MODES = ("enlarge", "substitute", "multi")


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), 0x5E99])


def _draw_partners(anchors: np.ndarray, pi: np.ndarray, pj: np.ndarray, num_images: int, use: np.ndarray,
                   pick: np.ndarray) -> np.ndarray:
    """For each anchor where ``use`` (and it has partners), a partner chosen by ``pick`` in [0, 1) uniformly
    among its partners (CSR adjacency of the directed pairs); the anchor itself elsewhere."""
    order = np.argsort(pi, kind="stable")
    pi, pj = pi[order], pj[order]
    base = np.arange(num_images, dtype=np.int64)
    starts = np.searchsorted(pi, base, side="left")
    counts = np.searchsorted(pi, base, side="right") - starts
    c = counts[anchors]
    use = use & (c > 0)
    offset = np.minimum((pick * c).astype(np.int64), np.maximum(c - 1, 0))
    partners = anchors.copy()
    partners[use] = pj[starts[anchors[use]] + offset[use]]
    return partners


def epoch_plan(num_images: int, epoch: int, seed: int, pairs: Pairs | tuple | None = None, mode: str = "enlarge",
               p: float = 0.5, views: int = 2) -> tuple[np.ndarray, ...]:
    """The shuffled ``(ids1, ids2)`` (``views=3``: ``(ids1, ids2, ids3)``) int64 arrays of one epoch, the same
    on every process."""
    if mode not in MODES:
        raise ValueError(f"unknown pair mode {mode!r}; choose one of {', '.join(MODES)}")
    if views not in (2, 3):
        raise ValueError(f"views must be 2 or 3, got {views}")
    if mode == "multi" and pairs is not None and views != 3:
        raise ValueError("mode='multi' gives each anchor a third (partner) view: pass views=3")
    rng = _rng(seed, epoch)
    base = np.arange(num_images, dtype=np.int64)
    if isinstance(pairs, Pairs):
        pairs = (pairs.i, pairs.j)
    if pairs is None or len(pairs[0]) == 0:
        order = rng.permutation(num_images)
        return (base[order],) + tuple(base[order].copy() for _ in range(views - 1))
    pi = np.asarray(pairs[0], dtype=np.int64)
    pj = np.asarray(pairs[1], dtype=np.int64)
    if mode == "enlarge":
        ids1 = np.concatenate([base, pi])
        ids2 = np.concatenate([base, pj])
        order = rng.permutation(len(ids1))
        plan = (ids1[order], ids2[order])
    else:
        anchors = rng.permutation(num_images).astype(np.int64)
        draw = rng.random(num_images) < (1.0 if mode == "multi" else p)
        partners = _draw_partners(anchors, pi, pj, num_images, draw, rng.random(num_images))
        if mode == "multi":
            return anchors, anchors.copy(), partners
        plan = (anchors, partners)
    return plan if views == 2 else plan + (plan[0].copy(),)


def shard(*plan: np.ndarray, rank: int, world: int, batch_size: int,
          drop_last: bool = True) -> tuple[np.ndarray, ...]:
    """This process's part of a plan's arrays: strided, equal length on every rank, whole batches when
    ``drop_last``."""
    per_rank = len(plan[0]) // world
    if drop_last:
        per_rank = (per_rank // batch_size) * batch_size
    return tuple(ids[rank::world][:per_rank] for ids in plan)


def steps_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    """Optimizer steps of one epoch of ``num_samples`` plan entries (per-process batch, drop_last)."""
    return (num_samples // world) // batch_size
