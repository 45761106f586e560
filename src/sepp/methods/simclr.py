"""SimCLR (Chen et al. 2020, arXiv 2002.05709), after google-research/simclr (v1).

Defaults (constructor = ImageNet, official README): T 0.1, projector Linear-BN-ReLU-Linear-BN with 2048
hidden and 128 output units (the official head's output BN has a scale but no shift; ours has neither, which
the following L2 normalisation makes nearly equivalent). CIFAR defaults (``CIFAR_DEFAULTS``, official README's
CIFAR-10 command): T 0.5.

Negatives are the whole global batch: embeddings are gathered from every process with gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sepp.engine import distributed as D
from sepp.methods.losses import nt_xent
from sepp.models.heads import mlp


class SimCLR(nn.Module):
    CIFAR_DEFAULTS = {"temperature": 0.5}

    def __init__(self, backbone: nn.Module, feat_dim: int, *, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, 2, last_bn=True)
        self.temperature = temperature

    def forward(self, x1, x2, ids1, ids2) -> dict[str, torch.Tensor]:
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        z1_all, z2_all = D.all_gather_with_grad(z1), D.all_gather_with_grad(z2)
        loss = nt_xent(z1, z2, self.temperature, z1_all, z2_all, offset=D.get_rank() * z1.shape[0])
        return {"loss": loss}

    def after_step(self, progress: float) -> None:
        """Nothing to update: SimCLR has no momentum encoder."""

    def param_groups(self, base_lr: float) -> list[dict]:
        return [{"name": "backbone", "params": list(self.backbone.parameters()), "lr": base_lr},
                {"name": "projector", "params": list(self.projector.parameters()), "lr": base_lr}]
