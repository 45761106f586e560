"""SSL methods (one short module each), their pure-function losses and the memory queue.

Every method is an ``nn.Module`` built as ``cls(backbone, feat_dim, **hyperparameters)`` with attributes
``backbone`` and ``projector``, ``forward(x1, x2, ids1, ids2) -> {"loss": ..., ...}``, ``after_step(progress)``
(momentum/EMA updates, called after each optimizer step) and ``param_groups(base_lr)``.
"""
from __future__ import annotations

import inspect

import torch.nn as nn
from omegaconf import OmegaConf

from sepp.errors import SeppError
from sepp.methods.byol import BYOL
from sepp.methods.mocov2 import MoCoV2
from sepp.methods.simclr import SimCLR
from sepp.methods.simsiam import SimSiam
from sepp.models.backbones import build_backbone

METHODS = {"mocov2": MoCoV2, "simsiam": SimSiam, "simclr": SimCLR, "byol": BYOL}


def hyperparameter_names(cls: type) -> list[str]:
    """The keyword hyperparameters a method's constructor accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_method(cfg) -> nn.Module:
    """Build ``METHODS[cfg.method]`` on ``cfg.model.backbone``; hyperparameters come from ``cfg[cfg.method]``,
    and for CIFAR-stem backbones the method's ``CIFAR_DEFAULTS`` fill the keys that section leaves out."""
    name = cfg["method"]
    if name not in METHODS:
        raise SeppError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    section = cfg.get(name) or {}
    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    hparams = {**(cls.CIFAR_DEFAULTS if cfg["model"]["cifar_stem"] else {}), **section}
    valid = hyperparameter_names(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise SeppError(f"unknown {name} hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    backbone, feat_dim = build_backbone(cfg["model"]["backbone"], bool(cfg["model"]["cifar_stem"]))
    return cls(backbone, feat_dim, **hparams)


__all__ = ["METHODS", "build_method", "hyperparameter_names", "MoCoV2", "SimSiam", "SimCLR", "BYOL"]
