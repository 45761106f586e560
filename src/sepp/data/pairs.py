"""Semantic positive pairs, the one type that carries them from mining to the sampler and into checkpoints.

``pairs.npz`` holds int64 arrays ``i`` (anchor) and ``j`` (partner), float32 ``sim`` (cosine similarity)
and ``meta``, a JSON string (dataset name, split, num_images, fingerprint, k, threshold, mutual, plus what
the caller adds: encoder checkpoint hash, feature type, ...). Pairs are directed: (i, j) says j is a
partner of anchor i. Mining writes the file (:func:`save_pairs`), the trainer reads it (:func:`load_pairs`),
checks it against the dataset (:func:`check_pairs_match`), hands the :class:`Pairs` to the sampler and
stores them in its checkpoints as tensors (:meth:`Pairs.to_state` / :meth:`Pairs.from_state`).
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from sepp.errors import SeppError
from sepp.fileio import atomic_write


@dataclass
class Pairs:
    """Directed pairs ``(i[n], j[n])`` with their similarity ``sim[n]`` (NaN where unknown) and ``meta``."""
    i: np.ndarray
    j: np.ndarray
    sim: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self):
        self.i = np.asarray(self.i, dtype=np.int64).reshape(-1)
        self.j = np.asarray(self.j, dtype=np.int64).reshape(-1)
        self.sim = (np.full(len(self.i), np.nan, np.float32) if self.sim is None
                    else np.asarray(self.sim, dtype=np.float32).reshape(-1))
        if not len(self.i) == len(self.j) == len(self.sim):
            raise ValueError(f"i, j, sim must be 1-D of equal length, got {self.i.shape}, {self.j.shape}, "
                             f"{self.sim.shape}")

    def __len__(self) -> int:
        return len(self.i)

    def to_state(self) -> dict:
        """Tensors and plain values only (what a ``weights_only`` checkpoint may hold)."""
        return {"i": torch.as_tensor(self.i), "j": torch.as_tensor(self.j), "sim": torch.as_tensor(self.sim),
                "meta": json.dumps(dict(self.meta), sort_keys=True, default=_json_scalar)}

    def digest(self, length: int = 16) -> str:
        """SHA-256 of the pairs and their meta (not of the file, whose zip headers carry a time): equal for
        equal pairs wherever and whenever they were written."""
        h = hashlib.sha256()
        for a in (self.i, self.j, self.sim):
            h.update(np.ascontiguousarray(a).tobytes())
        h.update(json.dumps(dict(self.meta), sort_keys=True, default=_json_scalar).encode())
        return h.hexdigest()[:length]

    @classmethod
    def from_state(cls, state: dict) -> "Pairs":
        meta = state["meta"]
        meta = json.loads(meta) if isinstance(meta, str) else dict(meta)
        return cls(np.asarray(state["i"]), np.asarray(state["j"]), np.asarray(state["sim"]), meta)


def _json_scalar(value):
    if isinstance(value, np.generic):  # numpy scalars in pair meta: store their Python value
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_pairs(path: str | os.PathLike, pairs: Pairs) -> None:
    """Write ``pairs.npz`` atomically (temp file in the same folder, then ``os.replace``)."""
    meta = np.array(json.dumps(dict(pairs.meta), sort_keys=True, default=_json_scalar))
    atomic_write(path, lambda f: np.savez(f, i=pairs.i, j=pairs.j, sim=pairs.sim, meta=meta))


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
