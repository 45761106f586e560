"""The one supervised training loop of evaluation and its pieces.

:func:`fit` trains a classifier on labelled batches: a head on precomputed features or on the features of a
frozen backbone (the linear probe's two forms, :mod:`sepp.eval.linear`), or a whole network (fine-tuning,
:mod:`sepp.eval.finetune`). Every step sets the rate given for it (:func:`sepp.methods.optim.lr_at`, the one
schedule, or a step decay), then takes one SGD step on the mean cross-entropy of the batch.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


def fit(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: Callable[[], torch.optim.Optimizer], batches: Batches, epochs: int, total: int,
        rate: Callable[[int], float], device: torch.device) -> tuple[list[float], int]:
    """Up to ``epochs`` passes over ``batches()`` (``(inputs, labels)`` on ``device``), stopping after
    ``total`` steps. A step computes ``loss_of(inputs, labels)`` (the batch's mean loss), sets every group of
    ``optimizer()`` (called after the loss, so a head may be built at its first batch) to ``rate(step)``
    (step counted from 0) and steps. Returns ``(mean training loss of each pass, steps taken)``."""
    losses, step = [], 0
    for _ in range(epochs):
        loss_sum, seen = torch.zeros((), device=device), 0
        for x, y in batches():
            loss = loss_of(x, y)
            opt = optimizer()
            for group in opt.param_groups:
                group["lr"] = rate(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * y.shape[0]
            seen += y.shape[0]
            step += 1
            if step >= total:
                break
        losses.append(loss_sum.item() / max(seen, 1))
        if step >= total:
            break
    return losses, step


def linear_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """A linear classifier initialised N(0, 0.01), bias 0 (as MoCo's and MAE's linear probes), drawn from
    ``generator``."""
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=generator) * 0.01)
        head.bias.zero_()
    return head


def shuffled_loader(data: Dataset, batch_size: int, generator: torch.Generator, workers: int, cuda: bool,
                    persistent_workers: bool = False) -> DataLoader:
    """Reshuffled batches of ``data`` drawn with ``generator``; the last, short batch is dropped when there is
    a full one (BatchNorm cannot train on a batch of one sample)."""
    return DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers, pin_memory=cuda,
                      generator=generator, drop_last=len(data) >= batch_size,
                      persistent_workers=persistent_workers)


def on_device(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of every batch of ``loader``, moved to ``device``."""
    for batch in loader:
        yield batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, labels: torch.Tensor,
             num_classes: int, device: torch.device, batch_size: int = 4096) -> dict[str, float | None]:
    """Top-1 and top-5 (None with fewer than 5 classes) accuracy in percent of ``model`` on features."""
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    for s in range(0, feats.shape[0], batch_size):
        logits = model(feats[s:s + batch_size].to(device, torch.float32))
        y = labels[s:s + batch_size].to(device)
        top = logits.topk(min(5, num_classes), dim=1).indices
        hits1 += (top[:, 0] == y).sum()
        hits5 += (top == y[:, None]).any(dim=1).sum()
    n = feats.shape[0]
    return {"top1": 100.0 * hits1.item() / n, "top5": 100.0 * hits5.item() / n if num_classes >= 5 else None}
