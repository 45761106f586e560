"""MLP heads (projectors and predictors) as used by the official MoCo-v2, SimSiam, SimCLR and BYOL code."""
from __future__ import annotations

import torch.nn as nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False, *,
        hidden_bn: bool = True, last_bias: bool | None = None, last_affine: bool = False) -> nn.Sequential:
    """``num_layers`` Linear layers: (Linear-[BN]-ReLU) x (num_layers-1), then Linear-[BN].

    A Linear followed by BN has no bias (BN's shift makes it redundant, as in the SimSiam/SimCLR code).
    ``last_bias`` defaults to ``not last_bn``. The last BN has no affine parameters (SimSiam's
    ``BatchNorm1d(dim, affine=False)``) unless ``last_affine`` (solo-learn's NNCLR projector).
    Per method: MoCo-v2 ``hidden_bn=False`` (Linear-ReLU-Linear); SimSiam projector ``last_bn=True``;
    SimCLR ``last_bn=True``; BYOL ``last_bias=False``; NNCLR ``last_bn=True, last_affine=True``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=(not last_bn) if last_bias is None else last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_affine))
    return nn.Sequential(*layers)
