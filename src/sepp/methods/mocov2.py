"""MoCo-v2 (Chen et al. 2020, arXiv 2003.04297), after facebookresearch/moco ``moco/builder.py``.

Defaults (constructor = ImageNet, MoCo-v2 paper / official repo): queue 65536, T 0.2, momentum 0.999,
MLP projector 2048 -> 128 (Linear-ReLU-Linear, no BN), asymmetric loss, shuffle-BN.
CIFAR defaults (``CIFAR_DEFAULTS``, facebookresearch/moco ``colab/moco_cifar10_demo.ipynb``): queue 4096,
T 0.1, momentum 0.99, symmetric loss. The demo sums the two directions; we average them, so its learning
rate 0.06 corresponds to 0.12 here.

SePP extension: ``set_known_positives`` registers the mined pairs; a query of image a then never uses as a
negative a queue key whose image is a known partner of a (all other negatives are kept).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sepp.engine import distributed as D
from sepp.errors import SeppError
from sepp.methods.losses import info_nce
from sepp.methods.queue import MemoryQueue, ema_update, frozen_copy
from sepp.models.backbones import split_batchnorm
from sepp.models.heads import mlp

BN_MODES = ("shuffle", "sync", "none")


class MoCoV2(nn.Module):
    CIFAR_DEFAULTS = {"queue_size": 4096, "temperature": 0.1, "momentum": 0.99, "symmetric": True}

    def __init__(self, backbone: nn.Module, feat_dim: int, *, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 queue_size: int = 65536, temperature: float = 0.2, momentum: float = 0.999,
                 symmetric: bool = False, bn: str = "shuffle", bn_splits: int = 1):
        """``bn``: "shuffle" = the official shuffle-BN across processes (keys are computed on a random
        permutation of the global batch so BN statistics cannot leak which key is the positive); in one
        process with ``bn_splits > 1`` the backbone's BN computes statistics on that many groups of the batch
        and keys are computed on a shuffled batch (the official CIFAR demo's SplitBatchNorm), otherwise it is
        a no-op; "sync" = the trainer converts BN to SyncBN (see ``bn_mode``), "none"."""
        super().__init__()
        if bn not in BN_MODES:
            raise SeppError(f"mocov2.bn must be one of {', '.join(BN_MODES)}, got {bn!r}")
        self.split_shuffle = bn == "shuffle" and bn_splits > 1 and D.get_world_size() == 1
        if self.split_shuffle:
            split_batchnorm(backbone, bn_splits)
        self.backbone = backbone
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, hidden_bn=False)
        self.momentum_backbone = frozen_copy(backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.queue = MemoryQueue(proj_dim, queue_size)
        self.temperature, self.momentum, self.symmetric, self.bn_mode = temperature, momentum, symmetric, bn
        self.num_images = 0
        # Sorted a * num_images + b over both directions of every known pair; not saved in checkpoints (the
        # trainer sets it again from the pair file).
        self.register_buffer("known_pairs", torch.zeros(0, dtype=torch.long), persistent=False)

    def set_known_positives(self, i, j, num_images: int) -> None:
        """Register known positive pairs (int64 endpoints, tensors or arrays) among ``num_images`` images."""
        i, j = (torch.as_tensor(a, dtype=torch.long).reshape(-1) for a in (i, j))
        both = torch.cat([i, j])
        if i.shape != j.shape or bool(((both < 0) | (both >= num_images)).any()):
            raise SeppError(f"known positives must be two equal-length id arrays within [0, {num_images}); "
                            "check that the pair file matches the dataset")
        self.num_images = num_images
        codes = torch.cat([i * num_images + j, j * num_images + i])
        self.known_pairs = torch.unique(codes).to(self.queue.ids.device)

    def negative_mask(self, query_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, K] True where queue entry k holds a known partner of query b's image (None without pairs)."""
        if self.known_pairs.numel() == 0:
            return None
        qids = self.queue.ids
        codes = query_ids[:, None] * self.num_images + qids[None, :]
        pos = torch.searchsorted(self.known_pairs, codes).clamp_(max=self.known_pairs.numel() - 1)
        return (self.known_pairs[pos] == codes) & (qids >= 0)[None, :]

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        shuffle = self.bn_mode == "shuffle" and D.get_world_size() > 1
        if shuffle:  # official _batch_shuffle_ddp / _batch_unshuffle_ddp
            world, rank = D.get_world_size(), D.get_rank()
            x_all = D.all_gather(x)
            perm = D.broadcast(torch.randperm(x_all.shape[0], device=x.device))
            x = x_all[perm.view(world, -1)[rank]]
        if self.split_shuffle:  # one process: shuffle so a key's BN group differs from its query's
            perm = torch.randperm(x.shape[0], device=x.device)
            k = F.normalize(self.momentum_projector(self.momentum_backbone(x[perm])), dim=1)
            return k[torch.argsort(perm)]
        k = F.normalize(self.momentum_projector(self.momentum_backbone(x)), dim=1)
        if shuffle:
            k = D.all_gather(k)[torch.argsort(perm).view(world, -1)[rank]]
        return k

    def _direction(self, xq, xk, ids_q):
        q = F.normalize(self.projector(self.backbone(xq)), dim=1)
        k = self._keys(xk)
        mask = self.negative_mask(ids_q)
        # clone: the queue is overwritten in place before backward needs it
        loss = info_nce(q, k, self.queue.keys.clone(), self.temperature, mask)
        return loss, k, mask

    def forward(self, x1, x2, ids1, ids2) -> dict[str, torch.Tensor]:
        loss, k2, mask = self._direction(x1, x2, ids1)
        keys, ids, masks = [k2], [ids2], [mask]
        if self.symmetric:
            loss21, k1, mask = self._direction(x2, x1, ids2)
            loss = (loss + loss21) / 2
            keys.append(k1)
            ids.append(ids1)
            masks.append(mask)
        out = {"loss": loss}
        if masks[0] is not None:
            out["masked_negatives"] = torch.cat(masks).sum(1).float().mean().detach()
        # Gather each direction separately so the queue order is the global batch order whatever the world size.
        self.queue.enqueue(torch.cat([D.all_gather(k) for k in keys]), torch.cat([D.all_gather(i) for i in ids]))
        return out

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.momentum_backbone, self.backbone, self.momentum)
        ema_update(self.momentum_projector, self.projector, self.momentum)

    def param_groups(self, base_lr: float) -> list[dict]:
        return [{"name": "backbone", "params": list(self.backbone.parameters()), "lr": base_lr},
                {"name": "projector", "params": list(self.projector.parameters()), "lr": base_lr}]
