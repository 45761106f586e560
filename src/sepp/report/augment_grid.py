"""Side-by-side views from the two augmentation paths, so a person can check they look alike.

One row per image: the original, then views from the torchvision v2 pipeline
(:func:`sepp.data.transforms.view_transform`, the DataLoader path) and views from
:class:`sepp.data.gpu_augment.BatchAugment` (the device path). View columns alternate the recipe's view 1
and view 2 distributions.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sepp.data.gpu_augment import BatchAugment
from sepp.data.recipes import ViewSpec
from sepp.data.transforms import view_transform
from sepp.errors import SeppError


def _to_display(x: torch.Tensor, spec: ViewSpec) -> np.ndarray:
    """Normalised float ``[3, H, W]`` -> ``[H, W, 3]`` in [0, 1]."""
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)
    return (x.detach().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _views(images: torch.Tensor, specs: list[ViewSpec], seed: int) -> tuple[list[list[np.ndarray]], ...]:
    """``views[path][image][column]`` for the torchvision and the batched path."""
    tv: list[list[np.ndarray]] = [[] for _ in images]
    batched: list[list[np.ndarray]] = [[] for _ in images]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator; leave it as it was
        torch.manual_seed(seed)
        for spec in specs:
            tf = view_transform(spec)
            out = BatchAugment(spec)(images, generator=gen)
            for i, img in enumerate(images):
                tv[i].append(_to_display(tf(img), spec))
                batched[i].append(_to_display(out[i], spec))
    return tv, batched


def save_augment_grid(images_uint8: torch.Tensor, spec1: ViewSpec, spec2: ViewSpec, path: str | Path,
                      views: int = 6, seed: int = 0) -> Path:
    """Write a PNG grid: per image, the original, ``views`` torchvision views, ``views`` batched views."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise SeppError(f"augment grid needs uint8 images [n, 3, H, W], got {images_uint8.dtype} "
                        f"{tuple(images_uint8.shape)}; pass the dataset's uint8 images")
    if views < 1 or len(images_uint8) == 0:
        raise SeppError("augment grid needs at least one image and one view; raise the image or view count")
    images = images_uint8.cpu()
    specs = [spec1 if k % 2 == 0 else spec2 for k in range(views)]
    tv, batched = _views(images, specs, seed)

    n, cols = len(images), 1 + 2 * views
    fig = Figure(figsize=(1.3 * cols, 1.4 * n + 0.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    titles = ["original"] + [f"torchvision v{k % 2 + 1}" for k in range(views)] + \
             [f"batched v{k % 2 + 1}" for k in range(views)]
    colours = ["black"] + ["tab:blue"] * views + ["tab:red"] * views
    for i in range(n):
        row = [images[i].permute(1, 2, 0).numpy()] + tv[i] + batched[i]
        for c, (ax, img) in enumerate(zip(axes[i], row)):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[c], fontsize=7, color=colours[c])
    fig.suptitle("augmentation views: torchvision v2 pipeline (blue) vs batched device path (red)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
