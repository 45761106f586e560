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
from sepp.methods.nnclr import NNCLR
from sepp.methods.simclr import SimCLR
from sepp.methods.simsiam import SimSiam
from sepp.models.backbones import build_backbone

METHODS = {"mocov2": MoCoV2, "simsiam": SimSiam, "simclr": SimCLR, "byol": BYOL, "nnclr": NNCLR}


def hyperparameter_names(cls: type) -> list[str]:
    """The keyword hyperparameters a method's constructor accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def hyperparameter_defaults(cls: type) -> dict:
    """The constructor's default of every keyword hyperparameter: the one home of method defaults (the
    config schema's method sections are null until ``sepp.config.resolve`` copies these in)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


def build_method(cfg) -> nn.Module:
    """Build ``METHODS[cfg.method]`` on ``cfg.model.backbone``; hyperparameters come from ``cfg[cfg.method]``,
    keys it leaves out or sets to null take the constructor's default (the paper's ImageNet value)."""
    name = cfg["method"]
    if name not in METHODS:
        raise SeppError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    cls = METHODS[name]
    section = cfg.get(name) or {}
    if OmegaConf.is_config(section):
        section = OmegaConf.to_container(section, resolve=True)
    hparams = {k: v for k, v in section.items() if v is not None}
    valid = hyperparameter_names(cls)
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise SeppError(f"unknown {name} hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    backbone, feat_dim = build_backbone(cfg["model"]["backbone"], bool(cfg["model"]["cifar_stem"]))
    return cls(backbone, feat_dim, **hparams)


__all__ = ["METHODS", "build_method", "hyperparameter_defaults", "hyperparameter_names", "MoCoV2", "SimSiam", "SimCLR", "BYOL", "NNCLR"]
