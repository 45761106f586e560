"""Backbones (torchvision ResNets) and MLP heads; nothing here knows about SSL methods or SePP."""
from sepp.models.backbones import BACKBONES, FEAT_DIMS, NarrowResNet18, build_backbone, torchvision_resnet
from sepp.models.heads import mlp

__all__ = ["BACKBONES", "FEAT_DIMS", "NarrowResNet18", "build_backbone", "torchvision_resnet", "mlp"]
