"""Export a trained backbone as a plain torchvision ResNet ``state_dict``.

The file holds only tensors, keyed exactly like ``torchvision.models.resnetXX()`` without its ``fc`` layer,
so it loads with ``strict=True`` into the model that ``sepp.models.backbones.torchvision_resnet`` returns (a
torchvision ResNet with ``fc = Identity`` and, for CIFAR-stem runs, the 3x3 stem). A JSON sidecar records the
architecture and the source checkpoint. ``format="detectron2"`` writes the pickle of the MoCo detection code
instead (:mod:`sepp.models.detectron2`).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..errors import SeppError
from ..models import detectron2 as d2
from ..models.backbones import torchvision_resnet
from .checkpoint import atomic_save, file_hash, load_trained

FORMATS = ("torchvision", "detectron2")


def export_backbone(checkpoint: str, out: str, format: str = "torchvision") -> dict:
    """Write the backbone of a sepp checkpoint to ``out`` plus a JSON sidecar ``out.json``.

    ``format``: ``torchvision`` (a ``state_dict`` for ``torch.load``) or ``detectron2`` (the pickle of the
    MoCo detection code, see :mod:`sepp.models.detectron2`; the sidecar then holds the config keys to use)."""
    if format not in FORMATS:
        raise SeppError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    method, cfg, ckpt = load_trained(checkpoint, ["device=cpu"])
    state = {k: v.detach().clone() for k, v in method.backbone.state_dict().items()}
    info = {"arch": cfg.model.backbone, "cifar_stem": bool(cfg.model.cifar_stem), "method": cfg.method,
            "epoch": ckpt["epoch"], "source": str(checkpoint), "source_sha256": file_hash(checkpoint),
            "format": format}
    if format == "detectron2":
        d2.check_exportable(info["arch"], info["cifar_stem"])
        d2.write_detectron2(state, out)
        info.update(detectron2_config=d2.DETECTRON2_CONFIG,
                    detectron2_yaml=d2.config_snippet(info["arch"], str(out)))
    else:
        atomic_save(state, out)
        info["load"] = ("m = sepp.models.backbones.torchvision_resnet(arch, cifar_stem); "
                        "m.load_state_dict(torch.load(file), strict=True)")
    Path(str(out) + ".json").write_text(json.dumps(info, indent=2))
    return info


def load_exported(path: str) -> torch.nn.Module:
    """The torchvision ResNet described by an export's sidecar, with its weights loaded strictly."""
    info = json.loads(Path(str(path) + ".json").read_text())
    model = torchvision_resnet(info["arch"], info["cifar_stem"])
    if info.get("format") == "detectron2":
        with open(path, "rb") as f:
            state = d2.from_detectron2(pickle.load(f))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model
