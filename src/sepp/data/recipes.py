"""Augmentation recipes as plain data, shared by the torchvision (PIL/tensor) path and the batched
GPU path so both draw views from the same distribution.

Values follow the original papers / official repositories:
- MoCo-v2 (Chen et al. 2020, facebookresearch/moco ``--aug-plus``): crop 0.2-1, jitter 0.4/0.4/0.4/0.1 p=0.8,
  grayscale p=0.2, blur sigma 0.1-2 p=0.5, flip.
- SimSiam (Chen & He 2021, facebookresearch/simsiam): as MoCo-v2.
- SimCLR (Chen et al. 2020): crop 0.08-1, jitter 0.8*s with s=1 (0.8/0.8/0.8/0.2) p=0.8, grayscale p=0.2,
  blur p=0.5 on ImageNet only.
- BYOL (Grill et al. 2020), also NNCLR's (Dwibedi et al. 2021): asymmetric: view 1 blur p=1.0 solarize p=0;
  view 2 blur p=0.1 solarize p=0.2; jitter 0.4/0.4/0.2/0.1 p=0.8, grayscale p=0.2, crop 0.08-1.
CIFAR-size variants (images <= 64 px) drop Gaussian blur, as the SimCLR paper's CIFAR experiments and
solo-learn's CIFAR configs do, and use crop scale 0.08-1 for every method (as solo-learn does for CIFAR).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

# Per-dataset normalisation constants (CIFAR from the usual published values, STL-10/ImageNet use ImageNet's).
MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def mean_std(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return MEAN_STD.get(dataset, MEAN_STD["imagenet"])


@dataclass(frozen=True)
class ViewSpec:
    """Parameters of one view's random augmentation. Order of operations (as in the official recipes):
    random resized crop -> horizontal flip -> colour jitter (random order of b/c/s/h) -> grayscale ->
    Gaussian blur -> solarize -> to float -> normalize."""

    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # on the [0, 1] scale (128/255 in uint8 terms)
    mean: tuple[float, float, float] = MEAN_STD["imagenet"][0]
    std: tuple[float, float, float] = MEAN_STD["imagenet"][1]

    @property
    def blur_kernel(self) -> int:
        """Odd kernel of ~10 % of the image side, as in SimCLR/MoCo (23 px at 224)."""
        k = int(0.1 * self.size)
        return k + 1 if k % 2 == 0 else k


RECIPES = ("mocov2", "simsiam", "simclr", "byol", "nnclr")


def view_specs(recipe: str, size: int, dataset: str = "imagenet") -> tuple[ViewSpec, ViewSpec]:
    """The two view distributions of a method's recipe at a given image side."""
    mean, std = mean_std(dataset)
    small = size <= 64
    base = ViewSpec(size=size, mean=mean, std=std)
    if recipe in ("mocov2", "simsiam"):
        v = replace(base, crop_scale=(0.08, 1.0) if small else (0.2, 1.0), blur_p=0.0 if small else 0.5)
        return v, v
    if recipe == "simclr":
        v = replace(base, crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                    blur_p=0.0 if small else 0.5)
        return v, v
    if recipe in ("byol", "nnclr"):  # NNCLR trains with BYOL's augmentations (as its paper)
        v = replace(base, crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        v1 = replace(v, blur_p=0.0 if small else 1.0, solarize_p=0.0)
        v2 = replace(v, blur_p=0.0 if small else 0.1, solarize_p=0.2)
        return v1, v2
    raise ValueError(f"unknown augmentation recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
