"""SimCLR (Chen et al. 2020, arXiv 2002.05709), after google-research/simclr (v1).

Defaults (constructor = ImageNet, official README): T 0.1, projector Linear-BN-ReLU-Linear-BN with 2048
hidden and 128 output units (the official head's output BN has a scale but no shift; ours has neither, which
the following L2 normalisation makes nearly equivalent). These defaults are the only ones; the CIFAR values
(solo-learn's CIFAR recipe: T 0.2, output 256) are stated in ``configs/cifar10_simclr.yaml``.

Negatives are the whole global batch: embeddings are gathered from every process with gradient.
SePP: a third view (``x3``, a semantic partner of the anchor's image) is an extra positive of both anchor
views (multi-positive NT-Xent); with known positives registered (``sepp.mask_negatives``) a view of the
anchor's own image or of a known partner is never one of its negatives, and with ``sepp.batch_positives``
such views are further positives of the anchor.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sepp import distributed as D
from sepp.data.recipes import Recipe
from sepp.methods.base import Method
from sepp.methods.known import KnownPositives
from sepp.methods.losses import nt_xent_views
from sepp.models.heads import mlp


class SimCLR(Method):
    # the paper's: crop 0.08-1, jitter 0.8 x s with s=1 (0.8/0.8/0.8/0.2) p=0.8, grayscale p=0.2, blur p=0.5
    augmentation = Recipe(crop_scale=(0.08, 1.0), brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                          blur_p=(0.5, 0.5))
    sync_bn = True  # the paper synchronises BN across devices
    has_negatives = True

    def __init__(self, backbone: nn.Module, feat_dim: int, *, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, 2, last_bn=True)
        self.temperature = temperature
        self.known = KnownPositives()

    def set_known_positives(self, i, j, num_images: int, positives: bool = False) -> None:
        self.known.set(i, j, num_images, positives)

    def forward(self, x1, x2, ids1, ids2, x3=None, ids3=None) -> dict[str, torch.Tensor]:
        xs, ids = ([x1, x2], [ids1, ids2]) if x3 is None else ([x1, x2, x3], [ids1, ids2, ids3])
        zs = [self.projector(self.backbone(x)) for x in xs]
        zs_all = [D.all_gather_with_grad(z) for z in zs]
        known = self.known.mask(torch.cat(ids), torch.cat([D.all_gather(i) for i in ids]))
        as_pos = known is not None and self.known.positives
        loss = nt_xent_views(zs, self.temperature, zs_all, offset=D.get_rank() * zs[0].shape[0],
                             drop=None if as_pos else known, extra_positive=known if as_pos else None)
        out = {"loss": loss}
        if known is not None:
            out["known_positives" if as_pos else "masked_negatives"] = known.sum(1).float().mean().detach()
        return out
