"""Device-resident training loader: uint8 images live on the accelerator and are augmented there in batches.

Yields the same ``(x1, x2, ids1, ids2)`` batches (``views=3``: ``(x1, x2, ids1, ids2, x3, ids3)``) as the
DataLoader path (see docs/ARCHITECTURE.md), from the
same epoch plans (:mod:`sepp.data.sampling`), without worker processes or host-to-device image copies.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

from sepp.data.pairs import Pairs
from sepp.data.sampling import epoch_plan, shard
from sepp.errors import SeppError

Augment = Callable[..., torch.Tensor]  # (uint8 images [B, 3, H, W], generator=...) -> float views


def _generator_seed(seed: int, rank: int, epoch: int) -> int:
    # Mixed through SeedSequence so nearby (seed, rank, epoch) triples give unrelated streams.
    return int(np.random.SeedSequence([int(seed), int(rank), int(epoch), 0xA06]).generate_state(1, np.uint64)[0])


class DeviceLoader:
    """Batches of two augmented views per plan entry, computed on ``device``.

    ``images`` is the whole uint8 dataset ``[N, 3, H, W]`` (copied to ``device`` once); ``aug1``/``aug2`` are
    batched augmentations such as :class:`sepp.data.gpu_augment.BatchAugment`. Each process (``rank`` of
    ``world``) takes its shard of the shared epoch plan; ``pairs`` (a :class:`~sepp.data.pairs.Pairs` or
    ``(i, j)`` arrays) are semantic pairs for the plan.
    Random draws come from a generator on ``device`` seeded by ``(seed, rank, epoch)``, so an epoch's
    batches are reproducible.
    """

    def __init__(self, images: torch.Tensor, aug1: Augment, aug2: Augment, batch_size: int, seed: int,
                 device: torch.device | str, rank: int = 0, world: int = 1,
                 pairs: Pairs | tuple[np.ndarray, np.ndarray] | None = None, mode: str = "enlarge", p: float = 0.5,
                 views: int = 2):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise SeppError(f"device loader needs uint8 images [N, 3, H, W], got {images.dtype} "
                            f"{tuple(images.shape)}; use data.pipeline=loader for this dataset")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.aug1, self.aug2 = aug1, aug2
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.pairs, self.mode, self.p, self.views = pairs, mode, p, int(views)
        self.epoch = 0
        self.start_batch = 0
        self._plan_cache: tuple[int, tuple[np.ndarray, np.ndarray]] | None = None
        if len(self) == 0:
            raise SeppError(f"batch size {self.batch_size} leaves no full batch of {len(self.images)} images "
                            f"split over {self.world} process(es); lower the batch size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; ``start_batch`` > 0 resumes inside it (the skipped batches are not computed).
        ``len()`` stays the length of the whole epoch."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _plan(self) -> tuple[np.ndarray, ...]:
        """This process's share of the current epoch's plan (cached: __len__ and __iter__ both need it)."""
        if self._plan_cache is None or self._plan_cache[0] != self.epoch:
            plan = epoch_plan(len(self.images), self.epoch, self.seed, pairs=self.pairs, mode=self.mode,
                              p=self.p, views=self.views)
            self._plan_cache = (self.epoch, shard(*plan, rank=self.rank, world=self.world,
                                                  batch_size=self.batch_size))
        return self._plan_cache[1]

    def __len__(self) -> int:
        return len(self._plan()[0]) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        plan = self._plan()
        steps = len(plan[0]) // self.batch_size
        # One host-to-device copy per epoch; the batches below only slice it.
        ids = torch.from_numpy(np.stack(plan)).to(self.device)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(_generator_seed(self.seed, self.rank, self.epoch))
        for step in range(self.start_batch, steps):
            sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
            i1, i2 = ids[0, sl], ids[1, sl]
            batch = (self.aug1(self.images[i1], generator=gen), self.aug2(self.images[i2], generator=gen), i1, i2)
            if self.views == 3:  # the third view uses the second view's recipe
                batch += (self.aug2(self.images[ids[2, sl]], generator=gen), ids[2, sl])
            yield batch
