"""SSL methods (one short module each), their pure-function losses and the memory queue.

Every method is a :class:`sepp.methods.base.Method` built as ``cls(backbone, feat_dim, **hyperparameters)``
with attributes ``backbone`` and ``projector``, ``forward(x1, x2, ids1, ids2) -> {"loss": ..., ...}``,
``after_step(progress)`` (momentum/EMA updates, called after each optimizer step) and ``param_groups(base_lr)``.
:func:`resolve` completes a config for building a method: the machine's automatic values
(:func:`sepp.config.fill_auto`), the registry-owned choices of the layers up to this one and the constructor
defaults of the method sections.
"""
from __future__ import annotations

import inspect

import torch.nn as nn
from omegaconf import OmegaConf

from sepp.config import check_choices, fill_auto
from sepp.data.datasets import DATASETS
from sepp.data.sampling import MODES
from sepp.errors import SeppError
from sepp.methods.base import Method
from sepp.methods.byol import BYOL
from sepp.methods.mocov2 import BN_MODES, MoCoV2
from sepp.methods.nnclr import NNCLR
from sepp.methods.optim import OPTIMIZERS
from sepp.methods.simclr import SimCLR
from sepp.methods.simsiam import SimSiam
from sepp.models.backbones import BACKBONES, build_backbone

METHODS: dict[str, type[Method]] = {"mocov2": MoCoV2, "simsiam": SimSiam, "simclr": SimCLR, "byol": BYOL,
                                    "nnclr": NNCLR}
# Config keys whose values name an entry of a registry at this layer or below.
CONFIG_CHOICES = {"method": METHODS, "data.name": DATASETS, "transfer.data.name": DATASETS,
                  "model.backbone": BACKBONES, "sepp.mode": MODES, "train.optimizer": OPTIMIZERS,
                  "mocov2.bn": BN_MODES}


def hyperparameter_names(cls: type) -> list[str]:
    """The keyword hyperparameters a method's constructor accepts."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def hyperparameter_defaults(cls: type) -> dict:
    """The constructor's default of every keyword hyperparameter: the one home of method defaults (the
    config schema's method sections are null until :func:`resolve` copies these in)."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


def resolve(cfg):
    """A copy of ``cfg`` with every automatic value filled in (what gets saved as config.yaml): the machine's
    (:func:`sepp.config.fill_auto`), ``model.sync_bn`` (on under DDP on CUDA for methods whose paper
    synchronises BN) and each method section's nulls (the constructor's defaults). Raises one line for a
    value outside its registry, or known positives asked of a method without negatives."""
    check_choices(cfg, CONFIG_CHOICES)
    cfg = fill_auto(cfg)
    cls = METHODS[cfg.method]
    if cfg.model.sync_bn is None:
        cfg.model.sync_bn = cls.sync_bn and cfg.device == "cuda"
    for key in ("batch_positives", "mask_negatives"):
        if cfg.sepp[key] and not cls.has_negatives():
            with_negatives = ", ".join(n for n, c in METHODS.items() if c.has_negatives())
            raise SeppError(f"sepp.{key}=true needs a method with negatives ({with_negatives}); "
                            f"{cfg.method} has none")
    for name, method_cls in METHODS.items():  # null -> the constructor's default, so config.yaml shows what runs
        section = cfg.get(name)
        if section is not None:
            for key, value in hyperparameter_defaults(method_cls).items():
                if key in section and section[key] is None:
                    section[key] = value
    return cfg


def build_method(cfg) -> Method:
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


__all__ = ["METHODS", "CONFIG_CHOICES", "Method", "build_method", "resolve", "hyperparameter_defaults", "hyperparameter_names", "MoCoV2", "SimSiam", "SimCLR", "BYOL", "NNCLR"]
