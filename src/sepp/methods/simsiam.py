"""SimSiam (Chen & He 2021, arXiv 2011.10566), after facebookresearch/simsiam ``simsiam/builder.py``.

Defaults (constructor = ImageNet, paper / official repo): projector 3 layers, hidden and output 2048, BN on
every layer including the output; predictor 2048 -> 512 -> 2048 (BN on the hidden layer only), trained with
a fixed learning rate (``fix_lr`` in its param group, the official ``--fix-pred-lr``).
These defaults are the only ones; the paper's CIFAR-10 2-layer projector is stated in
``configs/cifar10_simsiam.yaml``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sepp.methods.base import Method
from sepp.methods.mocov2 import MoCoV2
from sepp.methods.losses import negative_cosine, predictive_views
from sepp.models.heads import mlp


class SimSiam(Method):
    augmentation = MoCoV2.augmentation  # facebookresearch/simsiam: MoCo-v2's --aug-plus
    sync_bn = True  # the paper synchronises BN across devices

    def __init__(self, backbone: nn.Module, feat_dim: int, *, proj_hidden_dim: int = 2048, proj_dim: int = 2048,
                 proj_layers: int = 3, pred_hidden_dim: int = 512, fix_pred_lr: bool = True):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, proj_layers, last_bn=True)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim, 2)
        self.fix_pred_lr = fix_pred_lr

    def forward(self, x1, x2, ids1, ids2, x3=None, ids3=None) -> dict[str, torch.Tensor]:
        """Two views: (D(p1, z2) + D(p2, z1)) / 2. A third view (a semantic partner) is one more predicted
        target: the mean of D over every ordered pair of views."""
        zs = [self.projector(self.backbone(x)) for x in ([x1, x2] if x3 is None else [x1, x2, x3])]
        loss = predictive_views([self.predictor(z) for z in zs], zs, negative_cosine)
        z1 = zs[0]
        # Collapse monitor from the paper: per-dimension std of the normalised output, ~1/sqrt(dim) when
        # healthy and 0 when collapsed.
        z_std = F.normalize(z1.detach().float(), dim=1).std(0).mean()
        return {"loss": loss, "z_std": z_std}

    def param_groups(self, base_lr: float) -> list[dict]:
        """The default groups; the predictor keeps ``base_lr`` with ``fix_pred_lr`` (the paper's fixed rate)."""
        groups = super().param_groups(base_lr)
        for group in groups:
            group["fix_lr"] = group["name"] == "predictor" and bool(self.fix_pred_lr)
        return groups
