"""Backbones in the format Detectron2 loads, as the official MoCo detection code writes it
(facebookresearch/moco ``detection/convert-pretrain-to-detectron2.py``).

torchvision ResNet keys are renamed: ``conv1``/``bn1`` of the stem -> ``stem.conv1`` / ``stem.conv1.norm``;
``layer1..layer4`` -> ``res2..res5``; ``bnK`` -> ``convK.norm``; ``downsample.0`` -> ``shortcut``,
``downsample.1`` -> ``shortcut.norm``. Values become numpy arrays in a pickle
``{"model": {...}, "__author__": "sepp", "matching_heuristics": True}``. Detectron2 must then be configured as
for MoCo (see ``DETECTRON2_CONFIG``): RGB input with torchvision's pixel mean/std in 0-255 units,
``STRIDE_IN_1X1: False`` (torchvision puts the stride in the 3x3 conv), SyncBN.
"""
from __future__ import annotations

import pickle
import re

import numpy as np
import torch

from ..errors import SeppError
from ..fileio import atomic_write

# What must go with the weights in the Detectron2 config (the MoCo detection configs' values).
DETECTRON2_CONFIG = {
    "INPUT.FORMAT": "RGB",
    "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
    "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
    "MODEL.RESNETS.STRIDE_IN_1X1": False,
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.FPN.NORM": "SyncBN",
    "MODEL.BACKBONE.FREEZE_AT": 0,
}
DEPTHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


def detectron2_key(key: str) -> str:
    """The Detectron2 name of one torchvision ResNet ``state_dict`` key (the MoCo script's renaming)."""
    if "layer" not in key:
        key = "stem." + key
    for t in (1, 2, 3, 4):
        key = key.replace(f"layer{t}", f"res{t + 1}")
    for t in (1, 2, 3):
        key = key.replace(f"bn{t}", f"conv{t}.norm")
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def torchvision_key(key: str) -> str:
    """Inverse of :func:`detectron2_key`."""
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    key = re.sub(r"conv(\d)\.norm", r"bn\1", key)
    key = re.sub(r"res(\d)", lambda m: f"layer{int(m.group(1)) - 1}", key)
    return key[len("stem."):] if key.startswith("stem.") else key


def to_detectron2(state: dict[str, torch.Tensor]) -> dict:
    """The pickle payload for a torchvision ResNet ``state_dict`` (``fc.*`` keys are dropped)."""
    model = {detectron2_key(k): v.detach().cpu().numpy() for k, v in state.items() if not k.startswith("fc.")}
    return {"model": model, "__author__": "sepp", "matching_heuristics": True}


def from_detectron2(payload: dict) -> dict[str, torch.Tensor]:
    """A torchvision ResNet ``state_dict`` back from a :func:`to_detectron2` payload."""
    return {torchvision_key(k): torch.from_numpy(np.asarray(v)) for k, v in payload["model"].items()}


def check_exportable(arch: str, cifar_stem: bool) -> None:
    """Detectron2's ResNets have the 7x7 stem and (R18/R34) 64 res2 channels; refuse anything else."""
    if cifar_stem:
        raise SeppError("this checkpoint's backbone has the CIFAR 3x3 stem, which Detectron2's ResNet stem "
                        "cannot hold; export a model trained with model.cifar_stem=false")
    if arch not in DEPTHS:
        raise SeppError(f"backbone {arch} has no Detectron2 ResNet counterpart; export resnet18, resnet34 or "
                        "resnet50 (the narrow ResNet's widths differ from Detectron2's)")


def write_detectron2(state: dict[str, torch.Tensor], path) -> None:
    """Write the pickle (protocol 4, readable by Detectron2's ``DetectionCheckpointer``)."""
    payload = to_detectron2(state)
    atomic_write(path, lambda f: pickle.dump(payload, f, protocol=4))


def config_snippet(arch: str, weights: str) -> str:
    """The Detectron2 YAML keys to use with exported weights (MoCo's detection configs)."""
    return "\n".join([
        "MODEL:",
        f'  WEIGHTS: "{weights}"',
        "  PIXEL_MEAN: [123.675, 116.280, 103.530]",
        "  PIXEL_STD: [58.395, 57.120, 57.375]",
        "  BACKBONE: {FREEZE_AT: 0}",
        f"  RESNETS: {{DEPTH: {DEPTHS[arch]}, STRIDE_IN_1X1: False, NORM: SyncBN"
        + (", RES2_OUT_CHANNELS: 64}" if DEPTHS[arch] < 50 else "}"),
        "  FPN: {NORM: SyncBN}",
        "INPUT: {FORMAT: RGB}",
    ])
