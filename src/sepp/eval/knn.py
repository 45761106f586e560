"""Weighted kNN classifier on frozen features (Wu et al. 2018, InstDisc; the MoCo CIFAR-10 demo).

Features are L2-normalised, each test row votes with its k most cosine-similar training rows, a neighbour
weighted by exp(sim / t); the class with the largest summed weight wins. k=200, t=0.1 are InstDisc's values.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sepp.errors import SeppError
from sepp.eval.data import eval_input, eval_splits, features
from sepp.models.features import features_of, labels_of

# Cap on the [rows, N_train] similarity block, so memory stays bounded whatever ``chunk`` and N are.
_MAX_BLOCK_ELEMENTS = 1 << 27


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise SeppError(f"{what} labels must lie in [0, {num_classes}), got range "
                        f"[{int(labels.min())}, {int(labels.max())}]; use a labelled split")


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Predicted class (int64 [N_test], on the CPU) of every test row.

    Runs on ``device`` (default: that of ``train_feats``) in ``chunk``-row blocks of test features; k larger
    than the training set uses every training row. Ties go to the lowest class index.
    """
    if train_feats.shape[0] != train_labels.shape[0]:
        raise SeppError(f"{train_feats.shape[0]} training features but {train_labels.shape[0]} labels; "
                        "pass one label per training row")
    if train_feats.shape[0] == 0:
        raise SeppError("kNN needs at least one training feature; check the training split")
    if k < 1 or t <= 0:
        raise SeppError(f"kNN needs k >= 1 and t > 0, got k={k}, t={t}; fix eval.knn_k / eval.knn_t")
    device = torch.device(device) if device is not None else train_feats.device
    train_labels = torch.as_tensor(train_labels, dtype=torch.int64)
    _check_labels(train_labels, num_classes, "training")
    bank = F.normalize(train_feats.to(device, torch.float32), dim=1)
    bank_labels = train_labels.to(device)
    n = bank.shape[0]
    k = min(k, n)
    rows = max(1, min(chunk, _MAX_BLOCK_ELEMENTS // n))
    preds = []
    for s in range(0, test_feats.shape[0], rows):
        q = F.normalize(test_feats[s:s + rows].to(device, torch.float32), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        scores = torch.zeros(q.shape[0], num_classes, device=device)
        # Shifting by the row's top similarity rescales a row's scores without changing the argmax, and keeps
        # exp() finite for small t (e^(1/0.01) overflows float32).
        scores.scatter_add_(1, bank_labels[idx], ((sim - sim[:, :1]) / t).exp())
        preds.append(scores.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(preds).cpu()


def knn_top1(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier, in percent."""
    test_labels = torch.as_tensor(test_labels, dtype=torch.int64)
    if test_labels.shape[0] != test_feats.shape[0] or test_labels.numel() == 0:
        raise SeppError(f"{test_feats.shape[0]} test features but {test_labels.shape[0]} labels; "
                        "pass one label per test row (and at least one)")
    pred = knn_predict(train_feats, train_labels, test_feats, num_classes, k, t, chunk, device)
    return 100.0 * (pred == test_labels).float().mean().item()


def evaluate_knn(
    backbone: nn.Module,
    train_data,
    test_data,
    device: torch.device | str,
    k: int = 200,
    t: float = 0.1,
    batch_size: int = 512,
    num_classes: int | None = None,
    normalize: Callable | None = None,
    amp: bool = True,
    workers: int = 0,
) -> float:
    """kNN top-1 (percent) of a backbone: train/test data are eval-transformed datasets, or
    ``(uint8 images [N,3,H,W], labels)`` pairs used with ``normalize``. Unlabelled training images (label
    -1, e.g. STL-10's unlabeled split) are left out of the memory bank. Classes default to max label + 1."""
    train_labels, test_labels = labels_of(train_data), labels_of(test_data)
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    train_feats = features_of(backbone, train_data, device, batch_size, amp, normalize, workers)
    test_feats = features_of(backbone, test_data, device, batch_size, amp, normalize, workers)
    keep = train_labels >= 0
    return knn_top1(train_feats[keep], train_labels[keep], test_feats, test_labels, num_classes, k, t,
                    device=device)


def knn_eval(backbone: nn.Module, cfg, device: torch.device | str, cache: dict | None = None,
             memo: dict | None = None) -> float:
    """Weighted kNN top-1 of ``backbone`` on the evaluation splits of ``cfg`` (``eval.knn_k``, ``eval.knn_t``):
    the one kNN entry of the training monitor, ``sepp eval knn`` and ``sepp run``. ``cache`` keeps the splits
    (in-memory images on the device) between the monitor's calls; ``memo`` (one frozen backbone's features,
    see :func:`sepp.eval.data.features`) shares the extracted features with the other evaluations."""
    if memo is not None:
        train, test = eval_splits(cfg)
        ftr, fte = (features(backbone, ds, cfg, device, memo) for ds in (train, test))
        ytr = labels_of(train)
        keep = ytr >= 0
        return knn_top1(ftr[keep], ytr[keep], fte, labels_of(test), len(train.classes), cfg.eval.knn_k,
                        cfg.eval.knn_t, device=device)
    cache = {} if cache is None else cache
    if "knn" not in cache:
        train, test = eval_splits(cfg)
        inputs = [eval_input(ds, cfg.data.image_size, cfg.data.name, device) for ds in (train, test)]
        cache["knn"] = inputs, len(train.classes)
    ((train_data, norm_train), (test_data, norm_test)), num_classes = cache["knn"]
    return evaluate_knn(backbone, train_data, test_data, device, k=cfg.eval.knn_k, t=cfg.eval.knn_t,
                        batch_size=cfg.eval.batch_size, num_classes=num_classes, normalize=norm_train or norm_test)
