"""Any encoder file: a sepp checkpoint, a `sepp export` output (its JSON sidecar names the architecture) or the
checkpoint of a public SSL code (MoCo, SimSiam, DINO, solo-learn, lightly, BYOL, torchvision, ...; the backbone
is found by :mod:`sepp.models.layouts`, ``key_prefix`` / ``model.key_prefix`` where guessing cannot; the
architecture from ``arch`` / ``cifar_stem``, else read off the keys and the stem's kernel).

Mining with it (`sepp mine --encoder FILE`, phase 2 of `sepp run` from ``run.baseline_checkpoint``): features,
search and pair files are those of ``sepp mine --checkpoint``; the pair file's meta records the encoder file's
SHA-256 and layout. Training from it (``train.init_backbone``, ``run.init=baseline``): :func:`encoder_init`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from sepp.config import load_config
from sepp.errors import SeppError
from sepp.methods import resolve
from sepp.methods.checkpoint import (FORMAT, config_from_checkpoint, file_hash, load_checkpoint,
                                     load_trained)
from sepp.mining.from_model import encoder_for, mine_checkpoint, training_images
from sepp.mining.run import MineSettings, mine_pairs
from sepp.models.backbones import torchvision_resnet
from sepp.models.layouts import backbone_state


def infer_arch(state: dict) -> tuple[str, bool]:
    """``(arch, cifar_stem)`` of a torchvision ResNet ``state_dict``: the 3x3 stem marks the CIFAR stem, 16
    stem channels the narrow ResNet-18, ``conv3`` in a block the bottleneck (ResNet-50), 6 blocks in
    ``layer3`` ResNet-34."""
    conv1 = state.get("conv1.weight")
    if conv1 is None or conv1.dim() != 4:
        raise SeppError("the encoder file has no 'conv1.weight'; it is not a torchvision ResNet state_dict "
                        "(pass a sepp checkpoint, a `sepp export` output or a ResNet state_dict)")
    cifar_stem = conv1.shape[-1] == 3
    blocks3 = {int(m.group(1)) for k in state for m in [re.match(r"layer3\.(\d+)\.", k)] if m}
    if "layer1.0.conv3.weight" in state:
        return "resnet50", cifar_stem
    if conv1.shape[0] == 16:
        return "resnet18_narrow", cifar_stem
    return ("resnet34" if len(blocks3) == 6 else "resnet18"), cifar_stem


def _read(path: Path):
    """The file's object: plain tensors load with ``weights_only``; a sepp checkpoint (numpy pair arrays) is
    read by :func:`sepp.methods.checkpoint.load_checkpoint`, which checks its marker."""
    if not path.is_file():
        raise SeppError(f"encoder file {path} does not exist; pass a sepp checkpoint, export or state_dict")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        pass
    try:
        return load_checkpoint(path)
    except SeppError:
        raise SeppError(f"{path} is neither a sepp checkpoint nor a torch file of tensors (a state_dict); "
                        "pass a sepp checkpoint, a `sepp export` output or a torchvision ResNet state_dict") from None


def is_sepp_checkpoint(path) -> bool:
    obj = _read(Path(path))
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def encoder_config(path, config: str | None = None, overrides=()):
    """The resolved config to mine with: a sepp checkpoint's own (as `sepp mine --checkpoint`), otherwise
    ``config`` (a YAML file or shipped name; default: the schema defaults, i.e. CIFAR-10), then overrides."""
    if config is None and is_sepp_checkpoint(path):
        return config_from_checkpoint(load_checkpoint(path), overrides)
    return resolve(load_config(config, list(overrides)))


def _state_dict(obj, key_prefix: str | None = None) -> tuple[dict, str]:
    """``(backbone state_dict with torchvision names, layout name)``: see :mod:`sepp.models.layouts`."""
    if not isinstance(obj, dict):
        raise SeppError("the encoder file holds no dict of tensors; pass a sepp checkpoint, a `sepp export` "
                        "output or a ResNet state_dict")
    return backbone_state(obj, key_prefix)


def _fit(state: dict, arch: str, cifar_stem: bool) -> nn.Module:
    """``torchvision_resnet(arch, cifar_stem)`` with ``state`` loaded strictly (BN counters a file lacks start
    at 0), or one line naming the first key that does not fit."""
    model = torchvision_resnet(arch, cifar_stem)
    expected = model.state_dict()
    state = {**{k: v for k, v in expected.items() if k.endswith("num_batches_tracked")}, **state}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:  # load_state_dict would raise a page-long RuntimeError on shapes
        what = (f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}" if unexpected else
                f"{wrong[0]!r} is {list(state[wrong[0]].shape)}, not {list(expected[wrong[0]].shape)}")
        raise SeppError(f"the state_dict does not fit {arch} (cifar_stem={cifar_stem}): {what}; "
                        "pass the right --arch / --cifar-stem")
    model.load_state_dict(state, strict=True)
    return model


def load_encoder(path, arch: str | None = None, cifar_stem: bool | None = None,
                 features: str = "backbone", key_prefix: str | None = None) -> tuple[nn.Module, dict]:
    """``(encoder on the CPU in eval mode, info)`` from an encoder file; ``info`` holds ``kind``
    (checkpoint | export | state_dict), ``arch``, ``cifar_stem``, ``layout`` (see :mod:`sepp.models.layouts`;
    ``key_prefix`` names where the backbone begins when guessing cannot) and, for sepp checkpoints,
    ``method``, ``epoch`` and ``config``. ``features="projector"`` (backbone + projection head) needs a sepp
    checkpoint."""
    path = Path(path)
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        method, cfg, ckpt = load_trained(path, ["device=cpu"])
        info = {"kind": "checkpoint", "arch": cfg.model.backbone, "cifar_stem": bool(cfg.model.cifar_stem),
                "method": cfg.method, "epoch": ckpt["epoch"], "config": ckpt["config"], "layout": "sepp checkpoint"}
        return encoder_for(method, features).eval(), info
    if features != "backbone":
        raise SeppError(f"mine.features={features} needs the projection head, which only a sepp checkpoint "
                        "holds; use mine.features=backbone with exports and state_dicts")
    state, layout = _state_dict(obj, key_prefix)
    sidecar = Path(str(path) + ".json")
    kind, guess = "state_dict", infer_arch(state)
    if sidecar.is_file():
        side = json.loads(sidecar.read_text())
        kind, guess = "export", (side.get("arch", guess[0]), bool(side.get("cifar_stem", guess[1])))
    arch = arch or guess[0]
    cifar_stem = guess[1] if cifar_stem is None else bool(cifar_stem)
    model = _fit(state, arch, cifar_stem)
    return model.eval(), {"kind": kind, "arch": arch, "cifar_stem": cifar_stem, "layout": layout}


def mine_with_encoder(path, cfg, out_dir, arch: str | None = None, cifar_stem: bool | None = None,
                      key_prefix: str | None = None) -> tuple:
    """Mine pairs of ``cfg.data``'s training split with the encoder in ``path`` and ``cfg.mine``'s settings
    (as ``sepp mine --checkpoint`` does); returns ``(pairs, statistics)`` of :func:`sepp.mining.run.mine_pairs`."""
    if str(cfg.mine.get("oracle", "none")) != "none":
        raise SeppError("mine.oracle builds diagnostic pairs through `sepp mine --checkpoint`; drop mine.oracle "
                        "or use --checkpoint")
    prefix = cfg.model.get("key_prefix") if key_prefix is None else key_prefix
    encoder, info = load_encoder(path, arch, cifar_stem, cfg.mine.features, prefix)
    device = torch.device(cfg.device)
    dataset = training_images(cfg)
    meta = {"encoder_checkpoint": str(path), "encoder_sha256": file_hash(path), "encoder_kind": info["kind"],
            "encoder_arch": info["arch"], "encoder_cifar_stem": info["cifar_stem"], "encoder_layout": info["layout"],
            "encoder_method": info.get("method"), "encoder_epoch": info.get("epoch")}
    return mine_pairs(encoder.to(device), dataset, MineSettings.from_config(cfg), device=device, out_dir=out_dir,
                      meta=meta)


def _check_arch(path, arch: str, cifar_stem: bool, cfg) -> None:
    if (arch, bool(cifar_stem)) != (cfg.model.backbone, bool(cfg.model.cifar_stem)):
        raise SeppError(f"{path} holds a {arch} backbone (cifar_stem={bool(cifar_stem)}) but the config builds "
                        f"{cfg.model.backbone} (cifar_stem={bool(cfg.model.cifar_stem)}); set "
                        f"model.backbone={arch} model.cifar_stem={str(bool(cifar_stem)).lower()}")


def encoder_init(path, cfg) -> tuple[dict, dict]:
    """``(initial weights, info)`` of ``cfg``'s method from an encoder file (``train.init_backbone``,
    ``run.baseline_checkpoint`` with ``run.init=baseline``): a sepp checkpoint of the same method gives the
    whole model (heads included); any other file `sepp mine --encoder` reads gives ``backbone.*`` keys
    (:func:`sepp.methods.checkpoint.initial_state` adds fresh heads). ``info``: file, SHA-256, what was taken,
    layout. One line when the file's backbone is not ``cfg.model``'s."""
    obj = _read(Path(path))
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = load_checkpoint(path)
        model = ckpt["config"]["model"]
        _check_arch(path, model["backbone"], model["cifar_stem"], cfg)
        same = ckpt["config"]["method"] == cfg.method
        init = ckpt["model"] if same else {k: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        what, layout = ("whole model" if same else "backbone"), "sepp checkpoint"
    else:
        encoder, info = load_encoder(path, key_prefix=cfg.model.get("key_prefix"))
        _check_arch(path, info["arch"], info["cifar_stem"], cfg)
        init = {f"backbone.{k}": v for k, v in encoder.state_dict().items()}
        what, layout = "backbone", info["layout"]
    return init, {"file": str(path), "sha256": file_hash(path, 64), "loaded": what, "layout": layout}


def mine_file(path, cfg, out_dir) -> tuple:
    """Mining from any encoder file (phase 2 of `sepp run`): a sepp checkpoint as `sepp mine --checkpoint`
    (oracle pairs included), any other file as `sepp mine --encoder`; returns ``(pairs, statistics)``."""
    if is_sepp_checkpoint(path):
        return mine_checkpoint(str(path), cfg, out_dir)
    return mine_with_encoder(path, cfg, out_dir)
