"""The mining step end to end: embed -> search -> select -> pairs.npz + mining.json (+ figures)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sepp import distributed as D
from sepp.fileio import atomic_write
from sepp.mining.embed import embed
from sepp.mining.oracle import diagnostic_line, nearest_same_class, random_partners
from sepp.data.pairs import Pairs, save_pairs
from sepp.mining.html import pairs_page
from sepp.mining.pairs import select_pairs
from sepp.mining.plots import pairs_gallery, similarity_hist
from sepp.mining.search import resolve_precision, topk
from sepp.mining.stats import mining_stats, pair_correct


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def mine_pairs(encoder: nn.Module, dataset, *, k: int, threshold: float, mutual: bool, backend: str,
               chunk_size: int, precision: str, batch_size: int, device: str | torch.device,
               out_dir: str | os.PathLike, meta: dict, save_embeddings: bool = False, plots: bool = True,
               workers: int = 0, nlist: int | None = None, nprobe: int | None = None, rank_from: int = 1,
               oracle: str = "none", oracle_precision: float = 1.0, oracle_candidates: int = 50,
               seed: int = 0) -> dict:
    """Mine semantic positive pairs of ``dataset`` (an IndexedDataset with the eval transform) with the
    frozen ``encoder`` (backbone, or backbone + projector, as ``mine.features`` says).

    Writes to ``out_dir``: ``pairs.npz`` (``meta`` plus k, threshold, mutual, num_images, fingerprint, name,
    split, backend, precision), ``mining.json`` (the statistics, with settings and timings),
    ``embeddings.npy`` when ``save_embeddings``, ``pairs_gallery.png``, ``pairs.html``
    (:mod:`sepp.mining.html`) and ``similarity_hist.png`` when ``plots``. Labels are used only for the statistics
    and figures. Under torchrun every rank embeds and searches its share, rank 0 writes the files; all ranks
    return the statistics.

    ``rank_from`` keeps neighbours at ranks ``rank_from..k`` only (skipping the easiest). ``oracle``
    ("nearest" | "random", see :mod:`sepp.mining.oracle`) builds DIAGNOSTIC pairs from the labels instead
    (threshold, mutual and rank_from do not apply); their files say so first.
    """
    rank, world = D.get_rank(), D.get_world_size()
    device = torch.device(device)
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(precision, device)
    n = len(dataset)

    t0 = time.perf_counter()
    emb = embed(encoder, dataset, device, batch_size=batch_size,
                out_path=out_dir / "embeddings.npy" if save_embeddings else None,
                rank=rank, world=world, workers=workers)
    t1 = time.perf_counter()
    labels = getattr(dataset, "labels", None)
    classes = getattr(dataset, "classes", None)
    if oracle == "random":
        i, j = random_partners(labels, k, oracle_precision, seed)
        s = np.einsum("nd,nd->n", np.asarray(emb[i]), np.asarray(emb[j])).astype(np.float32)
    else:
        search_k = max(k, oracle_candidates) if oracle == "nearest" else k
        idx, sim = topk(emb, search_k, backend, chunk_size=chunk_size, device=device, precision=precision,
                        nlist=nlist, nprobe=nprobe, rank=rank, world=world)
        i, j, s = (nearest_same_class(idx, sim, labels, k) if oracle == "nearest"
                   else select_pairs(idx, sim, k, threshold, mutual, rank_from))
    t2 = time.perf_counter()

    stats = mining_stats(i, j, s, n, labels=labels, classes=classes)
    settings = {"k": int(k), "threshold": float(threshold), "mutual": bool(mutual), "rank_from": int(rank_from),
                "num_images": n, "fingerprint": dataset.fingerprint(), "name": dataset.name,
                "split": dataset.split, "backend": backend, "precision": precision if backend == "exact" else None,
                "embedding_dim": int(emb.shape[1]), "oracle": oracle}
    if oracle != "none":
        settings.update(oracle_precision=float(oracle_precision) if oracle == "random" else None,
                        oracle_candidates=int(oracle_candidates) if oracle == "nearest" else None,
                        seed=int(seed))
        stats = {"diagnostic": diagnostic_line(oracle, oracle_precision), **stats}
    stats["settings"] = settings
    stats["timings"] = {"embed_s": t1 - t0, "search_s": t2 - t1}

    if rank == 0:
        save_pairs(out_dir / "pairs.npz", Pairs(i, j, s, {**meta, **settings}))
        _write_json(out_dir / "mining.json", stats)
        if plots:
            _plots(dataset, i, j, s, labels, classes, out_dir)
    if world > 1:
        D.barrier()  # files exist before any rank moves on to training
    return stats


def _plots(dataset, i, j, s, labels, classes, out_dir: Path) -> None:
    def get_image(t: int) -> np.ndarray:
        return np.asarray(dataset.load_image(t).convert("RGB"))

    pairs_gallery(get_image, i, j, s, out_dir / "pairs_gallery.png", labels=labels, classes=classes)
    pairs_page(dataset.load_image, i, j, s, out_dir / "pairs.html", len(dataset), labels=labels, classes=classes,
               names=getattr(dataset, "paths", None))
    known, correct = pair_correct(i, j, labels)
    if known.any():
        similarity_hist(s[known], out_dir / "similarity_hist.png", correct=correct[known])
    else:
        similarity_hist(s, out_dir / "similarity_hist.png")
