"""Semantic positive pairs: selection from k-NN results, and the ``pairs.npz`` file format.

``pairs.npz`` holds int64 arrays ``i`` (anchor) and ``j`` (partner), float32 ``sim`` (cosine similarity)
and ``meta``, a JSON string (dataset name, split, num_images, fingerprint, k, threshold, mutual, plus what
the caller adds: encoder checkpoint hash, feature type, ...). Pairs are directed: (i, j) says j is one of
i's top-k neighbours above the threshold.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sepp.errors import SeppError
from sepp.fileio import atomic_write


@dataclass
class Pairs:
    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray
    meta: dict = field(default_factory=dict)
    path: str | None = None

    def __len__(self) -> int:
        return len(self.i)


def select_pairs(idx: np.ndarray, sim: np.ndarray, k: int, threshold: float, mutual: bool = False,
                 rank_from: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keep the neighbours at ranks ``rank_from..k`` (1-based; ``rank_from=1``: the first ``k``) of each row
    whose similarity is ``>= threshold``.

    ``idx``/``sim`` are ``[N, K]`` search results (rows sorted best first; idx -1 = no neighbour). A row's
    own index is never kept. ``k`` larger than K uses all K columns. With ``mutual`` a pair (i, j) is kept
    only if (j, i) is kept too. Output is sorted by anchor i, then by neighbour rank.
    """
    idx, sim = np.asarray(idx), np.asarray(sim)
    if idx.shape != sim.shape or idx.ndim != 2:
        raise ValueError(f"idx {idx.shape} and sim {sim.shape} must be the same [N, K] shape")
    n = idx.shape[0]
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
    return i, j, s


def save_pairs(path: str | os.PathLike, i, j, sim, meta: dict) -> None:
    """Write ``pairs.npz`` atomically (temp file in the same folder, then ``os.replace``)."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    sim = np.asarray(sim, dtype=np.float32)
    if not (i.ndim == j.ndim == sim.ndim == 1 and len(i) == len(j) == len(sim)):
        raise ValueError(f"i, j, sim must be 1-D of equal length, got {i.shape}, {j.shape}, {sim.shape}")
    atomic_write(path, lambda f: np.savez(f, i=i, j=j, sim=sim, meta=np.array(json.dumps(meta, sort_keys=True))))


def load_pairs(path: str | os.PathLike) -> Pairs:
    """Read a pair file written by ``save_pairs``."""
    path = Path(path)
    if not path.is_file():
        raise SeppError(f"pair file {path} not found; run `sepp mine` first or fix the path")
    try:
        with np.load(path, allow_pickle=False) as z:
            i, j, sim = z["i"], z["j"], z["sim"]
            meta = json.loads(str(z["meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise SeppError(f"pair file {path} is unreadable or corrupt ({type(e).__name__}: {e}); "
                        "re-run `sepp mine`") from None
    if not (i.ndim == j.ndim == sim.ndim == 1 and len(i) == len(j) == len(sim)
            and np.issubdtype(i.dtype, np.integer) and np.issubdtype(j.dtype, np.integer)
            and isinstance(meta, dict)):
        raise SeppError(f"pair file {path} has malformed arrays (i {i.shape} {i.dtype}, j {j.shape} "
                        f"{j.dtype}, sim {sim.shape}); re-run `sepp mine`")
    return Pairs(i.astype(np.int64), j.astype(np.int64), sim.astype(np.float32), meta, str(path))


def check_pairs_match(pairs: Pairs, *, name: str, split: str, num_images: int, fingerprint: str) -> None:
    """Raise if ``pairs`` were mined on a different dataset, split, subset size or image content."""
    want = {"name": name, "split": split, "num_images": int(num_images), "fingerprint": fingerprint}
    diffs = [f"{key} {pairs.meta.get(key)!r} != {val!r}" for key, val in want.items()
             if pairs.meta.get(key) != val]
    where = pairs.path or "pair file"
    if diffs:
        raise SeppError(f"{where} does not match the dataset (pairs vs data: {'; '.join(diffs)}); "
                        f"re-run `sepp mine` for this dataset/subset")
    if len(pairs) and (min(pairs.i.min(), pairs.j.min()) < 0
                       or max(pairs.i.max(), pairs.j.max()) >= num_images):
        raise SeppError(f"{where} has image indices outside [0, {num_images}); "
                        "re-run `sepp mine` for this dataset/subset")
