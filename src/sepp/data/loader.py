"""The DataLoader path: epoch plans of image pairs, two views per pair, decoded and augmented in workers.

Used for ImageFolder data (and optionally for the in-memory sets). Yields the batch contract
``(x1, x2, ids1, ids2)`` (``views=3``: ``(x1, x2, ids1, ids2, x3, ids3)``): float32 view batches and the int64
dataset indices each view was drawn from.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sepp.data.datasets import IndexedDataset
from sepp.data.pairs import Pairs
from sepp.data.sampling import epoch_plan, shard


class PlanSampler(Sampler):
    """This process's shard of ``sepp.data.sampling.epoch_plan`` as ``(a, b)`` (``views=3``: ``(a, b, c)``)
    index tuples.

    Call :meth:`set_epoch` before each epoch: the plan is a function of ``(seed, epoch)`` only, so every
    process agrees on it and a resumed run repeats the same order."""

    def __init__(self, num_images: int, seed: int, batch_size: int, rank: int = 0, world: int = 1,
                 pairs: Pairs | tuple[np.ndarray, np.ndarray] | None = None, mode: str = "enlarge", p: float = 0.5,
                 views: int = 2):
        super().__init__()
        self.views = int(views)
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.rank, self.world = int(rank), int(world)
        self.pairs = pairs
        self.mode = mode
        self.p = float(p)
        self.epoch = 0
        self.start = 0
        self._len_epoch: int | None = None
        self._len = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` > 0 resumes inside it without loading the skipped images.
        ``len()`` stays the length of the whole epoch."""
        self.epoch = int(epoch)
        self.start = int(start_batch) * self.batch_size

    def plan(self) -> tuple[np.ndarray, ...]:
        """``(ids1, ids2)`` (``views=3``: ``(ids1, ids2, ids3)``) of this process for the current epoch."""
        plan = epoch_plan(self.num_images, self.epoch, self.seed, self.pairs, self.mode, self.p, self.views)
        return shard(*plan, rank=self.rank, world=self.world, batch_size=self.batch_size)

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return iter(zip(*(ids[self.start:].tolist() for ids in self.plan())))

    def __len__(self) -> int:
        # Built rather than derived from N and the pairs so it can never disagree with the plan itself.
        if self._len_epoch != self.epoch:
            self._len, self._len_epoch = len(self.plan()[0]), self.epoch
        return self._len


class TwoViewDataset(Dataset):
    """``ds[(a, b)] -> (t1(image a), t2(image b), a, b)``; ``ds[(a, b, c)]`` adds ``t2(image c), c``."""

    def __init__(self, base: IndexedDataset, t1: Callable, t2: Callable):
        self.base = base
        self.t1, self.t2 = t1, t2

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, abc: tuple[int, ...]):
        ids = [int(x) for x in abc]
        decoded: dict[int, object] = {}  # one decode per distinct image (the usual self-pair decodes once)
        for i in ids:
            if i not in decoded:
                decoded[i] = self.base.load_image(i)
        imgs = [decoded[i] for i in ids]
        out = (self.t1(imgs[0]), self.t2(imgs[1]), ids[0], ids[1])
        if len(ids) == 3:
            out += (self.t2(imgs[2]), ids[2])
        return out


def build_loader(dataset: IndexedDataset, t1: Callable, t2: Callable, batch_size: int, workers: int, seed: int,
                 rank: int = 0, world: int = 1, pairs: Pairs | tuple[np.ndarray, np.ndarray] | None = None,
                 mode: str = "enlarge", p: float = 0.5, views: int = 2) -> DataLoader:
    """Training loader yielding ``(x1, x2, ids1, ids2[, x3, ids3])``; call ``loader.sampler.set_epoch(e)`` each
    epoch."""
    sampler = PlanSampler(len(dataset), seed, batch_size, rank, world, pairs, mode, p, views)
    # Worker RNGs derive from this generator: distinct per rank so processes don't draw identical crops.
    generator = torch.Generator().manual_seed((int(seed) * 1000 + int(rank)) % 2**63)
    return DataLoader(
        TwoViewDataset(dataset, t1, t2), batch_size=batch_size, sampler=sampler, drop_last=True,
        num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
        generator=generator,
    )


def eval_loader(dataset: IndexedDataset, batch_size: int, workers: int) -> DataLoader:
    """Loader over ``dataset`` in order yielding ``(x, labels, ids)`` (for feature extraction)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=workers,
                      pin_memory=torch.cuda.is_available())
