"""MoCo-v2 (Chen et al. 2020, arXiv 2003.04297), after facebookresearch/moco ``moco/builder.py``.

Defaults (constructor = ImageNet, MoCo-v2 paper / official repo): queue 65536, T 0.2, momentum 0.999,
MLP projector 2048 -> 128 (Linear-ReLU-Linear, no BN), asymmetric loss, shuffle-BN.
These defaults are the only ones (``sepp.methods.hyperparameter_defaults``); the CIFAR values of the official
demo (facebookresearch/moco ``colab/moco_cifar10_demo.ipynb``: queue 4096, T 0.1, momentum 0.99, symmetric
loss, 8 BN splits) are stated in ``configs/cifar10_mocov2.yaml``. The demo sums the two directions; we average
them, so its SGD step (lr 0.06, wd 5e-4 at batch 512) is lr 0.12 with wd 2.5e-4 here (the same update:
``tests/test_recipes.py`` steps both side by side).

SePP extensions: ``set_known_positives`` registers the mined pairs; a query of image a then never uses as a
negative a queue key whose image is a itself or a known partner of a (all other negatives are kept); with
``positives=True`` (``sepp.batch_positives``) such keys are further positives of the query instead. A third
view ``x3`` (a semantic partner, or the image itself in the extra-view control) adds its key as one more
positive of every query (multi-positive InfoNCE); with ``symmetric`` every view is a query of the others.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sepp import distributed as D
from sepp.data.recipes import Recipe
from sepp.errors import SeppError
from sepp.methods.base import Method
from sepp.methods.known import KnownPositives
from sepp.methods.losses import info_nce
from sepp.methods.queue import MemoryQueue, ema_update, frozen_copy
from sepp.models.backbones import split_batchnorm
from sepp.models.heads import mlp

BN_MODES = ("shuffle", "sync", "none")


class MoCoV2(Method):
    # facebookresearch/moco --aug-plus: crop 0.2-1, jitter 0.4/0.4/0.4/0.1 p=0.8, grayscale p=0.2, blur
    # sigma 0.1-2 p=0.5, flip
    augmentation = Recipe(crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                          blur_p=(0.5, 0.5))
    has_negatives = True
    choices = {"bn": BN_MODES}

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
        self.known = KnownPositives()

    @property
    def requires_sync_bn(self) -> bool:
        return self.bn_mode == "sync"

    def set_known_positives(self, i, j, num_images: int, positives: bool = False) -> None:
        """A query's own image and its partners are removed from its queue negatives (or, with
        ``positives``, are positives of the query)."""
        self.known.set(i, j, num_images, positives)

    def negative_mask(self, query_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, K] True where queue entry k holds query b's own image or a known partner (None when off)."""
        return self.known.mask(query_ids, self.queue.ids)

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

    def forward(self, x1, x2, ids1, ids2, x3=None, ids3=None) -> dict[str, torch.Tensor]:
        xs, ids = ([x1, x2], [ids1, ids2]) if x3 is None else ([x1, x2, x3], [ids1, ids2, ids3])
        keys = [self._keys(x) for x in xs]
        queue = self.queue.keys.clone()  # the queue is overwritten in place before backward needs it
        queries = range(len(xs)) if self.symmetric else range(1)
        losses, masks = [], []
        for a in queries:
            q = F.normalize(self.projector(self.backbone(xs[a])), dim=1)
            mask = self.negative_mask(ids[a])
            positives = torch.stack([keys[b] for b in range(len(xs)) if b != a], dim=1)  # [B, V-1, D]
            if mask is not None and self.known.positives:
                losses.append(info_nce(q, positives, queue, self.temperature, pos_mask=mask))
            else:
                losses.append(info_nce(q, positives, queue, self.temperature, mask))
            masks.append(mask)
        out = {"loss": torch.stack(losses).mean()}
        if masks[0] is not None:
            key = "known_positives" if self.known.positives else "masked_negatives"
            out[key] = torch.cat(masks).sum(1).float().mean().detach()
        # Asymmetric: only the key of view 2 is enqueued (the official code); symmetric: every view's key.
        # Gathered view by view so the queue order is the global batch order whatever the world size.
        enq = range(1, len(xs)) if not self.symmetric else [1, 0] + list(range(2, len(xs)))
        self.queue.enqueue(torch.cat([D.all_gather(keys[b]) for b in enq]),
                           torch.cat([D.all_gather(ids[b]) for b in enq]))
        return out

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.momentum_backbone, self.backbone, self.momentum)
        ema_update(self.momentum_projector, self.projector, self.momentum)

