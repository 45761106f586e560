"""Known positives: which image pairs must never serve as each other's negatives (``sepp.mask_negatives``).

A view of the anchor's own image, or of one of its known semantic partners, is a false negative: the pair
pulls it in while the contrastive denominator pushes it away in the same step. Methods with negatives
(MoCo-v2's queue, SimCLR's batch) ask :class:`KnownPositives` for a boolean mask and drop those entries, or,
with ``sepp.batch_positives`` (``positives=True`` in :meth:`KnownPositives.set`), count them as further
positives of the anchor (multi-positive loss, as supervised contrastive learning does with class-mates).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sepp.errors import SeppError


class KnownPositives(nn.Module):
    """Registered pairs as sorted codes ``a * num_images + b`` (both directions); off until :meth:`set`.

    The codes are a non-persistent buffer (the trainer registers them again from the pair file on resume), so
    they follow the module to its device and never enter a checkpoint."""

    def __init__(self):
        super().__init__()
        self.enabled = False
        self.positives = False  # True: the masked entries are positives of the anchor, not dropped negatives
        self.num_images = 0
        self.register_buffer("codes", torch.zeros(0, dtype=torch.long), persistent=False)

    def set(self, i, j, num_images: int, positives: bool = False) -> None:
        """Register the pairs ``(i[n], j[n])`` (int arrays or tensors; may be empty: then only an image's own
        other views are masked) among ``num_images`` images, and switch masking on; ``positives``: the
        method turns the masked entries into positives instead of dropping them."""
        i, j = (torch.as_tensor(a, dtype=torch.long).reshape(-1) for a in (i, j))
        both = torch.cat([i, j])
        if i.shape != j.shape or bool(((both < 0) | (both >= num_images)).any()):
            raise SeppError(f"known positives must be two equal-length id arrays within [0, {num_images}); "
                            "check that the pair file matches the dataset")
        self.enabled, self.num_images, self.positives = True, int(num_images), bool(positives)
        self.codes = torch.unique(torch.cat([i * num_images + j, j * num_images + i])).to(self.codes.device)

    def mask(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
        """``[len(a), len(b)]`` True where image ``b[c]`` is image ``a[r]`` itself or a known partner of it;
        ids < 0 (empty queue slots) never match. None while masking is off."""
        if not self.enabled:
            return None
        a, b = a.reshape(-1, 1), b.reshape(1, -1)
        valid = (a >= 0) & (b >= 0)
        hit = a == b
        if self.codes.numel():
            codes = a * self.num_images + b
            pos = torch.searchsorted(self.codes, codes).clamp_(max=self.codes.numel() - 1)
            hit = hit | (self.codes[pos] == codes)
        return hit & valid
