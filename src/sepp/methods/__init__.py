"""SSL methods (one short module each), their pure-function losses and the memory queue.

Every method is a :class:`sepp.methods.base.Method` (the one description of a method: its hooks, augmentation
recipe, SyncBN and negatives) built as ``cls(backbone, feat_dim, **hyperparameters)``; ``METHODS`` is the
registry. The config section of a method is derived from its constructor (:func:`sepp.config.derive_sections`).
:func:`resolve` completes a config for building a method: the machine's automatic values
(:func:`sepp.config.fill_auto`), the registry-owned choices of the layers up to this one and the constructor
defaults of the method sections.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from sepp.config import check_choices, derive_sections, fill_auto, keyword_parameters
from sepp.data.datasets import DATASETS
from sepp.data.recipes import ViewSpec, view_specs
from sepp.data.sampling import MODES
from sepp.errors import SeppError
from sepp.methods.base import Method
from sepp.methods.byol import BYOL
from sepp.methods.mocov2 import MoCoV2
from sepp.methods.nnclr import NNCLR
from sepp.methods.optim import OPTIMIZERS
from sepp.methods.simclr import SimCLR
from sepp.methods.simsiam import SimSiam
from sepp.models.backbones import BACKBONES, build_backbone

# The registry: adding a method is its module plus one line here.
METHODS: dict[str, type[Method]] = {"mocov2": MoCoV2, "simsiam": SimSiam, "simclr": SimCLR, "byol": BYOL,
                                    "nnclr": NNCLR}
DEFAULT_METHOD = "mocov2"  # `method` when a config names none
derive_sections(METHODS)  # the config sections `<name>:` with each constructor's keyword arguments
# Config keys whose values name an entry of a registry at this layer or below (the methods' own
# hyperparameter choices, ``Method.choices``, are added by :func:`resolve`).
CONFIG_CHOICES = {"method": METHODS, "data.name": DATASETS, "transfer.data.name": DATASETS,
                  "model.backbone": BACKBONES, "sepp.mode": MODES, "train.optimizer": OPTIMIZERS}


def hyperparameter_names(cls: type) -> list[str]:
    """The keyword hyperparameters a method's constructor accepts."""
    return list(keyword_parameters(cls))


def hyperparameter_defaults(cls: type) -> dict:
    """The constructor's default of every keyword hyperparameter: the one home of method defaults (the
    config's method sections are null until :func:`resolve` copies these in)."""
    return {n: p.default for n, p in keyword_parameters(cls).items() if p.default is not p.empty}


def method_choices() -> dict[str, tuple]:
    """``"<method>.<hyperparameter>" -> allowed values`` of every registered method (``Method.choices``)."""
    return {f"{name}.{key}": allowed for name, cls in METHODS.items() for key, allowed in cls.choices.items()}


def resolve(cfg):
    """A copy of ``cfg`` with every automatic value filled in (what gets saved as config.yaml): the machine's
    (:func:`sepp.config.fill_auto`), ``method`` (``DEFAULT_METHOD`` when unset), ``model.sync_bn`` (on under
    DDP on CUDA for methods whose paper synchronises BN) and each method section's nulls (the constructor's
    defaults). Raises one line for a value outside its registry, or known positives asked of a method without
    negatives."""
    check_choices(cfg, {**CONFIG_CHOICES, **method_choices()})
    cfg = fill_auto(cfg)
    if cfg.method is None:
        cfg.method = DEFAULT_METHOD
    cls = METHODS[cfg.method]
    if cfg.model.sync_bn is None:
        cfg.model.sync_bn = cls.sync_bn and cfg.device == "cuda"
    for key in ("batch_positives", "mask_negatives"):
        if cfg.sepp[key] and not cls.has_negatives:
            with_negatives = ", ".join(n for n, c in METHODS.items() if c.has_negatives)
            raise SeppError(f"sepp.{key}=true needs a method with negatives ({with_negatives}); "
                            f"{cfg.method} has none")
    for name, method_cls in METHODS.items():  # null -> the constructor's default, so config.yaml shows what runs
        section = cfg.get(name)
        if section is not None:
            for key, value in hyperparameter_defaults(method_cls).items():
                if key in section and section[key] is None:
                    section[key] = value
    return cfg


def method_view_specs(cfg) -> tuple[ViewSpec, ViewSpec]:
    """The two view distributions ``cfg.method`` trains with (its ``augmentation`` recipe) at
    ``data.image_size``."""
    return view_specs(METHODS[cfg.method].augmentation, cfg.data.image_size, cfg.data.name)


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


__all__ = ["METHODS", "DEFAULT_METHOD", "CONFIG_CHOICES", "Method", "build_method", "resolve",
           "method_view_specs", "method_choices", "hyperparameter_defaults", "hyperparameter_names", "MoCoV2",
           "SimSiam", "SimCLR", "BYOL", "NNCLR"]
