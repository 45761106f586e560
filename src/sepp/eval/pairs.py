"""How close a model puts the semantic pairs: the cosine similarity of its features over the pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sepp.data.pairs import load_pairs
from sepp.eval.data import eval_data, features


def pair_cosine(backbone, cfg, pairs_path: Path, seed: int = 0, memo: dict | None = None,
                max_pairs: int = 200_000) -> dict:
    """Mean cosine similarity of ``backbone``'s features (un-augmented training images) over the pairs in
    ``pairs_path`` (a seeded sample of ``max_pairs`` when there are more), and over as many random image
    pairs for reference. ``memo``: see :func:`sepp.eval.data.features`."""
    pairs = load_pairs(pairs_path)
    if len(pairs) == 0:
        return {"pairs": None, "random": None}
    ds = eval_data(cfg, cfg.data.split, cfg.data.subset)
    f = F.normalize(features(backbone, ds, cfg, torch.device(cfg.device), memo).float(), dim=1)
    rng = np.random.default_rng(seed)
    pi, pj = pairs.i, pairs.j
    if len(pi) > max_pairs:  # e.g. diagnostic pair files with hundreds of partners per image
        keep = rng.choice(len(pi), max_pairs, replace=False)
        pi, pj = pi[keep], pj[keep]
    ri, rj = rng.integers(0, len(ds), len(pi)), rng.integers(0, len(ds), len(pi))

    def cos(a, b) -> float:
        return float((f[torch.as_tensor(a)] * f[torch.as_tensor(b)]).sum(1).mean())

    return {"pairs": cos(pi, pj), "random": cos(ri, rj)}
