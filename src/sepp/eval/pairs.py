"""How close a model puts the semantic pairs: the cosine similarity of its features over the pairs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sepp.data.pairs import load_pairs
from sepp.eval.data import eval_data, features


def pair_cosine(backbone, cfg, pairs_path: Path, seed: int = 0) -> dict:
    """Mean cosine similarity of ``backbone``'s features (un-augmented training images) over the pairs in
    ``pairs_path``, and over as many random image pairs for reference."""
    pairs = load_pairs(pairs_path)
    if len(pairs) == 0:
        return {"pairs": None, "random": None}
    ds = eval_data(cfg, cfg.data.split, cfg.data.subset)
    f = F.normalize(features(backbone, ds, cfg, torch.device(cfg.device)).float(), dim=1)
    rng = np.random.default_rng(seed)
    ri, rj = rng.integers(0, len(ds), len(pairs)), rng.integers(0, len(ds), len(pairs))

    def cos(a, b) -> float:
        return float((f[torch.as_tensor(a)] * f[torch.as_tensor(b)]).sum(1).mean())

    return {"pairs": cos(pairs.i, pairs.j), "random": cos(ri, rj)}
