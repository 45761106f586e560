"""Embed a whole dataset with a frozen encoder: float32, L2-normalised, in dataset order.

Under torchrun every rank embeds a contiguous shard of the rows; the shards are then gathered (in memory)
or written into one shared ``.npy`` memmap, so every rank ends up with the full array.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from sepp.errors import SeppError

# Rows per all_gather call: bounds the communication buffer (65536 x 2048 x 4 B = 512 MiB per rank).
_GATHER_ROWS = 65536


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous block ``[lo, hi)`` of ``n`` rows owned by ``rank``; sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


def uint8_normalizer(mean, std) -> Callable[[Tensor], Tensor]:
    """uint8 ``[B, 3, H, W]`` -> float32 normalised, on the batch's device (for tensor-resident datasets)."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def normalize(x: Tensor) -> Tensor:
        return (x.float().div_(255.0) - m.to(x.device)) / s.to(x.device)

    return normalize


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(local: np.ndarray, n: int, rank: int, world: int) -> np.ndarray:
    """Concatenate every rank's ``shard_range`` block of an ``[n, ...]`` array, on every rank."""
    sizes = [shard_range(n, r, world)[1] - shard_range(n, r, world)[0] for r in range(world)]
    if local.shape[0] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local.shape[0]} rows, expected {sizes[rank]}")
    dev = _comm_device()
    tail = local.shape[1:]
    parts: list[list[np.ndarray]] = [[] for _ in range(world)]
    for off in range(0, max(sizes), _GATHER_ROWS):
        rows = min(_GATHER_ROWS, max(sizes) - off)
        buf = torch.zeros((rows, *tail), dtype=torch.from_numpy(local[:0]).dtype, device=dev)
        mine = local[off:off + rows]
        if len(mine):
            buf[: len(mine)] = torch.from_numpy(np.ascontiguousarray(mine)).to(dev)
        outs = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(outs, buf)
        for r in range(world):
            keep = max(0, min(rows, sizes[r] - off))
            parts[r].append(outs[r][:keep].cpu().numpy())
    return np.concatenate([p for r in range(world) for p in parts[r]], axis=0)


def _batches(data, lo: int, hi: int, batch_size: int, device: torch.device, normalize, workers: int
             ) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, normalised_batch_on_device)`` for rows ``[lo, hi)`` in order."""
    if isinstance(data, Tensor):
        for s in range(lo, hi, batch_size):
            x = data[s:min(s + batch_size, hi)].to(device, non_blocking=True)
            yield s, normalize(x)
        return
    loader = DataLoader(Subset(data, range(lo, hi)), batch_size=batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda", drop_last=False)
    expected = lo
    for batch in loader:
        x, ids = batch[0], batch[2]
        # The contract is __getitem__(i) -> (image, label, i); rows are written in dataset order.
        if int(ids[0]) != expected:
            raise SeppError(f"dataset returned index {int(ids[0])} for row {expected}; "
                            "its items must be (image, label, index) in dataset order")
        yield expected, x.to(device, non_blocking=True)
        expected += len(x)


def _forward(encoder: nn.Module, x: Tensor, amp: bool) -> Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and x.device.type == "cuda"):
        z = encoder(x)
    return F.normalize(z.float().flatten(1), dim=1)


@torch.no_grad()
def embed(encoder: nn.Module, data: Dataset | Tensor, device: str | torch.device = "cpu",
          batch_size: int = 512, amp: bool = True, out_path: str | os.PathLike | None = None,
          rank: int = 0, world: int = 1, *, normalize: Callable[[Tensor], Tensor] | None = None,
          workers: int = 0) -> np.ndarray:
    """Embed every row of ``data`` with ``encoder`` (eval mode, bf16 autocast on CUDA when ``amp``).

    ``data`` is an IndexedDataset with items ``(image, label, index)`` (eval transform applied), or a
    uint8 tensor ``[N, 3, H, W]`` together with ``normalize`` (e.g. ``uint8_normalizer(mean, std)``).
    Returns float32 ``[N, D]``, rows L2-normalised, in dataset order. With ``out_path`` the rows are
    streamed into a ``.npy`` memmap (returned opened read-only), so N x D may exceed memory; under
    torchrun (``world > 1``, process group initialised) ``out_path`` must be on a filesystem all ranks
    share. Every rank returns the full array.
    """
    device = torch.device(device)
    if isinstance(data, Tensor):
        if data.dtype != torch.uint8 or data.dim() != 4:
            raise SeppError(f"embed() got a {data.dtype} tensor of shape {tuple(data.shape)}; "
                            "pass uint8 images [N, 3, H, W] or an IndexedDataset")
        if normalize is None:
            raise SeppError("embed() of a uint8 tensor needs normalize=; "
                            "pass sepp.mining.embed.uint8_normalizer(mean, std)")
    n = len(data)
    if n == 0:
        raise SeppError("embed() got an empty dataset; check data.root / data.subset")
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        raise SeppError(f"embed() with world={world} needs an initialised process group; "
                        "launch with torchrun")
    lo, hi = shard_range(n, rank, world)

    was_training = encoder.training
    encoder.eval()
    try:
        # One image tells every rank the width, including ranks whose shard is empty.
        first = next(_batches(data, 0, 1, 1, device, normalize, 0))[1]
        dim = _forward(encoder, first, amp).shape[1]
        if out_path is not None:
            out = _open_shared_memmap(Path(out_path), n, dim, rank, world)
            offset = 0
        else:
            out = np.empty((hi - lo, dim), dtype=np.float32)
            offset = lo
        for s, x in _batches(data, lo, hi, batch_size, device, normalize, workers):
            z = _forward(encoder, x, amp)
            out[s - offset: s - offset + len(z)] = z.cpu().numpy()
    finally:
        encoder.train(was_training)

    if out_path is not None:
        out.flush()
        del out
        if world > 1:
            dist.barrier()
        return np.load(out_path, mmap_mode="r")
    if world > 1:
        return all_gather_rows(out, n, rank, world)
    return out


def _open_shared_memmap(path: Path, n: int, dim: int, rank: int, world: int) -> np.memmap:
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        mm.flush()
    if world > 1:
        dist.barrier()  # the header exists before other ranks open the file
    if rank != 0:
        mm = np.load(path, mmap_mode="r+")
    return mm
