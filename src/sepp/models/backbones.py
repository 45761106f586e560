"""Backbones: torchvision ResNets with the classifier removed (images -> pooled features [B, feat_dim]).

The modules are plain ``torchvision.models.ResNet`` instances (the narrow variant is a subclass), so an exported
backbone ``state_dict`` has torchvision's key names and loads into ``torchvision_resnet(...)`` with
``strict=True``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import ResNet, resnet18, resnet34, resnet50
from torchvision.models.resnet import BasicBlock

from sepp.errors import SeppError

FEAT_DIMS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet18_narrow": 128}
BACKBONES = tuple(FEAT_DIMS)


def _init_like_torchvision(module: nn.Module) -> None:
    """Re-apply torchvision's ResNet initialisation to modules created after ``ResNet.__init__``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


class NarrowResNet18(ResNet):
    """ResNet-18 (BasicBlock [2, 2, 2, 2]) with stage widths (16, 32, 64, 128): ~0.7 M parameters, small enough
    to pretrain on a few CPU cores. Same module names as torchvision's ResNet-18."""

    def __init__(self, widths: tuple[int, int, int, int] = (16, 32, 64, 128), num_classes: int = 1000):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        # Rebuild every width-dependent module; ResNet.forward only uses these attribute names.
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(widths[0])
        self.layer1 = self._make_layer(BasicBlock, widths[0], 2)
        self.layer2 = self._make_layer(BasicBlock, widths[1], 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], 2, stride=2)
        self.fc = nn.Linear(widths[3], num_classes)
        _init_like_torchvision(self)


_CONSTRUCTORS = {
    "resnet18": lambda: resnet18(weights=None),
    "resnet34": lambda: resnet34(weights=None),
    "resnet50": lambda: resnet50(weights=None),
    "resnet18_narrow": NarrowResNet18,
}


def torchvision_resnet(name: str, cifar_stem: bool = False) -> ResNet:
    """The torchvision ResNet ``name`` (randomly initialised) with ``fc = Identity``.

    ``cifar_stem`` replaces the 7x7/2 conv + max-pool stem by a 3x3/1 conv and no pooling, as is standard for
    32-96 px images (SimCLR/SimSiam CIFAR experiments)."""
    if name not in _CONSTRUCTORS:
        raise SeppError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    model = _CONSTRUCTORS[name]()
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        _init_like_torchvision(model.conv1)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def build_backbone(name: str, cifar_stem: bool = False) -> tuple[nn.Module, int]:
    """``(module, feat_dim)``: the module maps images ``[B, 3, H, W]`` to features ``[B, feat_dim]``."""
    return torchvision_resnet(name, cifar_stem), FEAT_DIMS[name]


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed separately on ``num_splits`` groups of the batch
    (sample n in group n mod num_splits), as if the batch were spread over that many GPUs. MoCo needs this in
    one process: with one BN over the whole batch a query can find its key through the shared batch
    statistics (the "BN leakage" the MoCo paper answers with shuffle-BN). Same parameters and buffers as
    ``nn.BatchNorm2d``, so state dicts load into plain torchvision models; eval mode is plain BN."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = self.num_splits
        if not self.training or g <= 1 or n % g:
            return super().forward(x)
        # [n, c] -> [n/g, g*c]: channel block j holds samples j, j+g, j+2g, ... (one virtual device each)
        mean, var = self.running_mean.repeat(g), self.running_var.repeat(g)
        y = F.batch_norm(x.reshape(n // g, g * c, h, w), mean, var, self.weight.repeat(g), self.bias.repeat(g),
                         True, 0.1 if self.momentum is None else self.momentum, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(g, c).mean(0))
            self.running_var.copy_(var.view(g, c).mean(0))
            self.num_batches_tracked.add_(1)
        return y.reshape(n, c, h, w)


def split_batchnorm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm2d of ``module`` (in place) by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device))
        else:
            split_batchnorm(child, num_splits)
    return module
