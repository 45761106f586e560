"""Export a trained backbone as a plain torchvision ResNet ``state_dict``.

The file holds only tensors, keyed exactly like ``torchvision.models.resnetXX()`` without its ``fc`` layer,
so it loads with ``strict=True`` into the model that ``sepp.models.backbones.torchvision_resnet`` returns (a
torchvision ResNet with ``fc = Identity`` and, for CIFAR-stem runs, the 3x3 stem). A JSON sidecar records the
architecture and the source checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engine.checkpoint import atomic_save, file_hash, load_trained


def export_backbone(checkpoint: str, out: str) -> dict:
    method, cfg, ckpt = load_trained(checkpoint, ["device=cpu"])
    state = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    atomic_save(state, out)
    info = {"arch": cfg.model.backbone, "cifar_stem": bool(cfg.model.cifar_stem), "method": cfg.method,
            "epoch": ckpt["epoch"], "source": str(checkpoint), "source_sha256": file_hash(checkpoint),
            "load": "m = sepp.models.backbones.torchvision_resnet(arch, cifar_stem); "
                    "m.load_state_dict(torch.load(file), strict=True)"}
    Path(str(out) + ".json").write_text(json.dumps(info, indent=2))
    return info


def load_exported(path: str) -> torch.nn.Module:
    """The torchvision ResNet described by an export's sidecar, with its weights loaded strictly."""
    from .backbones import torchvision_resnet

    info = json.loads(Path(str(path) + ".json").read_text())
    model = torchvision_resnet(info["arch"], info["cifar_stem"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model
