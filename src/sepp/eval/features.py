"""Pooled backbone features for a whole dataset, in dataset order."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sepp.errors import SeppError


def _batch_images(batch) -> torch.Tensor:
    # IndexedDataset items are (image, label, index); plain datasets may yield (image, label) or bare images.
    return batch[0] if isinstance(batch, (tuple, list)) else batch


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
    """Backbone features of every image, float32 [N, D] on the CPU, row i = image i.

    ``data`` is either a dataset whose items start with an eval-transformed image tensor (read through a
    DataLoader with ``workers`` processes), or a uint8 tensor [N, 3, H, W]; the tensor is sliced, scaled to
    [0, 1] and passed through ``normalize`` (e.g. ``torchvision.transforms.v2.Normalize(mean, std)``) on the
    device. The backbone is moved to ``device`` and run in eval mode (its train/eval mode is restored
    afterwards); on CUDA inputs are channels_last and, with ``amp``, the forward runs under bf16 autocast.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"
    if isinstance(data, torch.Tensor):
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise SeppError(f"image tensor must be uint8 [N, 3, H, W], got {data.dtype} {list(data.shape)}; "
                            "pass uint8 images or a dataset")
        if normalize is None:
            raise SeppError("uint8 image tensor given without a normalize callable; pass "
                            "normalize=torchvision.transforms.v2.Normalize(mean, std)")
        n = data.shape[0]
        batches = (data[s:s + batch_size] for s in range(0, n, batch_size))
    else:
        n = len(data)
        batches = (_batch_images(b) for b in DataLoader(data, batch_size=batch_size, shuffle=False,
                                                           num_workers=workers, pin_memory=cuda))
    was_training = backbone.training
    backbone.to(device).eval()
    out = None
    start = 0
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
            f = f.flatten(1).float()
            if out is None:
                # Pinned host buffer + non_blocking copies: no device sync per batch.
                out = torch.empty(n, f.shape[1], dtype=torch.float32, pin_memory=cuda)
            out[start:start + f.shape[0]].copy_(f, non_blocking=cuda)
            start += f.shape[0]
    finally:
        backbone.train(was_training)
    if cuda:
        torch.cuda.synchronize(device)
    if out is None:
        raise SeppError("cannot extract features from an empty dataset; check the data split and subset")
    if start != n:
        raise SeppError(f"feature extraction saw {start} images but the data holds {n}; "
                        "the dataset's __len__ disagrees with what it yields")
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
