"""Augmentation recipes as plain data, shared by the torchvision (PIL/tensor) path and the batched
GPU path so both draw views from the same distribution.

A :class:`Recipe` is the size-free description of a method's two view distributions (each method class
carries its own as ``augmentation``, with the values of its paper; this layer knows no method).
:func:`view_specs` turns it into the two :class:`ViewSpec` of an image side: CIFAR-size images (<= 64 px)
drop Gaussian blur, as the SimCLR paper's CIFAR experiments and solo-learn's CIFAR configs do, and use crop
scale 0.08-1 whatever the recipe (as solo-learn does for CIFAR).
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


SMALL_IMAGE = 64  # sides up to this are "CIFAR-size": no blur, crop scale SMALL_CROP_SCALE
SMALL_CROP_SCALE = (0.08, 1.0)


@dataclass(frozen=True)
class Recipe:
    """A method's augmentation recipe: crop scale (at sides above ``SMALL_IMAGE``), colour-jitter strengths
    and, per view (view 1, view 2), the probabilities of Gaussian blur (at sides above ``SMALL_IMAGE``) and
    of solarisation. Everything else (flip, jitter and grayscale probabilities, blur sigma, ...) is
    :class:`ViewSpec`'s default."""

    crop_scale: tuple[float, float]
    brightness: float
    contrast: float
    saturation: float
    hue: float
    blur_p: tuple[float, float]
    solarize_p: tuple[float, float] = (0.0, 0.0)


def view_specs(recipe: Recipe, size: int, dataset: str = "imagenet") -> tuple[ViewSpec, ViewSpec]:
    """The two view distributions of ``recipe`` at image side ``size``, normalised with ``dataset``'s
    mean/std."""
    mean, std = mean_std(dataset)
    small = size <= SMALL_IMAGE
    base = ViewSpec(size=size, mean=mean, std=std, crop_scale=SMALL_CROP_SCALE if small else recipe.crop_scale,
                    brightness=recipe.brightness, contrast=recipe.contrast, saturation=recipe.saturation,
                    hue=recipe.hue)
    return tuple(replace(base, blur_p=0.0 if small else blur, solarize_p=solarize)  # type: ignore[return-value]
                 for blur, solarize in zip(recipe.blur_p, recipe.solarize_p))
