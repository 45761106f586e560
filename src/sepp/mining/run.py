"""The mining step end to end: embed -> search -> select -> pairs.npz + mining.json (+ figures)."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, fields, replace
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
from sepp.mining.stats import mining_stats, neighbourhood_consistency, pair_correct


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


# the settings that decide which pairs are kept, recorded in every pair file's meta (re-mining keeps them)
SELECTION = ("k", "threshold", "mutual", "rank_from", "pairs_per_image", "features")


@dataclass(frozen=True)
class MineSettings:
    """How to mine: pair selection (``SELECTION``), search, data loading and the DIAGNOSTIC oracle. Built from
    ``cfg.mine`` (:meth:`from_config`); re-mining replaces the selection by a pair file's (:meth:`with_meta`)."""
    k: int = 5
    threshold: float = 0.0
    mutual: bool = False
    rank_from: int = 1  # keep neighbours at ranks rank_from..k only (skipping the easiest)
    pairs_per_image: float = 0.0  # > 0: only the dataset's most similar top-k pairs, about this many per image
    features: str = "backbone"  # what the encoder embeds with (recorded; the caller builds the encoder)
    backend: str = "exact"
    chunk_size: int = 4096
    precision: str = "auto"
    batch_size: int = 512
    workers: int = 0  # DataLoader workers of the embedding pass (data.workers)
    save_embeddings: bool = False
    plots: bool = True
    oracle: str = "none"  # nearest | random: DIAGNOSTIC pairs from the labels (sepp.mining.oracle)
    oracle_precision: float = 1.0
    oracle_candidates: int = 50
    seed: int = 0

    @classmethod
    def from_config(cls, cfg, **changes) -> "MineSettings":
        """``cfg.mine`` with ``data.workers`` and ``seed``; ``changes`` replace fields."""
        m = cfg.mine
        names = {f.name for f in fields(cls)} - {"workers", "seed", "plots"}
        values = {name: m[name] for name in names}
        return cls(**{**values, "workers": max(0, int(cfg.data.workers)), "seed": int(cfg.seed), **changes})

    def with_meta(self, meta: dict, keep: tuple[str, ...] = ()) -> tuple["MineSettings", dict]:
        """These settings with the selection recorded in a pair file's ``meta`` (keys in ``keep`` and keys
        the meta lacks stay as they are); also returns ``{key: "pair file" | "config"}`` (where each came from)."""
        taken = {key: meta[key] for key in SELECTION if key not in keep and meta.get(key) is not None}
        source = {key: "pair file" if key in taken else "config" for key in SELECTION}
        return replace(self, **taken), source

    def record(self, precision: str) -> dict:
        """What a pair file and mining.json record of these settings (``precision`` as resolved)."""
        out = {"k": int(self.k), "threshold": float(self.threshold), "mutual": bool(self.mutual),
               "rank_from": int(self.rank_from), "pairs_per_image": float(self.pairs_per_image),
               "features": self.features, "backend": self.backend,
               "precision": precision if self.backend == "exact" else None, "oracle": self.oracle}
        if self.oracle != "none":
            out.update(oracle_precision=float(self.oracle_precision) if self.oracle == "random" else None,
                       oracle_candidates=int(self.oracle_candidates) if self.oracle == "nearest" else None,
                       seed=int(self.seed))
        return out


def mine_pairs(encoder: nn.Module, dataset, settings: MineSettings, *, device: str | torch.device,
               out_dir: str | os.PathLike, meta: dict) -> tuple[Pairs, dict]:
    """Mine semantic positive pairs of ``dataset`` (an IndexedDataset with the eval transform) with the
    frozen ``encoder`` (backbone, or backbone + projector, as ``settings.features`` says); returns
    ``(pairs, statistics)``.

    Writes to ``out_dir``: ``pairs.npz`` (``meta`` plus the settings, num_images, fingerprint, name, split,
    embedding_dim), ``mining.json`` (the statistics, with settings and timings), ``embeddings.npy`` when
    ``settings.save_embeddings``, ``pairs_gallery.png``, ``pairs.html`` (:mod:`sepp.mining.html`) and
    ``similarity_hist.png`` when ``settings.plots``. Labels are used only for the statistics and figures, and by
    the DIAGNOSTIC oracles (whose files say so first). Under torchrun every rank embeds and searches its share,
    rank 0 writes the files; all ranks return the pairs and statistics."""
    rank, world = D.get_rank(), D.get_world_size()
    device, out_dir = torch.device(device), Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    precision = resolve_precision(settings.precision, device)
    t0 = time.perf_counter()
    emb = embed(encoder, dataset, device, batch_size=settings.batch_size, rank=rank, world=world,
                out_path=out_dir / "embeddings.npy" if settings.save_embeddings else None, workers=settings.workers)
    t1 = time.perf_counter()
    i, j, s, idx = _select(emb, dataset, settings, device, precision, rank, world)
    t2 = time.perf_counter()
    labels, classes = getattr(dataset, "labels", None), getattr(dataset, "classes", None)
    stats = mining_stats(i, j, s, len(dataset), labels=labels, classes=classes)
    # the label-free quality signal: mean shared fraction of the pair's two top-k lists (None for random oracles)
    stats["consistency"] = None if idx is None else neighbourhood_consistency(idx, i, j)
    if settings.oracle != "none":
        stats = {"diagnostic": diagnostic_line(settings.oracle, settings.oracle_precision), **stats}
    stats["settings"] = {**settings.record(precision), "num_images": len(dataset),
                         "fingerprint": dataset.fingerprint(), "name": dataset.name, "split": dataset.split,
                         "embedding_dim": int(emb.shape[1])}
    stats["timings"] = {"embed_s": t1 - t0, "search_s": t2 - t1}
    pairs = Pairs(i, j, s, {**meta, **stats["settings"]})
    if rank == 0:
        save_pairs(out_dir / "pairs.npz", pairs)
        _write_json(out_dir / "mining.json", stats)
        if settings.plots:
            _plots(dataset, i, j, s, labels, classes, out_dir)
    if world > 1:
        D.barrier()  # files exist before any rank moves on to training
    return pairs, stats


def _select(emb, dataset, settings: MineSettings, device, precision: str, rank: int, world: int):
    """``(i, j, sim, idx)``: the kept neighbours of every image, or the DIAGNOSTIC oracle's pairs, and the
    search's top-k lists (None when there was no search)."""
    labels, k = getattr(dataset, "labels", None), settings.k
    if settings.oracle == "random":
        i, j = random_partners(labels, k, settings.oracle_precision, settings.seed)
        return i, j, np.einsum("nd,nd->n", np.asarray(emb[i]), np.asarray(emb[j])).astype(np.float32), None
    search_k = max(k, settings.oracle_candidates) if settings.oracle == "nearest" else k
    idx, sim = topk(emb, search_k, settings.backend, chunk_size=settings.chunk_size, device=device,
                    precision=precision, rank=rank, world=world)
    if settings.oracle == "nearest":
        return (*nearest_same_class(idx, sim, labels, k), idx[:, :k])
    return (*select_pairs(idx, sim, k, settings.threshold, settings.mutual, settings.rank_from,
                          settings.pairs_per_image), idx)


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
