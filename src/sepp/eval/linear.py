"""Linear probe on a frozen backbone.

``eval.linear_protocol`` picks one of two named protocols (``linear_probe`` dispatches):

- ``standard``: the MoCo / SimSiam linear evaluation (facebookresearch/moco ``main_lincls.py``, used for the
  published MoCo-v2 / SimSiam / solo-learn-style comparisons): frozen backbone in eval mode, a plain linear
  head (no BN) on the raw pooled features, initialised N(0, 0.01), SGD momentum 0.9, lr 30, batch 256, no weight
  decay, 100 epochs, random-resized-crop + flip on the training images every epoch, un-augmented test images.
  Schedule: ImageNet-style folders (imagenet, imagenette, imagefolder) lr x0.1 at epochs 60 and 80 (main_lincls
  default); CIFAR / STL-10 a per-step cosine (main_lincls ``--cos``, what CIFAR reproductions use). Fixed by
  name: the ``eval.linear_*`` keys do not change it. Default in configs/experiments/* and imagenet_*.yaml.
- ``fast`` (the schema default, for CPU runs and the demo): the ``eval.linear_*`` keys below.

The fast protocol's two forms:
- ``train_linear``: on precomputed (un-augmented) features. Features are standardised with the training set's
  per-dimension mean/std, i.e. a non-affine BatchNorm with population statistics in front of the linear layer
  (MAE's linear probe puts ``BatchNorm1d(affine=False)`` there). Fast: an epoch is a few matmuls.
- ``train_linear_augmented``: the standard protocol (MoCo/SimSiam linear eval): every epoch the training
  images are freshly random-resized-cropped and flipped by the dataset's transform, the frozen backbone (eval
  mode) embeds them, and a ``BatchNorm1d(affine=False)`` + linear head is trained on that; test features are
  the un-augmented ones.

Both use SGD (momentum 0.9), a per-step cosine learning-rate schedule to zero, no weight decay, 100 epochs
(MoCo's linear eval recipe) and a head initialised N(0, 0.01), bias 0 (as MoCo/MAE do). MoCo's lr 30 suits
raw pooled features, whose scale is tiny; after standardisation every input dimension has unit variance and
a far smaller lr is right. Default: 0.01 x batch_size / 256, chosen by a sweep (lr 0.001-30, batch 256,
seed 0) on standardised features:
- Gaussian classes in 64-d, 4k train, 30 epochs: 84.4 % at 0.01, 83.9 % at 0.1, 81.8 % at 30;
- ReLU random projections of CIFAR-10 pixels to 512-d, 40k train, 30 epochs: 43.6 % at 0.01, 43.2 % at 0.1,
  37.1 % at 30; 8k train, 100 epochs: 43.7 % at 0.003, 42.6 % at 0.01, 41.0 % at 0.1;
- raw CIFAR-10 pixels, 8k train, 30 epochs: 37.5 % at 0.01, 30.6 % at 0.1.
0.01 was best or within about a point everywhere; larger rates lose most on correlated (ill-conditioned) or
small training sets, where the smaller step also acts as early stopping.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sepp.data.transforms import linear_train_transform
from sepp.errors import SeppError
from sepp.models.features import features_of, labels_of

BASE_LR = 0.01  # per 256 samples in a batch

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
    return BASE_LR * batch_size / 256


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


def _factor(step: int, total: int, steps_per_epoch: int, milestones) -> float:
    """Learning-rate factor at ``step``: per-step cosine, or x0.1 per milestone epoch passed."""
    if milestones is None:
        return _cosine(step, total)
    epoch = step // max(steps_per_epoch, 1)
    return 0.1 ** sum(epoch >= m for m in milestones)


def _head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(num_classes, dim, generator=generator) * 0.01)
        head.bias.zero_()
    return head


def _check(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, what: str) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if feats.shape[0] != labels.shape[0] or feats.shape[0] == 0:
        raise SeppError(f"{feats.shape[0]} {what} features but {labels.shape[0]} labels; pass one label per "
                        "row (and at least one row)")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise SeppError(f"{what} labels must lie in [0, {num_classes}), got range [{int(labels.min())}, "
                        f"{int(labels.max())}]; use a labelled split")
    return labels


@torch.no_grad()
def accuracy(model: Callable[[torch.Tensor], torch.Tensor], feats: torch.Tensor, labels: torch.Tensor,
             num_classes: int, device: torch.device, batch_size: int = 4096) -> dict[str, float | None]:
    """Top-1 and top-5 (None with fewer than 5 classes) accuracy in percent of ``model`` on features."""
    hits1 = torch.zeros((), dtype=torch.int64, device=device)
    hits5 = torch.zeros((), dtype=torch.int64, device=device)
    for s in range(0, feats.shape[0], batch_size):
        logits = model(feats[s:s + batch_size].to(device, torch.float32))
        y = labels[s:s + batch_size].to(device)
        top = logits.topk(min(5, num_classes), dim=1).indices
        hits1 += (top[:, 0] == y).sum()
        hits5 += (top == y[:, None]).any(dim=1).sum()
    n = feats.shape[0]
    return {"top1": 100.0 * hits1.item() / n, "top5": 100.0 * hits5.item() / n if num_classes >= 5 else None}


def train_linear(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float | None = None,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict:
    """Linear probe on precomputed features; returns ``{"top1", "top5", "losses", "lr", "epochs"}``
    (accuracies in percent on the test features, ``losses`` the mean training loss of each epoch).
    ``lr`` defaults to ``default_lr(batch_size)``. Deterministic given ``seed`` on the CPU."""
    if epochs < 1 or batch_size < 1:
        raise SeppError(f"linear probe needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    device = torch.device(device)
    lr = default_lr(batch_size) if lr is None else lr
    train_labels = _check(train_feats, train_labels, num_classes, "training")
    test_labels = _check(test_feats, test_labels, num_classes, "test")
    x = train_feats.to(device, torch.float32)
    y = train_labels.to(device)
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)  # constant dimensions (dead ReLUs) stay zero
    x = (x - mean) / std

    g = torch.Generator().manual_seed(seed)
    head = _head(x.shape[1], num_classes, g).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    losses = []
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).to(device)
        loss_sum = torch.zeros((), device=device)
        for s in range(0, n, batch_size):
            idx = perm[s:s + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * _cosine(step, total)
            loss = F.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * idx.shape[0]
            step += 1
        losses.append(loss_sum.item() / n)

    def model(f: torch.Tensor) -> torch.Tensor:
        return head((f - mean) / std)

    result = accuracy(model, test_feats, test_labels, num_classes, device)
    return {**result, "losses": losses, "lr": lr, "epochs": epochs}


def train_linear_augmented(
    backbone: nn.Module,
    train_dataset: Dataset,
    test_data,
    num_classes: int,
    epochs: int = 100,
    lr: float | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    weight_decay: float = 0.0,
    seed: int = 0,
    workers: int = 0,
    amp: bool = True,
    normalize: Callable | None = None,
    eval_batch_size: int = 512,
    head_bn: bool = True,
    milestones: tuple | None = None,
) -> dict:
    """Linear probe on augmented images: ``train_dataset`` must already apply the random-resized-crop + flip
    training transform; ``test_data`` is an eval-transformed dataset or an ``(uint8 images, labels)`` pair
    used with ``normalize``. ``head_bn``: a ``BatchNorm1d(affine=False)`` in front of the linear layer (the
    fast form; the standard protocol has none); ``milestones``: lr x0.1 at these epochs instead of the per-step
    cosine. Same return dict as ``train_linear``. The backbone is frozen and kept in eval
    mode (its mode is restored afterwards). Deterministic given ``seed`` on the CPU with any ``workers``."""
    if epochs < 1 or batch_size < 1:
        raise SeppError(f"linear probe needs epochs >= 1 and batch_size >= 1, got {epochs}, {batch_size}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    lr = default_lr(batch_size) if lr is None else lr
    train_labels = labels_of(train_dataset)  # fail early on unlabelled data
    if train_labels.numel() == 0:
        raise SeppError("the linear-probe training set is empty; check the data split and subset")
    if int(train_labels.min()) < 0 or int(train_labels.max()) >= num_classes:
        raise SeppError(f"training labels must lie in [0, {num_classes}); use a labelled split")
    test_feats = features_of(backbone, test_data, device, eval_batch_size, amp, normalize, workers)
    test_labels = _check(test_feats, labels_of(test_data), num_classes, "test")

    g = torch.Generator().manual_seed(seed)
    was_training = backbone.training
    backbone.to(device).eval()
    head = None
    losses: list[float] = []
    # With workers=0 the transforms draw from the global RNG: seed a forked copy so runs repeat and the
    # caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                            pin_memory=cuda, generator=g,
                            # BatchNorm cannot train on a final batch of one sample
                            drop_last=len(train_dataset) >= batch_size,
                            persistent_workers=workers > 0)
        total = epochs * len(loader)
        step = 0
        try:
            for _ in range(epochs):
                loss_sum = torch.zeros((), device=device)
                seen = 0
                for batch in loader:
                    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
                    with torch.no_grad():
                        if cuda:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and cuda):
                            f = backbone(x)
                        f = f.flatten(1).float()
                    if head is None:
                        layers = [nn.BatchNorm1d(f.shape[1], affine=False)] if head_bn else []
                        head = nn.Sequential(*layers, _head(f.shape[1], num_classes, g)).to(device)
                        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9,
                                              weight_decay=weight_decay)
                    for group in opt.param_groups:
                        group["lr"] = lr * _factor(step, total, len(loader), milestones)
                    loss = F.cross_entropy(head(f), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss_sum += loss.detach() * y.shape[0]
                    seen += y.shape[0]
                    step += 1
                losses.append(loss_sum.item() / max(seen, 1))
        finally:
            backbone.train(was_training)
    head.eval()
    result = accuracy(head, test_feats, test_labels, num_classes, device)
    return {**result, "losses": losses, "lr": lr, "epochs": epochs}


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
                  lr=cfg.eval.linear_lr * cfg.eval.linear_batch_size / 256, batch_size=cfg.eval.linear_batch_size,
                  weight_decay=cfg.eval.linear_weight_decay, device=device, seed=cfg.seed)
    if cfg.eval.linear_precomputed:
        res = train_linear(features(backbone, train)[keep], ytr, features(backbone, test), yte, **common)
    else:
        aug = train.with_transform(linear_train_transform(cfg.data.image_size, cfg.data.name))
        res = train_linear_augmented(backbone, aug, test, **common)
    return {**res, "protocol": protocol}
