"""torchvision v2 pipelines built from :class:`sepp.data.recipes.ViewSpec` (the DataLoader path).

Crop, flip, colour jitter and grayscale run on the PIL image: on CPU, PIL is one to two orders of magnitude
faster than torchvision's tensor kernels for these (hue jitter above all), and it is what the official
MoCo/SimSiam/SimCLR code uses. Blur and solarize follow on the uint8 tensor (torchvision blurs PIL images by
converting them to tensors anyway).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from sepp.data.recipes import ViewSpec, mean_std


def view_transform(spec: ViewSpec) -> v2.Compose:
    """One random view: PIL image (or uint8 tensor) in, normalised float32 ``[3, size, size]`` out."""
    ops = [
        v2.RandomResizedCrop(spec.size, scale=spec.crop_scale, ratio=spec.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(p=spec.flip_p),
        v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)],
                       p=spec.jitter_p),
        v2.RandomGrayscale(p=spec.gray_p),
        v2.ToImage(),
    ]
    if spec.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)], p=spec.blur_p))
    if spec.solarize_p > 0:
        # The threshold is given on the [0, 1] scale; the image is still uint8 here (>= 127.5 is >= 128).
        ops.append(v2.RandomSolarize(threshold=spec.solarize_threshold * 255.0, p=spec.solarize_p))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(spec.mean, spec.std)]
    return v2.Compose(ops)


def eval_transform(size: int, dataset_name: str) -> v2.Compose:
    """Deterministic evaluation view: small images as they are, large ones resized by 256/224 and
    centre-cropped (the standard ImageNet protocol)."""
    mean, std = mean_std(dataset_name)
    if size <= 96:
        # Resize and crop leave an image that already has this size untouched (torchvision returns it as is),
        # so CIFAR/STL at their native size are only converted and normalised.
        geometry = [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    else:
        geometry = [v2.Resize(round(size * 256 / 224), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([v2.ToImage(), *geometry, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def linear_train_transform(size: int, dataset_name: str) -> v2.Compose:
    """Training view of the standard linear-evaluation protocol (MoCo/SimSiam ``main_lincls.py``): random
    resized crop and horizontal flip, nothing else."""
    mean, std = mean_std(dataset_name)
    return v2.Compose([v2.ToImage(), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


def uint8_normalizer(mean, std) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] float ``[B, 3, H, W]`` -> normalised, on the batch's device: the normalisation of uint8
    tensor-resident images (``sepp.models.features.iter_features`` scales them to [0, 1] first)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - m.to(x.device)) / s.to(x.device)

    return normalize
