"""State that momentum methods update without gradients: MoCo's memory queue and EMA target networks."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class MemoryQueue(nn.Module):
    """Ring buffer of the last ``size`` keys and the dataset ids of their images.

    Buffers (saved in checkpoints): ``keys`` [size, dim] float32, initialised to random unit vectors as in
    MoCo; ``ids`` [size] int64, -1 = slot never written; ``ptr`` () int64, the next slot to write. The pointer
    stays on the device so enqueueing never synchronises with the host.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write ``keys`` [B, dim] and ``ids`` [B] at the pointer, wrapping around, as if written one row at a
        time (when B > size only the last ``size`` rows survive)."""
        n = keys.shape[0]
        keep = min(n, self.size)
        slots = (self.ptr + (n - keep) + torch.arange(keep, device=self.ptr.device)) % self.size
        self.keys[slots] = keys[n - keep:].detach().to(self.keys.dtype)
        self.ids[slots] = ids[n - keep:].to(self.ids.dtype)
        self.ptr.copy_((self.ptr + n) % self.size)

def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters receive no gradient (momentum/target encoder)."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online``, parameter by parameter (buffers such as BN
    running statistics are left to the target's own forward passes, as in MoCo and BYOL)."""
    t_params = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
