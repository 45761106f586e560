"""SSL losses as pure functions. Every loss returns a scalar: the mean over the anchors named in its docstring.

Contrastive logits are computed in float32 even under autocast: with temperatures of 0.1-0.2 the logits reach
5-10, where bfloat16's 8-bit mantissa would visibly perturb the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _fp32(*xs: torch.Tensor | None):
    return tuple(None if x is None else x.float() for x in xs)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2,
             neg_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo's InfoNCE; ``q``, ``k``: L2-normalised ``[B, D]`` (row b of ``k`` is the positive of row b of ``q``).

    With ``queue`` ``[K, D]`` (normalised) the negatives of every query are the K queue entries and the logits
    are ``[q.k, q.queue^T] / T``; ``neg_mask`` ``[B, K]`` (True = drop that negative for that query).
    Without a queue the negatives are the other keys of the batch (logits ``q k^T / T``, positive on the
    diagonal; ``neg_mask`` is then ``[B, B]`` and must be False on the diagonal).
    Reduction: mean over the B queries of the cross-entropy of the positive.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = _fp32(q, k, queue)
        if queue is None:
            logits = q @ k.t()
            target = torch.arange(q.shape[0], device=q.device)
        else:
            logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1)
            target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            if neg_mask is not None:  # the positive (column 0) is never masked
                neg_mask = torch.cat([torch.zeros_like(neg_mask[:, :1]), neg_mask], dim=1)
        if neg_mask is not None:
            logits = logits.masked_fill(neg_mask, float("-inf"))
        return F.cross_entropy(logits / temperature, target)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, z1_all: torch.Tensor | None = None,
            z2_all: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """SimCLR's NT-Xent. ``z1``, ``z2``: this process's ``[B, D]`` embeddings of the two views (normalised
    here, so any scale works); ``z1_all``, ``z2_all``: the gathered global batch ``[N, D]`` (default: the local
    one), of which ``z1``/``z2`` are rows ``offset .. offset+B-1``.

    Anchor ``z1[b]`` (global row g = offset+b) has positive ``z2_all[g]`` and as negatives the other 2N-2
    embeddings of the global batch (everything but itself and its positive); likewise for ``z2[b]``.
    Reduction: mean over the 2B local anchors (both views). Averaging this over equal-sized processes gives the
    loss of the whole global batch.
    """
    z1_all = z1 if z1_all is None else z1_all
    z2_all = z2 if z2_all is None else z2_all
    with torch.autocast(z1.device.type, enabled=False):
        z1, z2, z1_all, z2_all = (F.normalize(z, dim=1) for z in _fp32(z1, z2, z1_all, z2_all))
        n, b = z1_all.shape[0], z1.shape[0]
        bank = torch.cat([z1_all, z2_all])                       # [2N, D]
        logits = torch.cat([z1, z2]) @ bank.t() / temperature    # [2B, 2N]
        rows = torch.arange(b, device=z1.device) + offset
        self_col = torch.cat([rows, rows + n])
        pos_col = torch.cat([rows + n, rows])
        # comparison instead of F.one_hot, whose CUDA range check reads a value back to the host
        is_self = self_col[:, None] == torch.arange(2 * n, device=z1.device)[None, :]
        logits = logits.masked_fill(is_self, float("-inf"))
        return F.cross_entropy(logits, pos_col)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)); mean over the batch (in [-1, 1])."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, stopgrad(z))``; mean over the batch (in [0, 4])."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()
