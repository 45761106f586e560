"""Linear transfer evaluation (`sepp eval transfer`), the protocol of Ericsson, Gouk & Hospedales, "How well
do self-supervised models transfer?" (CVPR 2021; linusericsson/ssl-transfer ``linear.py``).

The frozen backbone (eval mode) embeds the un-augmented images of another dataset (resized and centre-cropped
to the encoder's resolution, normalised as during pretraining). An L2-regularised multinomial logistic
regression -- sklearn's ``LogisticRegression(multinomial, lbfgs)`` objective
``C * sum_i CE_i + ||W||^2 / 2`` (bias not penalised), solved here with full-batch L-BFGS in PyTorch -- is fit on
a random 80 % of the training split for every C of the grid (theirs: C = 1 / wd, wd in logspace(-6, 5, 45)),
warm-started from the previous C's solution with at most ``transfer.max_iter`` (their, i.e. sklearn's default:
100) L-BFGS iterations per fit, C is chosen by the held-out 20 %, and the model is refit with that C on the whole
training split and scored on the test split. Features are used as the backbone gives them (no standardisation),
as theirs. The score is top-1 accuracy, or mean per-class accuracy for the datasets where that is the
convention (their Aircraft, Caltech-101, Flowers, Pets; for image folders by folder name).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from sepp.data.datasets import build_dataset
from sepp.data.transforms import eval_transform
from sepp.errors import SeppError
from sepp.eval.data import eval_input
from sepp.methods.checkpoint import load_trained
from sepp.models.features import features_of

MEAN_PER_CLASS = ("aircraft", "caltech101", "caltech-101", "flowers", "flowers102", "pets")


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, C: float, max_iter: int = 1000,
                 init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W [K, D], b [K])`` minimising ``C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2``; computed as the
    equivalent ``mean CE + ||W||^2 / (2 C N)`` with L-BFGS (strong-Wolfe line search) on ``x``'s device and
    dtype, starting from ``init`` (warm start) or zeros."""
    n, d = x.shape
    w = torch.zeros(num_classes, d, dtype=x.dtype, device=x.device) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype, device=x.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    reg = 1.0 / (2.0 * C * n)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.t() + b, y) + reg * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def scores(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Top-1 accuracy and mean per-class accuracy (classes absent from ``y`` left out), in percent."""
    pred = logits.argmax(1)
    hit = (pred == y).double()
    per_class = [hit[y == c].mean().item() for c in range(num_classes) if (y == c).any()]
    return {"top1": 100.0 * hit.mean().item(), "mean_per_class": 100.0 * float(np.mean(per_class))}


def c_grid(c_min: float = 1e-5, c_max: float = 1e6, steps: int = 45) -> list[float]:
    """Log-spaced C values, ascending (Ericsson et al.: 45 values from 1e-5 to 1e6)."""
    if not 0 < c_min <= c_max or steps < 1:
        raise SeppError(f"transfer needs 0 < c_min <= c_max and c_steps >= 1 (got {c_min}, {c_max}, {steps})")
    return np.logspace(np.log10(c_min), np.log10(c_max), steps).tolist()


def select_and_fit(train_x, train_y, test_x, test_y, num_classes: int, grid: list[float], metric: str = "top1",
                   val_fraction: float = 0.2, seed: int = 0, max_iter: int = 100) -> dict:
    """Choose C on a random ``val_fraction`` of the training rows (by ``metric``; ties to the larger C, as
    Ericsson et al.'s loop), refit on all training rows and score the test rows. Fits along the grid are
    warm-started from strong to weak regularisation; the refit starts from the chosen C's solution."""
    if not 0.0 < val_fraction < 1.0:
        raise SeppError(f"transfer.val_fraction must be in (0, 1), got {val_fraction}")
    n = train_x.shape[0]
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    n_val = int(np.floor(val_fraction * n))
    if n_val < 1 or n_val >= n:
        raise SeppError(f"{n} training images are too few to hold out {val_fraction:.0%}; use more images")
    val, fit = perm[:n_val], perm[n_val:]
    curve, states = [], [None]
    for C in grid:
        states.append(fit_logistic(train_x[fit], train_y[fit], num_classes, C, max_iter, init=states[-1]))
        curve.append(scores(train_x[val] @ states[-1][0].t() + states[-1][1], train_y[val], num_classes)[metric])
    best = max(range(len(grid)), key=lambda i: (curve[i], grid[i]))
    w, b = fit_logistic(train_x, train_y, num_classes, grid[best], max_iter, init=states[best + 1])
    result = scores(test_x @ w.t() + b, test_y, num_classes)
    return {**result, "score": result[metric], "metric": metric, "C": grid[best],
            "val_curve": dict(zip(map(float, grid), curve))}


def default_metric(name: str, root) -> str:
    """The dataset's convention: mean per-class accuracy for image folders named like one of
    ``MEAN_PER_CLASS``, top-1 otherwise (CIFAR, STL-10, ImageNet, Imagenette)."""
    if name == "imagefolder" and any(p.lower() in MEAN_PER_CLASS for p in Path(str(root)).parts):
        return "mean_per_class"
    return "top1"


def _target_config(cfg):
    """The transfer dataset's data config (root defaults to data.root) and its test split."""
    t = cfg.transfer.data
    root = t.root or cfg.data.root
    eval_split = t.eval_split
    if eval_split is None:
        has_test = t.name != "imagefolder" or (Path(str(root)) / "test").is_dir()
        eval_split = "val" if t.name in ("imagenet", "imagenette") or not has_test else "test"
    data = OmegaConf.create({"name": t.name, "root": root, "split": t.split, "download": False})
    return data, eval_split, int(t.image_size or cfg.data.image_size)


def _features(backbone, ds, size: int, source: str, device, batch_size: int) -> torch.Tensor:
    data, normalize = eval_input(ds, size, source)  # normalised as the source dataset was in training
    return features_of(backbone, data, device, batch_size, normalize=normalize)


def transfer_features(backbone, cfg, device) -> tuple:
    """``(train_x, train_y, test_x, test_y, classes, data_cfg, eval_split)`` of ``cfg.transfer.data``."""
    data, eval_split, size = _target_config(cfg)
    t = cfg.transfer.data
    out = []
    for split, subset in ((t.split, t.subset), (eval_split, t.eval_subset)):
        ds = build_dataset(OmegaConf.merge(data, {"subset": subset}), split=split,
                           transform=eval_transform(size, cfg.data.name))
        if ds.labels is None or (ds.labels < 0).any():
            raise SeppError(f"transfer needs labelled splits; {t.name} split {split!r} has unlabelled images")
        x = _features(backbone, ds, size, cfg.data.name, device, cfg.eval.batch_size)
        out += [x, torch.as_tensor(ds.labels, dtype=torch.long)]
    return (*out, ds.classes, data, eval_split)


def transfer_checkpoint(checkpoint: str, overrides=(), out: str | None = None) -> dict:
    """`sepp eval transfer`: the checkpoint's frozen backbone on ``cfg.transfer.data``; writes a JSON."""
    method, cfg, ckpt = load_trained(checkpoint, overrides)
    device = torch.device(cfg.device)
    t0 = time.time()
    train_x, train_y, test_x, test_y, classes, data, eval_split = transfer_features(method.backbone, cfg, device)
    tc = cfg.transfer
    metric = default_metric(tc.data.name, data.root) if tc.metric == "auto" else tc.metric
    dtype = torch.float32 if device.type == "cuda" else torch.float64
    xs = [x.to(device, dtype) for x in (train_x, test_x)]
    res = select_and_fit(xs[0], train_y.to(device), xs[1], test_y.to(device), len(classes),
                         c_grid(tc.c_min, tc.c_max, tc.c_steps), metric, tc.val_fraction, cfg.seed, tc.max_iter)
    result = {"checkpoint": str(checkpoint), "epoch": ckpt["epoch"], "method": cfg.method,
              "source_dataset": cfg.data.name, "dataset": tc.data.name, "root": str(data.root),
              "train_split": tc.data.split, "test_split": eval_split, "num_train": int(train_x.shape[0]),
              "num_test": int(test_x.shape[0]), "transfer_score": res["score"], **res,
              "seconds": time.time() - t0}
    path = Path(out) if out else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_transfer_{tc.data.name}.json")
    path.write_text(json.dumps(result, indent=2))
    result["json"] = str(path)
    return result
