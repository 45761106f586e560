"""BYOL (Grill et al. 2020, arXiv 2006.07733), after google-deepmind/deepmind-research ``byol``.

Defaults (constructor = ImageNet, paper): projector and predictor Linear-BN-ReLU-Linear with 4096 hidden and
256 output units (output Linear without bias, as the official MLP); target = EMA of backbone + projector with
tau = 1 - (1 - tau_base)(cos(pi * progress) + 1) / 2, tau_base 0.996; loss = l(p1, z2') + l(p2, z1')
(the paper's symmetrised sum). These defaults are the only ones; solo-learn's CIFAR value tau_base 0.99 is
stated in ``configs/cifar10_byol.yaml``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from sepp.data.recipes import Recipe
from sepp.methods.base import Method
from sepp.methods.losses import byol_loss, predictive_views
from sepp.methods.queue import ema_update, frozen_copy
from sepp.models.heads import mlp


def byol_tau(tau_base: float, progress: float) -> float:
    """Target EMA coefficient after a fraction ``progress`` in [0, 1] of training: tau_base -> 1."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * progress) + 1) / 2


class BYOL(Method):
    # the paper's, asymmetric: view 1 blur p=1.0 solarize p=0, view 2 blur p=0.1 solarize p=0.2; jitter
    # 0.4/0.4/0.2/0.1 p=0.8, grayscale p=0.2, crop 0.08-1
    augmentation = Recipe(crop_scale=(0.08, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1,
                          blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2))
    sync_bn = True  # the paper synchronises BN across devices

    def __init__(self, backbone: nn.Module, feat_dim: int, *, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, tau_base: float = 0.996):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, 2, last_bias=False)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim, 2, last_bias=False)
        self.target_backbone = frozen_copy(backbone)
        self.target_projector = frozen_copy(self.projector)
        self.tau_base = self.tau = tau_base

    def forward(self, x1, x2, ids1, ids2, x3=None, ids3=None) -> dict[str, torch.Tensor]:
        """Two views: l(p1, t2) + l(p2, t1). A third view (a semantic partner) is one more predicted target:
        every view predicts every other (ordered pairs), scaled so the two-view loss is unchanged."""
        xs = [x1, x2] if x3 is None else [x1, x2, x3]
        ps = [self.predictor(self.projector(self.backbone(x))) for x in xs]
        with torch.no_grad():
            ts = [self.target_projector(self.target_backbone(x)) for x in xs]
        return {"loss": 2 * predictive_views(ps, ts, byol_loss)}

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        self.tau = byol_tau(self.tau_base, progress)
        ema_update(self.target_backbone, self.backbone, self.tau)
        ema_update(self.target_projector, self.projector, self.tau)

