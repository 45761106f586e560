"""Embed a whole dataset with a frozen encoder: float32, L2-normalised, in dataset order.

Under torchrun every rank embeds a contiguous shard of the rows; the shards are then gathered (in memory)
or written into one shared ``.npy`` memmap, so every rank ends up with the full array.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sepp import distributed as D
from sepp.errors import SeppError
from sepp.fileio import require_shared_dir
from sepp.models.features import iter_features

# Rows per all_gather call: bounds the communication buffer (65536 x 2048 x 4 B = 512 MiB per rank).
_GATHER_ROWS = 65536


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous block ``[lo, hi)`` of ``n`` rows owned by ``rank``; sizes differ by at most one."""
    return n * rank // world, n * (rank + 1) // world


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


@torch.no_grad()
def embed(encoder: nn.Module, data: Dataset | Tensor, device: str | torch.device = "cpu",
          batch_size: int = 512, amp: bool = True, out_path: str | os.PathLike | None = None,
          rank: int = 0, world: int = 1, *, normalize: Callable[[Tensor], Tensor] | None = None,
          workers: int = 0) -> np.ndarray:
    """Embed every row of ``data`` with ``encoder`` (eval mode, bf16 autocast on CUDA when ``amp``).

    ``data`` is an IndexedDataset with items ``(image, label, index)`` (eval transform applied), or a
    uint8 tensor ``[N, 3, H, W]`` together with ``normalize`` (``sepp.data.transforms.uint8_normalizer``).
    Returns float32 ``[N, D]``, rows L2-normalised, in dataset order. With ``out_path`` the rows are
    streamed into a ``.npy`` memmap (returned opened read-only), so N x D may exceed memory; under
    torchrun (``world > 1``, process group initialised) ``out_path`` must be on a filesystem all ranks
    share. Every rank returns the full array.
    """
    device = torch.device(device)
    n = len(data)  # input checks (uint8 layout, normalize given) happen in iter_features
    if n == 0:
        raise SeppError("embed() got an empty dataset; check data.root / data.subset")
    if world > 1 and not D.is_initialized():
        raise SeppError(f"embed() with world={world} needs an initialised process group; "
                        "launch with torchrun")
    lo, hi = shard_range(n, rank, world)

    # One image tells every rank the width, including ranks whose shard is empty.
    _, first = next(iter_features(encoder, data, device, 1, amp, normalize, 0, 0, 1))
    dim = first.shape[1]
    if out_path is not None:
        out = _open_shared_memmap(Path(out_path), n, dim, rank, world)
        offset = 0
    else:
        out = np.empty((hi - lo, dim), dtype=np.float32)
        offset = lo
    for s, f in iter_features(encoder, data, device, batch_size, amp, normalize, workers, lo, hi):
        out[s - offset: s - offset + len(f)] = F.normalize(f, dim=1).cpu().numpy()

    if out_path is not None:
        out.flush()
        del out
        if world > 1:
            D.barrier()
        return np.load(out_path, mmap_mode="r")
    if world > 1:
        return all_gather_rows(out, n, rank, world)
    return out


def _open_shared_memmap(path: Path, n: int, dim: int, rank: int, world: int) -> np.memmap:
    if world > 1:  # every rank writes its rows into this one file
        require_shared_dir(path.parent, "the mining folder (embeddings.npy)")
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
        mm.flush()
    if world > 1:
        D.barrier()  # the header exists before other ranks open the file
    if rank != 0:
        mm = np.load(path, mmap_mode="r+")
    return mm
