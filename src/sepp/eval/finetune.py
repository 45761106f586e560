"""Semi-supervised fine-tuning (`sepp eval finetune`): the whole network plus a new linear head trained on a
fixed, class-balanced fraction of the labels; top-1 on the full evaluation split.

Protocol of SimCLR v1 (Chen et al. 2020, Appendix B.5; also VISSL's semi-supervised benchmark): SGD with
Nesterov momentum 0.9, no weight decay or other regularisation, no warm-up, learning rate
``lr x batch / 256`` with a per-step cosine decay to zero, training views = random resized crop + horizontal
flip only, the head zero-initialised (SimCLR's ``zero_init_logits_layer``), BN in training mode (trained by
:func:`sepp.eval.supervised.fit`). Epochs and learning rates per dataset are in ``FINETUNE_SETTINGS``;
ImageNet's are the paper's (60 epochs on 1 % of the labels, 30 on 10 %, lr 0.05 per 256 = 0.8 at batch 4096). For ImageNet, ``eval.label_list`` takes
SimCLR's ``1percent.txt`` / ``10percent.txt`` (one image file name a line) instead of a drawn subset.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from sepp.data.transforms import linear_train_transform
from sepp.errors import SeppError
from sepp.eval.data import eval_data, eval_input, eval_train_split
from sepp.eval.supervised import accuracy, fit, on_device, shuffled_loader
from sepp.methods.checkpoint import load_trained
from sepp.methods.optim import lr_at, scale_lr
from sepp.models.features import extract_features, labels_of

# dataset: (lr per 256 images, epochs at <= 1 % of the labels, epochs above). ImageNet: SimCLR v1, B.5.
# The other datasets have no published semi-supervised protocol for these methods; they use SimCLR's
# ImageNet values, which with a few hundred labelled images mean a few hundred steps.
FINETUNE_SETTINGS = {
    "imagenet": (0.05, 60, 30),
    "imagenette": (0.05, 60, 30),
    "cifar10": (0.05, 60, 30),
    "cifar100": (0.05, 60, 30),
    "stl10": (0.05, 60, 30),
    "imagefolder": (0.05, 60, 30),
}


def finetune_settings(dataset: str, fraction: float, lr: float = 0.0, epochs: int = 0) -> tuple[float, int]:
    """``(lr per 256 images, epochs)``: the dataset's ``FINETUNE_SETTINGS`` entry unless given (> 0)."""
    base_lr, few, many = FINETUNE_SETTINGS.get(dataset, FINETUNE_SETTINGS["imagefolder"])
    return (lr if lr > 0 else base_lr), (epochs if epochs > 0 else (few if fraction <= 0.01 + 1e-9 else many))


def label_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced ``fraction`` of the labelled rows: ``max(1, round(fraction x n_c))``
    random images of every class c (labels < 0 are never picked), drawn with ``seed``."""
    if not 0.0 < fraction <= 1.0:
        raise SeppError(f"eval.label_fraction must be in (0, 1], got {fraction}; e.g. 0.01 or 0.1")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels[labels >= 0]):
        rows = np.flatnonzero(labels == c)
        picked.append(rng.choice(rows, size=max(1, int(round(fraction * len(rows)))), replace=False))
    if not picked:
        raise SeppError("the fine-tuning split has no labels; set data.eval_train_split to a labelled split")
    return np.sort(np.concatenate(picked)).astype(np.int64)


def label_list_subset(paths: list[str], list_file: str) -> np.ndarray:
    """Sorted indices of the images named in ``list_file`` (SimCLR's ``1percent.txt`` format: one file name
    a line, matched against the base names of ``paths``)."""
    names = [ln.strip() for ln in Path(list_file).read_text().splitlines() if ln.strip()]
    where = {Path(p).name: i for i, p in enumerate(paths)}
    missing = [n for n in names if n not in where]
    if missing:
        raise SeppError(f"{len(missing)} of {len(names)} images in {list_file} are not in the training split "
                        f"(e.g. {missing[0]}); use the full ImageNet train split (data.subset=0)")
    return np.sort(np.asarray([where[n] for n in names], dtype=np.int64))


def _feature_dim(net: nn.Module, sample: torch.Tensor) -> int:
    was = net.training
    with torch.no_grad():
        dim = net.eval()(sample[None]).flatten(1).shape[1]
    net.train(was)
    return dim


def finetune(backbone: nn.Module, train_data: Dataset, test_data, num_classes: int, *, epochs: int, lr: float,
             batch_size: int = 256, device="cpu", seed: int = 0, workers: int = 0, amp: bool = True,
             max_steps: int = 0, normalize=None, eval_batch_size: int = 512) -> dict:
    """Fine-tune a copy of ``backbone`` with a zero-initialised linear head on ``train_data`` (items
    ``(augmented image, label, ...)``) and return ``{"top1", "top5", "steps", "losses", "lr"}`` on
    ``test_data`` (an eval-transformed dataset, or ``(uint8 images, labels)`` used with ``normalize``).
    ``lr`` is the actual peak rate (scale it by batch / 256 first); ``max_steps > 0`` stops early.
    ``backbone`` itself is left untouched."""
    if epochs < 1 or batch_size < 1 or len(train_data) == 0:
        raise SeppError(f"fine-tuning needs epochs >= 1, batch_size >= 1 and labelled images (got {epochs}, "
                        f"{batch_size}, {len(train_data)} images)")
    device = torch.device(device)
    cuda = device.type == "cuda"
    net = copy.deepcopy(backbone).to(device)
    head = nn.Linear(_feature_dim(net, train_data[0][0].to(device)), num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model = nn.Sequential(net, head)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=0.0)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=amp and cuda):
            return F.cross_entropy(model(x).float(), y)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        loader = shuffled_loader(train_data, batch_size, torch.Generator().manual_seed(seed), workers, cuda)
        total = epochs * len(loader) if max_steps <= 0 else min(max_steps, epochs * len(loader))
        model.train()
        losses, step = fit(loss_of, lambda: opt, lambda: on_device(loader, device), epochs, total,
                           lambda s: lr_at(s, total, 0, lr), device)
    model.eval()
    images = test_data[0] if isinstance(test_data, tuple) else test_data
    logits = extract_features(model, images, device, eval_batch_size, amp, normalize)
    result = accuracy(lambda z: z, logits, labels_of(test_data), num_classes, torch.device("cpu"))
    return {**result, "steps": step, "losses": losses, "lr": lr}


def finetune_checkpoint(checkpoint: str, overrides=(), out: str | None = None) -> dict:
    """`sepp eval finetune`: fine-tune a checkpoint's backbone as ``cfg.eval`` says, write the result JSON
    (with the labelled subset's indices) and return it."""
    method, cfg, ckpt = load_trained(checkpoint, overrides)
    ev = cfg.eval
    train = eval_data(cfg, eval_train_split(cfg), cfg.data.subset)
    test = eval_data(cfg, cfg.data.eval_split, cfg.data.eval_subset)
    if train.labels is None or test.labels is None or (test.labels < 0).any():
        raise SeppError("fine-tuning needs labelled splits; set data.eval_train_split / data.eval_split")
    if ev.label_list:
        if not hasattr(train, "paths"):
            raise SeppError("eval.label_list names image files; it works with folder datasets (imagenet)")
        idx = label_list_subset(train.paths, ev.label_list)
    else:
        idx = label_subset(train.labels, ev.label_fraction, cfg.seed)
    fraction = len(idx) / len(train) if ev.label_list else float(ev.label_fraction)
    base_lr, epochs = finetune_settings(cfg.data.name, fraction, ev.finetune_lr, ev.finetune_epochs)
    lr = scale_lr(base_lr, ev.finetune_batch_size)
    aug = train.with_transform(linear_train_transform(cfg.data.image_size, cfg.data.name))
    test_data, normalize = eval_input(test, cfg.data.image_size, cfg.data.name)
    t0 = time.time()
    res = finetune(method.backbone, Subset(aug, idx.tolist()), test_data, len(train.classes), epochs=epochs,
                   lr=lr, batch_size=ev.finetune_batch_size, device=cfg.device, seed=cfg.seed,
                   workers=cfg.data.workers, max_steps=ev.finetune_max_steps, normalize=normalize,
                   eval_batch_size=ev.batch_size)
    source = idx if train.source_indices is None else np.asarray(train.source_indices)[idx]
    result = {"checkpoint": str(checkpoint), "epoch": ckpt["epoch"], "method": cfg.method,
              "dataset": cfg.data.name, "train_split": eval_train_split(cfg), "test_split": cfg.data.eval_split,
              "finetune_top1": res["top1"], "finetune_top5": res["top5"], "label_fraction": fraction,
              "labelled_fraction": len(idx) / len(train),
              "label_list": ev.label_list, "label_seed": int(cfg.seed), "num_labels": int(len(idx)),
              "epochs": epochs, "steps": res["steps"], "lr": lr, "batch_size": ev.finetune_batch_size,
              "losses": res["losses"], "seconds": time.time() - t0,
              "label_indices": [int(i) for i in source]}  # positions in the full split
    tag = Path(ev.label_list).stem if ev.label_list else f"{100 * ev.label_fraction:g}pct"
    path = Path(out) if out else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_finetune_{tag}.json")
    path.write_text(json.dumps(result, indent=2))
    result["json"] = str(path)
    return result
