"""Thin helpers over ``torch.distributed`` that are no-ops in a single process.

Launch with ``torchrun``: ``init_distributed`` reads RANK / WORLD_SIZE / LOCAL_RANK from the environment.
Without those variables (plain ``python``/``sepp``) nothing is initialised and every helper behaves as if the
world had one process. Gathers assume every process holds the same number of rows (equal per-process batches,
which the samplers guarantee by dropping the last incomplete batch).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_initialized() -> bool:
    """Whether a process group is running (torchrun with more than one process)."""
    return _active()


def init_distributed() -> tuple[int, int, int]:
    """Join the process group started by torchrun; returns ``(rank, world_size, local_rank)``.

    Uses NCCL when CUDA is available (and selects ``cuda:local_rank``), gloo otherwise.
    Returns ``(0, 1, 0)`` when not launched by torchrun or when torchrun started a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    if world > 1 and not _active():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local_rank


def get_rank() -> int:
    return dist.get_rank() if _active() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _active() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if _active():
        dist.barrier()


def cleanup() -> None:
    if _active():
        dist.destroy_process_group()


def _gather_cat(x: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every process's tensor along dim 0, keeping the graph to the local slice.

    Each process's loss depends on all processes' rows, so the gradient for the local rows is the sum of the
    gradients every process computed for them: backward all-reduces (sums) the incoming gradient and returns
    this rank's slice. With DDP averaging the parameter gradients afterwards, the result equals the gradient of
    the mean of the per-process losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return _gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``[world * B, ...]`` concatenation of every process's ``x`` (rank order), differentiable."""
    if not _active() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """``[world * B, ...]`` concatenation of every process's ``x`` (rank order), without gradient."""
    if not _active() or dist.get_world_size() == 1:
        return x.detach()
    return _gather_cat(x.detach())


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over processes (e.g. for logging a loss); returns a new tensor."""
    x = x.detach().clone()
    if _active() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of a tensor from ``src``; returns it."""
    if _active() and dist.get_world_size() > 1:
        dist.broadcast(x, src=src)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The picklable ``obj`` of process ``src`` on every process."""
    if not _active() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """The picklable ``obj`` of every process, in rank order (``[obj]`` in one process)."""
    if not _active() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
