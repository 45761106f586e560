"""Linear probe on a frozen backbone.

``eval.linear_protocol`` picks one of two named protocols (``linear_probe`` dispatches):

- ``standard``: the MoCo / SimSiam linear evaluation (facebookresearch/moco ``main_lincls.py``, used for the
  published MoCo-v2 / SimSiam / solo-learn-style comparisons): frozen backbone in eval mode, a plain linear
  head (no BN) on the raw pooled features, SGD momentum 0.9, lr 30, batch 256, no weight decay, 100 epochs,
  random-resized-crop + flip on the training images every epoch, un-augmented test images. Schedule:
  ImageNet-style folders (imagenet, imagenette, imagefolder) lr x0.1 at epochs 60 and 80 (main_lincls
  default); CIFAR / STL-10 a per-step cosine (main_lincls ``--cos``, what CIFAR reproductions use). Fixed by
  name: the ``eval.linear_*`` keys do not change it. Default in configs/experiments/* and imagenet_*.yaml.
- ``fast`` (the schema default, for CPU runs and the demo): the ``eval.linear_*`` keys, on features
  standardised with the training set's per-dimension mean/std (a non-affine BatchNorm with population
  statistics in front of the linear layer, as MAE's probe has ``BatchNorm1d(affine=False)`` there). With
  ``eval.linear_precomputed`` (default) the features are computed once, un-augmented (``train_linear``: an
  epoch is a few matmuls); otherwise every epoch embeds freshly cropped and flipped training images and the
  head has a ``BatchNorm1d(affine=False)`` in front (``train_linear_augmented``).

Both forms train with :func:`sepp.eval.supervised.fit`: SGD (momentum 0.9), a per-step cosine to zero
(:func:`sepp.methods.optim.lr_at`) unless milestones are given, a head initialised N(0, 0.01), bias 0 (as
MoCo/MAE do). The fast protocol's default rate, ``BASE_LR`` x batch / 256, was chosen by a sweep on
standardised features (benchmarks/RESULTS.md, "Linear probe learning rate"): MoCo's lr 30 suits raw pooled
features, whose scale is tiny, and is far too large once every input dimension has unit variance.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sepp.data.transforms import linear_train_transform
from sepp.errors import SeppError
from sepp.eval.supervised import accuracy, fit, linear_head, on_device, shuffled_loader
from sepp.methods.optim import lr_at, scale_lr
from sepp.models.features import features_of, labels_of

BASE_LR = 0.01  # per 256 samples in a batch, on standardised features (benchmarks/RESULTS.md)

# the standard (MoCo / SimSiam) protocol
PROTOCOLS = ("standard", "fast")  # eval.linear_protocol
STANDARD = {"lr": 30.0, "epochs": 100, "batch_size": 256, "weight_decay": 0.0}
STEP_SCHEDULE_DATASETS = ("imagenet", "imagenette", "imagefolder")  # main_lincls: x0.1 at 60 and 80
STANDARD_MILESTONES = (60, 80)


def standard_protocol(dataset: str) -> dict:
    """Settings of the standard protocol on ``dataset`` (``data.name``): keyword arguments of
    ``train_linear_augmented``."""
    milestones = STANDARD_MILESTONES if dataset in STEP_SCHEDULE_DATASETS else None
    return {**STANDARD, "milestones": milestones, "head_bn": False}


def default_lr(batch_size: int) -> float:
    return scale_lr(BASE_LR, batch_size)


def milestone_rate(lr: float, step: int, steps_per_epoch: int, milestones) -> float:
    """main_lincls's step schedule: ``lr`` x0.1 for every milestone epoch that ``step`` has reached."""
    epoch = step // max(steps_per_epoch, 1)
    return lr * 0.1 ** sum(epoch >= m for m in milestones)


def _check_sizes(epochs: int, batch_size: int) -> None:
    if epochs < 1 or batch_size < 1:
        raise SeppError(f"linear probe needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")


def _check(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
        raise SeppError(f"{feats.shape[0]} {what} features but {labels.shape[0]} labels; pass one label per "
                        "row (and at least one row)")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise SeppError(f"{what} labels must lie in [0, {num_classes}), got range [{int(labels.min())}, "
                        f"{int(labels.max())}]; use a labelled split")
    return labels


def train_linear(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float | None = None,
                 batch_size: int = 256, weight_decay: float = 0.0, device: torch.device | str = "cpu",
                 seed: int = 0) -> dict:
    """Linear probe on precomputed features, standardised with the training features' mean/std; returns
    ``{"top1", "top5", "losses", "lr", "epochs"}`` (accuracies in percent on the test features, ``losses``
    the mean training loss of each epoch). ``lr`` defaults to ``default_lr(batch_size)``. Deterministic given
    ``seed`` on the CPU."""
    _check_sizes(epochs, batch_size)
    device = torch.device(device)
    lr = default_lr(batch_size) if lr is None else lr
    train_labels = _check(train_feats, train_labels, num_classes, "training")
    test_labels = _check(test_feats, test_labels, num_classes, "test")
    x, y = train_feats.to(device, torch.float32), train_labels.to(device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)  # constant dimensions (dead ReLUs) stay zero
    x = (x - mean) / std
    g = torch.Generator().manual_seed(seed)
    head = linear_head(x.shape[1], num_classes, g).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x.shape[0]
    total = epochs * math.ceil(n / batch_size)

    def batches():
        perm = torch.randperm(n, generator=g).to(device)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            yield x[idx], y[idx]

    losses, _ = fit(lambda f, t: F.cross_entropy(head(f), t), lambda: opt, batches, epochs, total,
                    lambda step: lr_at(step, total, 0, lr), device)
    result = accuracy(lambda f: head((f - mean) / std), test_feats, test_labels, num_classes, device)
    return {**result, "losses": losses, "lr": lr, "epochs": epochs}


class _Probe:
    """The augmented probe's head, built at the first batch (when the feature dimension is known):
    ``[BatchNorm1d(affine=False)] + linear_head``, with its SGD optimizer."""

    def __init__(self, num_classes: int, head_bn: bool, generator: torch.Generator, lr: float,
                 weight_decay: float, device: torch.device):
        self.num_classes, self.head_bn, self.generator, self.device = num_classes, head_bn, generator, device
        self.lr, self.weight_decay = lr, weight_decay
        self.head: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None

    def loss(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            layers = [nn.BatchNorm1d(f.shape[1], affine=False)] if self.head_bn else []
            self.head = nn.Sequential(*layers, linear_head(f.shape[1], self.num_classes, self.generator))
            self.head.to(self.device)
            self.opt = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=0.9,
                                       weight_decay=self.weight_decay)
        return F.cross_entropy(self.head(f), y)

    def optimizer(self) -> torch.optim.Optimizer:
        return self.opt


def frozen_features(backbone: nn.Module, loader, device: torch.device, amp: bool):
    """``(pooled float32 features, labels)`` of every batch of ``loader``, without gradient (on CUDA:
    channels_last input, bf16 autocast with ``amp``)."""
    cuda = device.type == "cuda"
    for x, y in on_device(loader, device):
        with torch.no_grad():
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and cuda):
                f = backbone(x)
            f = f.flatten(1).float()
        yield f, y


def train_linear_augmented(backbone: nn.Module, train_dataset: Dataset, test_data, num_classes: int,
                           epochs: int = 100, lr: float | None = None, batch_size: int = 256,
                           device: torch.device | str = "cpu", weight_decay: float = 0.0, seed: int = 0,
                           workers: int = 0, amp: bool = True, normalize: Callable | None = None,
                           eval_batch_size: int = 512, head_bn: bool = True,
                           milestones: tuple | None = None) -> dict:
    """Linear probe on augmented images: ``train_dataset`` must already apply the random-resized-crop + flip
    training transform; ``test_data`` is an eval-transformed dataset or an ``(uint8 images, labels)`` pair
    used with ``normalize``. ``head_bn``: a ``BatchNorm1d(affine=False)`` in front of the linear layer (the
    fast form; the standard protocol has none); ``milestones``: lr x0.1 at these epochs instead of the per-step
    cosine. Same return dict as ``train_linear``. The backbone is frozen and kept in eval mode (its mode is
    restored afterwards). Deterministic given ``seed`` on the CPU with any ``workers``."""
    _check_sizes(epochs, batch_size)
    device = torch.device(device)
    lr = default_lr(batch_size) if lr is None else lr
    _check_training_labels(labels_of(train_dataset), num_classes)  # fail early on unlabelled data
    test_feats = features_of(backbone, test_data, device, eval_batch_size, amp, normalize, workers)
    test_labels = _check(test_feats, labels_of(test_data), num_classes, "test")
    g = torch.Generator().manual_seed(seed)
    probe = _Probe(num_classes, head_bn, g, lr, weight_decay, device)
    was_training = backbone.training
    backbone.to(device).eval()
    # With workers=0 the transforms draw from the global RNG: seed a forked copy so runs repeat and the
    # caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = shuffled_loader(train_dataset, batch_size, g, workers, device.type == "cuda", workers > 0)
        total = epochs * len(loader)
        rate = ((lambda step: lr_at(step, total, 0, lr)) if milestones is None
                else (lambda step: milestone_rate(lr, step, len(loader), milestones)))
        try:
            losses, _ = fit(probe.loss, probe.optimizer, lambda: frozen_features(backbone, loader, device, amp),
                            epochs, total, rate, device)
        finally:
            backbone.train(was_training)
    probe.head.eval()
    result = accuracy(probe.head, test_feats, test_labels, num_classes, device)
    return {**result, "losses": losses, "lr": lr, "epochs": epochs}


def _check_training_labels(labels: torch.Tensor, num_classes: int) -> None:
    if labels.numel() == 0:
        raise SeppError("the linear-probe training set is empty; check the data split and subset")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise SeppError(f"training labels must lie in [0, {num_classes}); use a labelled split")


def linear_probe(backbone: nn.Module, cfg, train, test, device, features: Callable) -> dict:
    """The linear evaluation ``cfg.eval.linear_protocol`` names, on labelled datasets ``train`` / ``test``
    (eval-transformed; ``features(backbone, ds)`` embeds one). Returns ``train_linear``'s dict plus
    ``protocol``."""
    keep = torch.as_tensor(train.labels >= 0)
    ytr = torch.as_tensor(train.labels)[keep]
    yte = torch.as_tensor(test.labels)
    num_classes = len(train.classes)
    protocol = cfg.eval.get("linear_protocol", "fast")
    if protocol not in PROTOCOLS:
        raise SeppError(f"eval.linear_protocol={protocol!r} is not valid; choose one of: {', '.join(PROTOCOLS)}")
    if protocol == "standard":
        aug = train.with_transform(linear_train_transform(cfg.data.image_size, cfg.data.name))
        res = train_linear_augmented(backbone, aug, test, num_classes=num_classes, device=device, seed=cfg.seed,
                                     workers=int(cfg.data.workers), **standard_protocol(cfg.data.name))
        return {**res, "protocol": protocol}
    common = dict(num_classes=num_classes, epochs=cfg.eval.linear_epochs,
                  lr=scale_lr(cfg.eval.linear_lr, cfg.eval.linear_batch_size),
                  batch_size=cfg.eval.linear_batch_size,
                  weight_decay=cfg.eval.linear_weight_decay, device=device, seed=cfg.seed)
    if cfg.eval.linear_precomputed:
        res = train_linear(features(backbone, train)[keep], ytr, features(backbone, test), yte, **common)
    else:
        aug = train.with_transform(linear_train_transform(cfg.data.image_size, cfg.data.name))
        res = train_linear_augmented(backbone, aug, test, **common)
    return {**res, "protocol": protocol}
