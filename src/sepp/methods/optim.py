"""Optimizers, the one learning-rate schedule (:func:`lr_at`: pretraining, the linear probe and fine-tuning)
and the one batch-size scaling of a learning rate (:func:`scale_lr`).

LARS (You et al. 2017, Eq. 6) in solo-learn's form (``solo/utils/lars.py``): SGD with momentum whose per-layer
step is scaled by a trust ratio ``trust = ||w|| / (||g|| + wd * ||w|| + eps)`` (SimCLR's and BYOL's TF/JAX code
divide by ``||g + wd * w||`` instead; the two agree when g and w are orthogonal-ish and differ slightly else). For every adapted layer the update
direction is ``d = s * (g + wd * w)``, ``v = momentum * v + d``, ``w -= lr * v``, where ``s`` is

- ``clip_lr=False`` (plain LARS, as in SimCLR/BYOL): ``s = eta * trust``, i.e. a per-layer rate
  ``lr * eta * trust``;
- ``clip_lr=True`` (solo-learn's ``clip_lr``, used by its CIFAR SimCLR/BYOL recipes): ``s = min(eta * trust /
  lr, 1)``, i.e. the per-layer rate ``min(eta * trust, lr)``: LARS may only lower the global rate.

A layer whose weight or gradient norm is zero is neither adapted nor decayed (``d = g``), as in solo-learn.
Biases and normalisation parameters (excluded groups) get neither weight decay nor the adaptation. PyTorch has
no LARS, so it is written here with foreach ops and tensor-valued ratios (no per-parameter host syncs).
"""
from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("sgd", "lars")  # train.optimizer


class LARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, clip_lr: bool = False, eps: float = 1e-8, exclude: bool = False):
        """Defaults: plain LARS as SimCLR/BYOL run it on ImageNet (eta 0.001, no clipping); ``build_optimizer`` passes
        ``train.lars_eta`` / ``train.lars_clip_lr`` (the shipped CIFAR configs: solo-learn's 0.02 / true)."""
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      clip_lr=clip_lr, eps=eps, exclude=exclude))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["exclude"]:
                wd, eta, lr = group["weight_decay"], group["eta"], group["lr"]
                p_norm = torch._foreach_norm(params)
                g_norm = torch._foreach_norm(grads)
                for p, g, pn, gn in zip(params, grads, p_norm, g_norm):
                    scale = eta * pn / (gn + wd * pn + group["eps"])
                    if group["clip_lr"]:
                        scale = torch.clamp(scale / lr, max=1.0) if lr > 0 else torch.ones_like(scale)
                    adapt = (pn > 0) & (gn > 0)
                    # adapted layers: (g + wd w) * scale; zero-norm layers: g unchanged
                    g.copy_(torch.where(adapt, (g + wd * p) * scale, g))
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim <= 1 or name.endswith(".bias")


def build_optimizer(method: nn.Module, train_cfg, lr: float) -> torch.optim.Optimizer:
    """SGD or LARS over ``method.param_groups(lr)`` (see :class:`sepp.methods.base.Method`). Groups a method
    marks ``fix_lr`` keep ``lr`` (SimSiam's predictor); for LARS, biases and norm parameters go to an
    excluded group without decay/adaptation."""
    groups = method.param_groups(lr)
    wd = train_cfg.weight_decay
    if train_cfg.optimizer == "sgd":
        for g in groups:
            g.setdefault("lr", lr)
        return torch.optim.SGD(groups, lr=lr, momentum=train_cfg.momentum, weight_decay=wd,
                               foreach=True)
    named = {id(p): n for n, p in method.named_parameters()}
    lars_groups = []
    for g in groups:
        params = [p for p in g["params"] if p.requires_grad]
        keep = {k: v for k, v in g.items() if k != "params"}
        decay = [p for p in params if not _no_decay(named.get(id(p), ""), p)]
        plain = [p for p in params if _no_decay(named.get(id(p), ""), p)]
        if decay:
            lars_groups.append({**keep, "params": decay})
        if plain:
            lars_groups.append({**keep, "params": plain, "weight_decay": 0.0, "exclude": True})
    for g in lars_groups:
        g.setdefault("lr", lr)
    return LARS(lars_groups, lr=lr, momentum=train_cfg.momentum, weight_decay=wd,
                eta=getattr(train_cfg, "lars_eta", 0.001), clip_lr=getattr(train_cfg, "lars_clip_lr", False))


def schedule_steps(epochs: int, steps_per_epoch: int, max_steps: int, warmup_epochs: float,
                   plain_steps_per_epoch: int) -> tuple[int, int]:
    """``(total_steps, warmup_steps)``: the run's length in optimizer steps (``max_steps`` when > 0, else
    ``epochs x steps_per_epoch``) and the warm-up in steps, ``warmup_epochs`` plain epochs of the dataset
    (``plain_steps_per_epoch``: without semantic pairs), so that it does not grow with enlarged epochs."""
    total = int(max_steps) if max_steps else int(epochs) * int(steps_per_epoch)
    return max(total, 1), int(round(warmup_epochs * plain_steps_per_epoch))


def lr_at(t: float, total: float, warmup: float, base_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup to ``base_lr`` over ``warmup`` then half-cosine decay to ``min_lr`` at ``total``.

    ``t`` is training progress in the same unit as ``total`` (the trainer counts optimizer steps and evaluates
    the rate at the end of the step being taken, so the first step's rate is not zero and the last one's is
    min_lr)."""
    if warmup > 0 and t < warmup:
        return base_lr * t / warmup
    progress = (t - warmup) / max(total - warmup, 1e-12)
    progress = min(max(progress, 0.0), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scale_lr(lr: float, batch_size: int) -> float:
    """``lr`` given per 256 images, at ``batch_size`` images per step: ``lr x batch_size / 256`` (the linear
    scaling rule, Goyal et al. 2017)."""
    return lr * batch_size / 256


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Every group's rate to ``lr``, except groups marked ``fix_lr``, which get ``base_lr``."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr if g.get("fix_lr") else lr
