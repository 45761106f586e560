"""Pooled backbone features for a whole dataset, in dataset order."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sepp.errors import SeppError


def _batch_images(batch) -> torch.Tensor:
    # IndexedDataset items are (image, label, index); plain datasets may yield (image, label) or bare images.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def iter_features(backbone: nn.Module, data: Dataset | torch.Tensor, device: torch.device | str,
                  batch_size: int = 512, amp: bool = True,
                  normalize: Callable[[torch.Tensor], torch.Tensor] | None = None, workers: int = 0,
                  lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(first_row, float32 features [b, D] on device)`` for rows ``[lo, hi)`` of ``data`` in order.

    ``data`` is either a dataset whose items start with an eval-transformed image tensor (read through a
    DataLoader with ``workers`` processes), or a uint8 tensor [N, 3, H, W]; the tensor is sliced, scaled to
    [0, 1] and passed through ``normalize`` (e.g. ``torchvision.transforms.v2.Normalize(mean, std)``) on the
    device. The backbone runs in eval mode (its train/eval mode is restored afterwards); on CUDA inputs are
    channels_last and, with ``amp``, the forward runs under bf16 autocast. Shared by kNN/linear evaluation
    and by mining's embedding step.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    n = data.shape[0] if isinstance(data, torch.Tensor) else len(data)
    hi = n if hi is None else hi
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise SeppError(f"image tensor must be uint8 [N, 3, H, W], got {data.dtype} {list(data.shape)}; "
                            "pass uint8 images or a dataset")
        if normalize is None:
            raise SeppError("uint8 image tensor given without a normalize callable; pass "
                            "normalize=torchvision.transforms.v2.Normalize(mean, std)")
        batches = (data[s:min(s + batch_size, hi)] for s in range(lo, hi, batch_size))
    else:
        part = data if (lo, hi) == (0, n) else Subset(data, range(lo, hi))
        batches = (_batch_images(b) for b in DataLoader(part, batch_size=batch_size, shuffle=False,
                                                           num_workers=workers, pin_memory=cuda))
    was_training = backbone.training
    backbone.to(device).eval()
    start = lo
    try:
        for x in batches:
            x = x.to(device, non_blocking=True)
            if x.dtype == torch.uint8:
                x = normalize(x.float().div_(255))
            if cuda:
                # Only the input is made channels_last: converting the module in place could disturb a
                # training run (DDP gradient buckets) that calls this as its kNN monitor.
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and cuda):
                f = backbone(x)
            yield start, f.flatten(1).float()
            start += x.shape[0]
    finally:
        backbone.train(was_training)
    if start != hi:
        raise SeppError(f"feature extraction saw {start - lo} images but the data holds {hi - lo}; "
                        "the dataset's __len__ disagrees with what it yields")


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    data: Dataset | torch.Tensor,
    device: torch.device | str,
    batch_size: int = 512,
    amp: bool = True,
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    workers: int = 0,
) -> torch.Tensor:
    """Backbone features of every image, float32 [N, D] on the CPU, row i = image i (see ``iter_features``)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    out = None
    for start, f in iter_features(backbone, data, device, batch_size, amp, normalize, workers):
        if out is None:
            # Pinned host buffer + non_blocking copies: no device sync per batch.
            n = data.shape[0] if isinstance(data, torch.Tensor) else len(data)
            out = torch.empty(n, f.shape[1], dtype=torch.float32, pin_memory=cuda)
        out[start:start + f.shape[0]].copy_(f, non_blocking=cuda)
    if cuda:
        torch.cuda.synchronize(device)
    if out is None:
        raise SeppError("cannot extract features from an empty dataset; check the data split and subset")
    return out


def labels_of(data) -> torch.Tensor:
    """int64 labels of a dataset (its ``labels`` attribute) or of an ``(images, labels)`` pair."""
    labels = data[1] if isinstance(data, tuple) else getattr(data, "labels", None)
    if labels is None:
        raise SeppError(f"{getattr(data, 'name', 'dataset')} has no labels; kNN and linear evaluation need "
                        "a labelled split")
    return torch.as_tensor(np.asarray(labels), dtype=torch.int64)


def features_of(backbone: nn.Module, data, device, batch_size: int = 512, amp: bool = True,
                normalize: Callable | None = None, workers: int = 0) -> torch.Tensor:
    """Features of a dataset, or of the uint8 images of an ``(images, labels)`` pair (fast in-memory path)."""
    images = data[0] if isinstance(data, tuple) else data
    return extract_features(backbone, images, device, batch_size, amp, normalize, workers)
