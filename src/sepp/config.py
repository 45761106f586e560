"""Configuration: a typed schema (dataclasses) merged with a YAML file and dotted ``key=value`` overrides.

Every key has a default here except the methods' hyperparameters. A method's section (``<method name>:``) is
derived from its constructor (:func:`derive_sections`, fed by ``sepp.methods``): its keys are the keyword-only
parameters, whose defaults (the papers' ImageNet values) are their one home; a ``null`` in the section means
"the constructor's value", and :func:`sepp.methods.resolve` writes that value in, so ``config.yaml`` /
``--print-config`` show what runs. YAML files under ``configs/`` set what differs per dataset and method (each
shipped CIFAR config states its method's values). An unknown key, a value of the wrong type or a value outside
its choices raises one :class:`SeppError` line naming the key and what is allowed. This module is ground: it
imports nothing of sepp but ``errors``, ``distributed`` and ``fileio``, so values that name a registry entry (a
method, dataset, backbone, ...) are checked by the registry's own layer. :func:`fill_auto` fills the
``auto``/``null`` values that depend on the machine and the data (image size, CIFAR stem, device, data root,
workers).
"""
from __future__ import annotations

import functools
import inspect
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from . import distributed as D
from .errors import SeppError
from .fileio import atomic_write

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    name: str = "cifar10"
    root: Optional[str] = None  # default: $SEPP_DATA, else ./data
    split: str = "train"
    eval_split: str = "test"  # kNN / linear test split
    eval_train_split: Optional[str] = None  # kNN memory bank and linear-probe training split (None: split)
    subset: int = 0  # N > 0: a fixed, class-balanced subset of N training images
    eval_subset: int = 0  # same for the evaluation split
    download: bool = False
    image_size: int = 0  # 0: 32 for CIFAR, 96 for STL-10, 224 for ImageFolder datasets
    workers: int = -1  # DataLoader workers; -1: min(8, cores)
    pipeline: str = "auto"  # device: uint8 dataset on the device + batched augmentation; loader: DataLoader + PIL


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    cifar_stem: Optional[bool] = None  # None: True for images <= 64 px
    # SyncBatchNorm under DDP. None: on CUDA, on for the methods whose paper synchronises BN (their class
    # attribute sync_bn; SyncBatchNorm needs a GPU), off otherwise and on CPU
    sync_bn: Optional[bool] = None
    # where the backbone's keys begin in an encoder file (train.init_backbone, run.baseline_checkpoint, sepp mine
    # --encoder), e.g. state_dict.module.encoder_q.; None: recognised (sepp.models.layouts)
    key_prefix: Optional[str] = None


@dataclass
class TrainConfig:
    epochs: int = 800
    batch_size: int = 512  # global batch (split over processes)
    optimizer: str = "sgd"  # sgd | lars
    lr: float = 0.03  # base learning rate per 256 images: lr = lr * batch_size / 256 (lr_scaling=linear)
    lr_scaling: str = "linear"  # linear | none
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # LARS (train.optimizer=lars, sepp.methods.optim.LARS): trust coefficient and solo-learn's clip_lr
    # (per-layer rate min(eta * trust, lr) instead of lr * eta * trust). Defaults: plain LARS as SimCLR/BYOL
    # use it on ImageNet; the CIFAR configs set solo-learn's 0.02 / true
    lars_eta: float = 0.001
    lars_clip_lr: bool = False
    # schedules are counted in optimizer steps: warm-up lasts warmup_epochs x (steps of one plain epoch of
    # N images), so two arms with the same total steps share the learning rate at every step
    warmup_epochs: float = 0.0
    views: int = 2  # augmented views per sample: 2, or 3 (the third is of the image itself unless
    # sepp.mode=multi gives it a semantic partner; 3 views of the image itself = the extra-view control)
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | fp32
    channels_last: bool = True  # faster on CUDA and, measured here, ~25 % faster on CPU too
    compile: bool = False
    resume: bool = False
    save_every: int = 50  # epochs between kept checkpoints (last.pt is written every epoch)
    knn_every: int = 10  # epochs between kNN monitors (0: only at the end; -1: never)
    log_every: int = 50  # steps between reads of the loss from the device
    max_steps: int = 0  # > 0: train exactly this many optimizer steps (the schedule spans them)
    stop_at_epoch: int = 0  # > 0: pause (resumably) after this epoch, e.g. to fit a job's time limit
    # start from an encoder file (any file `sepp mine --encoder` reads: a sepp checkpoint or export, a torchvision
    # state_dict, a MoCo / SimSiam / DINO / solo-learn / lightly / BYOL checkpoint, see model.key_prefix): the
    # backbone starts from it, the heads fresh unless it is a sepp checkpoint of the same method
    init_backbone: Optional[str] = None


@dataclass
class EvalConfig:
    knn_k: int = 200
    knn_t: float = 0.1
    batch_size: int = 512
    linear_epochs: int = 100
    linear_lr: float = 0.01  # per 256 images, on standardised frozen features (swept in sepp.eval.linear)
    linear_batch_size: int = 256
    linear_weight_decay: float = 0.0
    linear_precomputed: bool = True  # fast protocol only; False: crop/flip augmentation every epoch
    # standard: the MoCo/SimSiam protocol (crop + flip, plain linear head on raw features, SGD lr 30, batch 256,
    # 100 epochs; cosine on CIFAR/STL-10, steps x0.1 at 60/80 on ImageNet-style folders; see sepp.eval.linear,
    # it ignores the linear_* keys above); fast: the probe on standardised features (linear_* keys), for CPUs
    linear_protocol: str = "fast"
    # semi-supervised fine-tuning (`sepp eval finetune`, SimCLR's protocol; see sepp.eval.finetune)
    label_fraction: float = 0.1  # class-balanced fraction of the labelled training split (seeded by `seed`)
    label_list: Optional[str] = None  # ImageNet: SimCLR's 1percent.txt / 10percent.txt (one file name a line)
    # 0: the dataset's documented value (sepp.eval.finetune.FINETUNE_SETTINGS)
    finetune_epochs: int = 0
    finetune_lr: float = 0.0  # per 256 images
    finetune_batch_size: int = 256
    finetune_max_steps: int = 0  # > 0: stop after this many optimizer steps (smoke tests)
    # `sepp eval embed-plot`
    embed_algorithm: str = "auto"  # auto (umap-learn if installed, else scikit-learn's t-SNE) | umap | tsne
    embed_points: int = 5000  # class-balanced sample of the evaluation split that is drawn


@dataclass
class MineConfig:
    k: int = 5
    threshold: float = 0.0
    mutual: bool = False
    features: str = "backbone"  # backbone | projector
    backend: str = "exact"  # exact | faiss
    chunk_size: int = 4096
    precision: str = "auto"  # auto (bf16 + fp32 re-check on CUDA) | fp32 | bf16
    batch_size: int = 512
    save_embeddings: bool = False
    rank_from: int = 1  # keep neighbours at ranks rank_from..k only (1 = from the nearest; >1 skips the easiest)
    # > 0: keep only the dataset's most similar top-k pairs, about this many per image (a label-free threshold
    # at that quantile; the most precise rule measured, benchmarks/RESULTS.md 2026-12-07); 0: off
    pairs_per_image: float = 0.0
    # DIAGNOSTIC pair sources built from the labels (never a default; every output made from them says so):
    # nearest = each image's first k same-class neighbours among its oracle_candidates nearest by the encoder
    # ("perfect mining"); random = k partners per image, each same-class with probability oracle_precision
    oracle: str = "none"  # none | nearest | random
    oracle_precision: float = 1.0
    oracle_candidates: int = 50
    out: Optional[str] = None  # default: <checkpoint dir>/mining


@dataclass
class SeppConfig:
    pairs: Optional[str] = None  # pairs.npz from `sepp mine`
    mode: str = "enlarge"  # enlarge | substitute | multi (partner view as an extra positive, 3 views)
    p: float = 0.5  # substitute: probability that the second view comes from a partner
    # MoCo-v2 / SimCLR: never use as a negative a view of the anchor's own image or of a known partner
    mask_negatives: bool = False
    # MoCo-v2 / SimCLR: views of known partners in the batch (queue) are further positives of the anchor
    # (supervised-contrastive style, our extension; the paper only adds pairs as samples); implies the masks
    batch_positives: bool = False
    remine_every: int = 0  # > 0: re-mine pairs from the model being trained every E epochs


@dataclass
class RunConfig:
    # skip phase 1 and mine with this encoder file (what train.init_backbone reads); run.init=baseline starts
    # the SePP arm and the step-matched baseline from it
    baseline_checkpoint: Optional[str] = None
    baseline_epochs: int = 0  # phase-1 pretraining epochs (0: train.epochs)
    sepp_epochs: int = 0  # SePP training epochs (0: train.epochs)
    init: str = "scratch"  # scratch | baseline: the SePP model starts from random weights or phase 1
    budget: str = "steps"  # steps | epochs: how the comparison baseline is matched to the SePP model
    # evaluations of every arm: knn, linear, finetune (eval.label_fraction), transfer (transfer.data),
    # embed_plot (one picture of the first seed's arms side by side)
    evals: list[str] = field(default_factory=lambda: ["knn", "linear"])
    seeds: list[int] = field(default_factory=list)  # repeat the compared arms over these seeds ([]: [seed])
    # when the SePP arm forwards more views per step (sepp.mode=multi), also train the compute-matched
    # control: the baseline with as many views of the image itself
    control: bool = True
    # auto: a finished phase whose fingerprint (settings it read, hashes of its inputs) matches is reused, one
    # that differs runs again with its old outputs moved to out/stale/; never: every phase runs again
    reuse: str = "auto"


@dataclass
class TransferDataConfig:
    """Target dataset of `sepp eval transfer` (keys mean what they mean under data)."""

    name: str = "cifar100"
    root: Optional[str] = None  # default: data.root
    split: str = "train"
    eval_split: Optional[str] = None  # None: test (val for imagenet / imagenette)
    subset: int = 0
    eval_subset: int = 0
    image_size: int = 0  # 0: the checkpoint's data.image_size (the resolution the encoder was trained at)


@dataclass
class TransferConfig:
    """Linear transfer (Ericsson et al. 2021): L2-regularised multinomial logistic regression on frozen
    features; C (inverse penalty, as sklearn's) chosen on a held-out part of the training split, then refit on
    all of it. Grid as theirs: 45 values of C from 1e-5 to 1e6."""

    data: TransferDataConfig = field(default_factory=TransferDataConfig)
    val_fraction: float = 0.2  # random held-out part of the training split (seeded by `seed`)
    c_min: float = 1.0e-5
    c_max: float = 1.0e6
    c_steps: int = 45
    max_iter: int = 100  # L-BFGS iterations per fit (sklearn's default, which they use; warm-started along C)
    metric: str = "auto"  # auto (the dataset's convention) | top1 | mean_per_class


@dataclass
class Config:
    method: Optional[str] = None  # None: sepp.methods.DEFAULT_METHOD (filled in by sepp.methods.resolve)
    device: str = "auto"
    seed: int = 0
    out: str = "runs/default"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    sepp: SeppConfig = field(default_factory=SeppConfig)
    run: RunConfig = field(default_factory=RunConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    # the key=value overrides given on the command line (set by load_config): a record, not a setting, except
    # that re-mining (sepp.remine_every) lets a mine.* key given here win over the replaced pair file's value
    command_line: list[str] = field(default_factory=list)


# ---- sections derived from constructors (the method sections) -------------------------------------------------
# This layer cannot import the method registry (a layer up): `sepp.methods` hands it down through
# derive_sections(METHODS). A registry is read at every build, so an entry added to it later gets its section.
_DERIVED: list[Mapping[str, type]] = []
_TYPED = (int, float, bool, str)  # annotations a derived key is checked against here; others: the constructor's


def derive_sections(registry: Mapping[str, type]) -> None:
    """Give every entry ``name -> cls`` of ``registry`` a config section ``name:`` whose keys are the
    keyword-only parameters of ``cls``'s constructor, each null by default (= the constructor's default,
    written in when the registry's layer resolves the config)."""
    if all(r is not registry for r in _DERIVED):
        _DERIVED.append(registry)


def keyword_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword-only parameters of ``cls``'s constructor, in order: the keys of its derived section."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


@functools.lru_cache(maxsize=None)
def _section_schema(cls: type) -> type:
    """One optional field per keyword-only constructor parameter, typed by its annotation when that is int,
    float, bool or str."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):  # an annotation that does not evaluate: its keys stay untyped
        hints = {}
    fields = [(name, Optional[hints[name]] if hints.get(name) in _TYPED else Any, field(default=None))
              for name in keyword_parameters(cls)]
    return make_dataclass(f"{cls.__name__}Section", fields)


def _schema() -> DictConfig:
    """The schema: :class:`Config` plus the derived sections."""
    schema = OmegaConf.structured(Config)
    with open_dict(schema):
        for registry in _DERIVED:
            for name, cls in registry.items():
                schema[name] = OmegaConf.structured(_section_schema(cls))
    return schema


# Values this schema owns. Values that name an entry of a registry (method, dataset, backbone, pair mode,
# optimizer, MoCo BN mode, mining backend/precision/oracle, linear protocol, embedding algorithm) are checked
# against the registry itself by the layer that owns it (`sepp.methods.resolve`, `sepp.engine.setup.resolve`).
CHOICES: dict[str, tuple[Any, ...]] = {
    "transfer.metric": ("auto", "top1", "mean_per_class"),
    "device": ("auto", "cpu", "cuda"),
    "data.pipeline": ("auto", "device", "loader"),
    "train.lr_scaling": ("linear", "none"),
    "train.amp": ("auto", "bf16", "fp32"),
    "mine.features": ("backbone", "projector"),
    "train.views": (2, 3),
    "run.init": ("scratch", "baseline"),
    "run.budget": ("steps", "epochs"),
    "run.reuse": ("auto", "never"),
}
POSITIVE = ("train.epochs", "train.batch_size", "eval.knn_k", "eval.batch_size", "mine.k", "mine.chunk_size",
            "mine.rank_from", "mine.oracle_candidates",
            "mine.batch_size", "eval.linear_batch_size", "eval.linear_epochs")
NON_NEGATIVE = ("data.subset", "data.eval_subset", "train.lr", "train.weight_decay", "train.warmup_epochs",
                "train.lars_eta",
                "train.max_steps", "train.stop_at_epoch", "mine.pairs_per_image", "sepp.remine_every", "run.baseline_epochs", "run.sepp_epochs")


def _one_line(exc: OmegaConfBaseException) -> str:
    msg = str(exc).strip().splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"{key}: {msg}" if key and key not in msg else msg


def _valid_keys(schema: DictConfig, dotted: str) -> str:
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = OmegaConf.select(schema, parent) if parent else schema
    if not isinstance(node, DictConfig):
        node = schema
        parent = ""
    keys = ", ".join(sorted(str(k) for k in node.keys()))
    return f"valid keys{' under ' + parent if parent else ''}: {keys}"


def _read_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    """A YAML file, with an optional ``base: other.yaml`` (relative to the file) merged underneath."""
    if path in seen:
        raise SeppError(f"config {path} includes itself through 'base'; remove the cycle")
    try:
        cfg = OmegaConf.load(path)
    except OmegaConfBaseException as exc:
        raise SeppError(f"cannot parse config {path}: {_one_line(exc)}") from None
    except Exception as exc:  # yaml.YAMLError and friends
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SeppError(f"cannot parse config {path}: {first}") from None
    if not isinstance(cfg, DictConfig):
        raise SeppError(f"config {path} must be a YAML mapping of keys to values")
    base = cfg.pop("base", None)
    if base is None:
        return cfg
    return OmegaConf.merge(_read_yaml(find_config(str(base), relative_to=path.parent), seen + (path,)), cfg)


def find_config(name: str, relative_to: Optional[Path] = None) -> Path:
    """A config path as given, relative to another config, or a name shipped in the package."""
    candidates = [Path(name)]
    if relative_to is not None:
        candidates.insert(0, relative_to / name)
    stem = name if name.endswith((".yaml", ".yml")) else name + ".yaml"
    candidates += [PACKAGE_CONFIGS / stem, PACKAGE_CONFIGS / "experiments" / stem]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(p.stem for p in PACKAGE_CONFIGS.rglob("*.yaml"))
    raise SeppError(f"config {name!r} not found; give a YAML path or one of: {', '.join(shipped)}")


def parse_overrides(overrides: list[str]) -> DictConfig:
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise SeppError(f"override {bad[0]!r} is not key=value (e.g. train.epochs=10)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as exc:
        raise SeppError(f"bad override: {_one_line(exc)}") from None


def build_config(*sources: Any) -> DictConfig:
    """Merge sources (dicts, DictConfigs, YAML paths) over the schema defaults, then validate."""
    schema = _schema()
    cfg = schema
    for src in sources:
        if src is None:
            continue
        if isinstance(src, (str, Path)):
            src = _read_yaml(find_config(str(src)))
        try:
            cfg = OmegaConf.merge(cfg, src)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", "") or ""
            if "not in struct" in str(exc) or "Key '" in str(exc) and "not" in str(exc):
                hint = "" if _DERIVED else " (method sections exist once sepp.methods is imported)"
                raise SeppError(f"unknown config key {key!r}; {_valid_keys(schema, key)}{hint}") from None
            first = str(exc).strip().splitlines()[0]
            raise SeppError(f"bad value for {key or 'config'}: {first}") from None
    validate(cfg)
    return cfg


def load_config(path: Optional[str], overrides: list[str] = ()) -> DictConfig:
    cfg = build_config(path, parse_overrides(list(overrides)))
    cfg.command_line = [str(o) for o in overrides]
    return cfg


def validate(cfg: DictConfig) -> None:
    check_choices(cfg, CHOICES)
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) <= 0:
            raise SeppError(f"{key} must be > 0 (got {OmegaConf.select(cfg, key)})")
    for key in NON_NEGATIVE:
        if OmegaConf.select(cfg, key) < 0:
            raise SeppError(f"{key} must be >= 0 (got {OmegaConf.select(cfg, key)})")
    if not 0.0 <= cfg.sepp.p <= 1.0:
        raise SeppError(f"sepp.p must be in [0, 1] (got {cfg.sepp.p})")
    if not -1.0 <= cfg.mine.threshold <= 1.0:
        raise SeppError(f"mine.threshold is a cosine similarity and must be in [-1, 1] (got {cfg.mine.threshold})")
    if not 0.0 <= cfg.mine.oracle_precision <= 1.0:
        raise SeppError(f"mine.oracle_precision must be in [0, 1] (got {cfg.mine.oracle_precision})")
    if cfg.mine.rank_from > cfg.mine.k:
        raise SeppError(f"mine.rank_from={cfg.mine.rank_from} is beyond mine.k={cfg.mine.k}; "
                        "keep rank_from <= k")


def check_choices(cfg: DictConfig, choices: dict[str, Any]) -> None:
    """Raise one line for the first ``key`` whose value is not among ``choices[key]`` (any container of
    allowed values: a tuple, or a registry's dict); ``null`` is left alone (a default filled in later); a list
    value is checked item by item."""
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        for item in (value if isinstance(value, (list, ListConfig)) else [value]):
            if item is not None and item not in allowed:
                what = f"{key} has {item!r}" if item is not value else f"{key}={value!r} is not valid"
                raise SeppError(f"{what}; choose one of: {', '.join(map(str, allowed))}")


DEFAULT_SIZES = {"cifar10": 32, "cifar100": 32, "stl10": 96}


def fill_auto(cfg: DictConfig) -> DictConfig:
    """A copy with the automatic values that depend on the machine and the data filled in (data root, image
    size, CIFAR stem, device, workers, amp, views). The method's defaults and the registry-owned choices are
    resolved a layer up: :func:`sepp.methods.resolve` (and :func:`sepp.engine.setup.resolve` for runs)."""
    import torch

    cfg = cfg.copy()
    if cfg.data.root is None:
        cfg.data.root = os.environ.get("SEPP_DATA", "./data")
    if cfg.data.image_size == 0:
        cfg.data.image_size = DEFAULT_SIZES.get(cfg.data.name, 224)
    if cfg.model.cifar_stem is None:
        cfg.model.cifar_stem = cfg.data.image_size <= 64
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif cfg.device == "cuda" and not torch.cuda.is_available():
        raise SeppError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if cfg.data.workers < 0:
        cfg.data.workers = min(8, os.cpu_count() or 1)
    if cfg.train.amp == "auto":
        cfg.train.amp = "bf16" if cfg.device == "cuda" else "fp32"
    if cfg.sepp.mode == "multi" and cfg.sepp.pairs:
        cfg.train.views = 3  # the anchor's two views and one view of a semantic partner
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def write_config(cfg: DictConfig, folder: str | os.PathLike) -> Path:
    """Write ``folder/config.yaml`` (:func:`to_yaml`), creating ``folder``; only the main process writes.
    Returns the path."""
    path = Path(folder) / "config.yaml"
    if D.is_main():
        atomic_write(path, lambda f: f.write(to_yaml(cfg).encode()))
    return path
