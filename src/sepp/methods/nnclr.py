"""NNCLR (Dwibedi et al. 2021, arXiv 2104.14548): the positive of a view is its nearest neighbour in a
support queue of past projections.

Defaults (constructor = ImageNet, paper): projector 3 x (Linear-BN) with ReLUs, 2048 hidden and 256 output
units; predictor Linear(256, 4096)-BN-ReLU-Linear(4096, 256); T 0.1; support set of 98304 projections.
CIFAR values (``configs/cifar10_nnclr.yaml``, solo-learn's CIFAR NNCLR recipe): T 0.2, queue 65536.

Per view a: h_a = projector(backbone(x_a)), p_a = predictor(h_a), z_a = normalise(h_a) and NN(z_a), the queue
entry most cosine-similar to z_a (a stored vector, no gradient). The loss of the ordered pair (a, b) is
:func:`nnclr_loss` ``(NN(z_a), p_b)``: NN(z_a) must pick p_b among the predictions of view b of the whole
(global) batch. Two views give the paper's symmetric ``(l(NN1, p2) + l(NN2, p1)) / 2``; a third view (SePP's
semantic partner, ``x3``) adds the ordered pairs with it and the loss is their mean, so two views are
unchanged. After the step the view-1 projections of the global batch (and their image ids) are enqueued.

Queue slots never written (ids -1, at the start of training) are never chosen as neighbours; while the queue
is empty the positive is z_a itself (detached), i.e. the first step is SimCLR with a predictor.

``set_labels(labels)`` (dataset labels by image id, -1 = unknown; the trainer passes the training set's) makes
``forward`` also return ``nn_agreement``: the fraction of view-1 anchors whose neighbour's image has the
anchor's label (anchors with an unknown label or no neighbour yet are left out) -- the online counterpart of
mining precision. The counts are summed on the device; ``epoch_metrics()`` (called by the trainer once per
epoch) returns the epoch's agreement over all processes for ``metrics.csv`` and resets them.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sepp import distributed as D
from sepp.methods.base import Method
from sepp.methods.byol import BYOL
from sepp.methods.losses import predictive_views
from sepp.methods.queue import MemoryQueue
from sepp.models.heads import mlp


def nnclr_loss(nn_z: torch.Tensor, p: torch.Tensor, temperature: float = 0.1, p_all: torch.Tensor | None = None,
               offset: int = 0) -> torch.Tensor:
    """NNCLR's contrastive term. ``nn_z``: ``[B, D]`` nearest neighbours (support vectors) of this process's
    anchors; ``p``: ``[B, D]`` predictions of the other view (row b is anchor b's positive); ``p_all``: the
    gathered global batch of predictions ``[N, D]`` (default: ``p``), of which ``p`` is rows
    ``offset .. offset+B-1``. Both are normalised here. Anchor b's logits are ``nn_z[b] . p_all^T / T`` with
    target ``offset + b`` (the other N-1 predictions are its negatives).
    Reduction: mean over the B local anchors of the cross-entropy."""
    p_all = p if p_all is None else p_all
    with torch.autocast(nn_z.device.type, enabled=False):
        nn_z, p_all = F.normalize(nn_z.float(), dim=1), F.normalize(p_all.float(), dim=1)
        logits = nn_z @ p_all.t() / temperature
        target = torch.arange(nn_z.shape[0], device=nn_z.device) + offset
        return F.cross_entropy(logits, target)


@torch.no_grad()
def nearest_neighbour(z: torch.Tensor, keys: torch.Tensor, written: torch.Tensor):
    """``(neighbours [B, D], slot [B])``: for each normalised row of ``z`` the most cosine-similar row of
    ``keys`` among the ``written`` slots (fp32; ties to the lower slot); rows of ``z`` itself while no slot is
    written (then ``slot`` is meaningless and ``written.any()`` is False)."""
    with torch.autocast(z.device.type, enabled=False):
        sim = z.float() @ keys.float().t()
        slot = sim.masked_fill(~written[None, :], float("-inf")).argmax(dim=1)
        return torch.where(written.any(), keys[slot].to(z.dtype), z.detach()), slot


class NNCLR(Method):
    augmentation = BYOL.augmentation  # NNCLR trains with BYOL's augmentations (its paper)
    sync_bn = True  # the paper synchronises BN across devices
    metric_columns = ("nn_agreement",)

    def __init__(self, backbone: nn.Module, feat_dim: int, *, proj_hidden_dim: int = 2048, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, queue_size: int = 98304, temperature: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, proj_hidden_dim, proj_dim, 3, last_bn=True, last_affine=True)
        self.predictor = mlp(proj_dim, pred_hidden_dim, proj_dim, 2)
        self.queue = MemoryQueue(proj_dim, queue_size)
        self.temperature = temperature
        # labels by image id, only for the nn_agreement metric; not saved (the trainer sets them again)
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("agreement_counts", torch.zeros(2), persistent=False)  # hits, anchors this epoch

    def set_labels(self, labels) -> None:
        """Dataset labels indexed by image id (int array or tensor, -1 = unknown); None switches the
        ``nn_agreement`` metric off."""
        labels = torch.zeros(0) if labels is None else torch.as_tensor(labels)
        self.labels = labels.to(device=self.queue.ids.device, dtype=torch.long).reshape(-1)

    def forward(self, x1, x2, ids1, ids2, x3=None, ids3=None) -> dict[str, torch.Tensor]:
        xs = [x1, x2] if x3 is None else [x1, x2, x3]
        hs = [self.projector(self.backbone(x)) for x in xs]
        ps = [self.predictor(h) for h in hs]
        zs = [F.normalize(h, dim=1) for h in hs]
        written = self.queue.ids >= 0
        found = [nearest_neighbour(z, self.queue.keys, written) for z in zs]
        offset = D.get_rank() * x1.shape[0]
        targets = [(p, D.all_gather_with_grad(p)) for p in ps]

        def pair_loss(nn_z, target):
            return nnclr_loss(nn_z, target[0], self.temperature, target[1], offset)

        out = {"loss": predictive_views([nn_z for nn_z, _ in found], targets, pair_loss)}
        if self.labels.numel():
            out["nn_agreement"] = self._agreement(ids1, found[0][1])
        self.queue.enqueue(D.all_gather(zs[0]), D.all_gather(ids1))
        return out

    @torch.no_grad()
    def _agreement(self, ids: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        neighbour = self.queue.ids[slot]  # -1: no slot written yet
        anchor_label = self.labels[ids]
        nn_label = self.labels[neighbour.clamp(min=0)]
        valid = (neighbour >= 0) & (anchor_label >= 0)
        hits = ((anchor_label == nn_label) & valid).sum()
        if self.training:
            self.agreement_counts += torch.stack([hits, valid.sum()]).float()
        return (hits.float() / valid.sum().clamp(min=1)).detach()

    def epoch_metrics(self) -> dict[str, float]:
        """``{"nn_agreement": fraction}`` of the training steps since the last call, over all processes (every
        process must call it); empty without labels or anchors. Resets the counts."""
        if not self.labels.numel():
            return {}
        counts = D.all_reduce_mean(self.agreement_counts.clone()).tolist()
        self.agreement_counts.zero_()
        return {"nn_agreement": counts[0] / counts[1]} if counts[1] > 0 else {}
