"""SSL losses as pure functions. Every loss returns a scalar: the mean over the anchors named in its docstring.

Contrastive logits are computed in float32 even under autocast: with temperatures of 0.1-0.2 the logits reach
5-10, where bfloat16's 8-bit mantissa would visibly perturb the softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _fp32(*xs: torch.Tensor | None):
    return tuple(None if x is None else x.float() for x in xs)


def multi_positive_ce(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Multi-positive cross-entropy (supervised-contrastive ``L_out``): for each row, the mean over its
    positive columns of ``-log softmax(logits)``; columns at ``-inf`` are dropped from the softmax.
    ``positive`` ``[A, M]`` bool, at least one True per row and never on a ``-inf`` column.
    Reduction: mean over the A rows. With one positive per row this is ``F.cross_entropy``."""
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_row = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(1) / positive.sum(1)
    return -per_row.mean()


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, temperature: float = 0.2,
             neg_mask: torch.Tensor | None = None, pos_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo's InfoNCE; ``q``: L2-normalised ``[B, D]``; ``k``: ``[B, D]`` (row b is the positive of query b)
    or ``[B, P, D]`` (P positives per query: multi-positive InfoNCE, every positive in the denominator).

    With ``queue`` ``[K, D]`` (normalised) the negatives of every query are the K queue entries and the logits
    are ``[q.k_1..q.k_P, q.queue^T] / T``; ``neg_mask`` ``[B, K]`` (True = drop that negative for that query);
    ``pos_mask`` ``[B, K]`` (True = that queue entry is one more positive of that query, e.g. a key of a known
    semantic partner; it stays in the denominator as every positive does).
    Without a queue the negatives are the other keys of the batch (logits ``q k^T / T``, positive on the
    diagonal, ``k`` must be ``[B, D]``; ``neg_mask`` is then ``[B, B]`` and must be False on the diagonal).
    Reduction: mean over the B queries of the mean over its positives of the cross-entropy.
    """
    with torch.autocast(q.device.type, enabled=False):
        q, k, queue = _fp32(q, k, queue)
        if queue is None:
            logits = q @ k.t()
            target = torch.arange(q.shape[0], device=q.device)
            if neg_mask is not None:
                logits = logits.masked_fill(neg_mask, float("-inf"))
            return F.cross_entropy(logits / temperature, target)
        k = k[:, None, :] if k.dim() == 2 else k
        n_pos = k.shape[1]
        logits = torch.cat([(q[:, None, :] * k).sum(-1), q @ queue.t()], dim=1) / temperature
        if neg_mask is not None:  # the positives (first P columns) are never masked
            logits = logits.masked_fill(torch.cat([torch.zeros_like(neg_mask[:, :1]).expand(-1, n_pos),
                                                   neg_mask], dim=1), float("-inf"))
        if n_pos == 1 and pos_mask is None:
            return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[:, :n_pos] = True
        if pos_mask is not None:
            positive[:, n_pos:] = pos_mask if neg_mask is None else pos_mask & ~neg_mask
        return multi_positive_ce(logits, positive)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1, z1_all: torch.Tensor | None = None,
            z2_all: torch.Tensor | None = None, offset: int = 0, drop: torch.Tensor | None = None) -> torch.Tensor:
    """SimCLR's NT-Xent for two views: :func:`nt_xent_views` with ``views=[z1, z2]`` (see there)."""
    all_views = None if z1_all is None and z2_all is None else [
        z1 if z1_all is None else z1_all, z2 if z2_all is None else z2_all]
    return nt_xent_views([z1, z2], temperature, all_views, offset, drop)


def nt_xent_views(views: list[torch.Tensor], temperature: float = 0.1,
                  views_all: list[torch.Tensor] | None = None, offset: int = 0,
                  drop: torch.Tensor | None = None, extra_positive: torch.Tensor | None = None) -> torch.Tensor:
    """NT-Xent over V >= 2 views per sample (V = 2: SimCLR; V = 3: two views of an image plus one of its
    semantic partner, or three of the image itself).

    ``views``: this process's V embeddings ``[B, D]`` (normalised here); ``views_all``: the gathered global
    batch of each view ``[N, D]`` (default: the local ones), of which the local rows are ``offset ..
    offset+B-1``. Every local row of every view is an anchor; its positives are the other V-1 views of the
    same sample, its negatives every other embedding of the global batch except itself. ``drop``
    ``[V*B, V*N]`` (view-major rows and columns) removes further columns from an anchor's negatives (false
    negatives: views of its own image or of known partners); positives are never dropped. ``extra_positive``
    (same shape) adds columns to an anchor's positives instead (known partners in the batch, counted as
    supervised contrastive learning counts class-mates); an anchor itself is never its own positive.
    Reduction: mean over the V*B local anchors of the mean over their positives of ``-log softmax``. With
    V = 2 and no extra positives every anchor has one positive and this is the usual NT-Xent.
    """
    views_all = views if views_all is None else views_all
    v = len(views)
    with torch.autocast(views[0].device.type, enabled=False):
        local = torch.cat([F.normalize(z, dim=1) for z in _fp32(*views)])        # [V*B, D]
        bank = torch.cat([F.normalize(z, dim=1) for z in _fp32(*views_all)])     # [V*N, D]
        n, b = views_all[0].shape[0], views[0].shape[0]
        logits = local @ bank.t() / temperature
        dev = local.device
        row_view = torch.arange(v, device=dev).repeat_interleave(b)
        row_sample = torch.arange(b, device=dev).repeat(v) + offset
        col_view = torch.arange(v, device=dev).repeat_interleave(n)
        col_sample = torch.arange(n, device=dev).repeat(v)
        # comparisons instead of F.one_hot, whose CUDA range check reads a value back to the host
        same_sample = row_sample[:, None] == col_sample[None, :]
        is_self = same_sample & (row_view[:, None] == col_view[None, :])
        positive = same_sample & ~is_self
        if extra_positive is not None:
            positive = positive | (extra_positive & ~is_self)
        removed = is_self if drop is None else is_self | (drop & ~positive)
        logits = logits.masked_fill(removed, float("-inf"))
        if v == 2 and extra_positive is None:
            return F.cross_entropy(logits, positive.float().argmax(1))
        return multi_positive_ce(logits, positive)


def predictive_views(predictions: list[torch.Tensor], targets: list[torch.Tensor], pair_loss) -> torch.Tensor:
    """BYOL/SimSiam over V >= 2 views: the mean of ``pair_loss(p_a, z_b)`` over the ordered pairs a != b
    (every view predicts every other view of the sample; V = 2 gives the usual two symmetric terms)."""
    terms = [pair_loss(p, z) for a, p in enumerate(predictions) for b, z in enumerate(targets) if a != b]
    return torch.stack(terms).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, stopgrad(z)); mean over the batch (in [-1, 1])."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's ``||p/|p| - z/|z|||^2 = 2 - 2 cos(p, stopgrad(z))``; mean over the batch (in [0, 4])."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=1)).mean()
