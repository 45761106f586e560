"""Cosine k-nearest neighbours over the whole dataset: exact chunked search (fp32, or bf16 candidates
re-checked in fp32) and FAISS IVF search.

Embeddings are expected L2-normalised, so inner product == cosine similarity. Every backend returns
``idx`` int64 ``[N, k]`` and ``sim`` float32 ``[N, k]``, each row ordered by similarity descending with
ties broken by the smaller index, so results never depend on ``torch.topk``'s internal tie order.
No N x N matrix is ever materialised: queries go in chunks of ``chunk_size`` rows against database blocks
that fit the device; a running top-k per query is merged across blocks.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from sepp.errors import SeppError
from sepp.mining.embed import all_gather_rows, shard_range

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
BACKENDS = ("exact", "faiss")
# Below this many images FAISS uses an exact flat index unless nlist is given.
FLAT_BELOW = 10_000
# Re-check gathers chunk x candidates x D floats; bounded to 2**26 floats (256 MiB) per step.
_RECHECK_FLOATS = 1 << 26


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """``auto`` -> bf16 on CUDA (tensor cores), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise SeppError(f"mine.precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def bf16_error_bound(dim: int) -> float:
    """Bound on |bf16 matmul - exact| for unit vectors: inputs rounded to 8 significant bits
    (2 * 2**-8 relative on sum |x_i y_i| <= 1), output rounded to bf16 (2**-8), fp32 accumulation and
    the fp32 re-check itself (dim * 2**-24 each, doubled for slack)."""
    return 2**-7 + 2**-8 + 2**-15 + dim * 2**-22


def clip_k(k: int, n: int, exclude_self: bool = True) -> int:
    """Neighbours per row actually returned: ``k`` clipped to the number of candidates."""
    if int(k) < 1:
        raise SeppError(f"mine.k={k} must be >= 1")
    return min(int(k), n - 1 if exclude_self else n)


# ----------------------------------------------------------------------------------------------- helpers
def sort_key(sim: Tensor, idx: Tensor) -> Tensor:
    """int64 key, larger = better: similarity descending, then index ascending. Unique per row (indices are),
    so ``topk`` on it is deterministic. Uses the order-preserving int32 image of float32; rows < 2**32."""
    bits = (sim.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0 so they tie
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return ordered.long() * 4294967296 + (4294967295 - idx)


def top_by_key(sim: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The first ``k`` columns of each row in (sim desc, idx asc) order."""
    pos = sort_key(sim, idx).topk(k, dim=1, sorted=True).indices
    return sim.gather(1, pos), idx.gather(1, pos)


def _mask_self(sims: Tensor, qrows: Tensor, bs: int) -> None:
    """Set sims[r, qrows[r] - bs] = -inf where that column is in this block (no host sync)."""
    ncols = sims.shape[1]
    local = qrows - bs
    inside = (local >= 0) & (local < ncols)
    col = local.clamp(0, ncols - 1).unsqueeze(1)
    sims.scatter_(1, col, sims.gather(1, col).masked_fill_(inside.unsqueeze(1), -math.inf))


@contextmanager
def _ieee_matmul():
    """Disable TF32 and reduced-precision bf16 reductions: fp32 must be fp32, and the bf16 error bound
    assumes fp32 accumulation."""
    prec = torch.get_float32_matmul_precision()
    red = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prec)
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = red


def _load(emb, s: int, e: int, device: torch.device) -> Tensor:
    """Rows [s, e) as float32 on ``device``; a view when ``emb`` already lives there."""
    if isinstance(emb, Tensor):
        return emb[s:e].to(device=device, dtype=torch.float32)
    rows = emb[s:e]
    if isinstance(rows, np.memmap) or not (rows.flags.writeable and rows.flags.c_contiguous
                                           and rows.dtype == np.float32):
        rows = np.array(rows, dtype=np.float32, order="C")  # memmap / read-only: copy this block only
    return torch.from_numpy(rows).to(device)


def _is_resident(emb, device: torch.device) -> bool:
    """True when the whole array is already in ``device`` memory (blocks are views, cost nothing)."""
    if isinstance(emb, Tensor):
        return emb.device == device and emb.dtype == torch.float32
    return (device.type == "cpu" and not isinstance(emb, np.memmap) and emb.dtype == np.float32
            and emb.flags.writeable and emb.flags.c_contiguous)


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _auto_db_rows(emb, n: int, d: int, chunk: int, device: torch.device, precision: str) -> int:
    """Database rows per block so that the block (fp32 + bf16 copy) and a [chunk, block] score matrix
    fit half the free device memory (a quarter of RAM on CPU)."""
    per_row = chunk * (4 + 2 * (precision == "bf16"))  # scores
    if not _is_resident(emb, device):
        per_row += d * (4 + 2 * (precision == "bf16"))
    elif precision == "bf16":
        per_row += d * 2
    return int(max(1, min(n, _memory_budget(device) // per_row)))


# ------------------------------------------------------------------------------------------ exact search
def _block_fp32(q: Tensor, qrows: Tensor, blk: Tensor, bs: int, k: int, margin: int,
                exclude_self: bool) -> tuple[Tensor, Tensor]:
    """Exact top-k of the queries against one database block, (sim desc, idx asc) order."""
    sims = q @ blk.T
    if exclude_self:
        _mask_self(sims, qrows, bs)
    ncols = sims.shape[1]
    kk = min(k + margin, ncols)
    v, ix = sims.topk(kk, dim=1, sorted=False)
    s, i = top_by_key(v, ix + bs, k)
    if kk < ncols:
        # Candidates miss nothing unless the k-th value ties with the last candidate; then the tie group
        # may extend past it and only a key-ordered pass over the whole row is exact.
        rows = (s[:, -1] == v.min(dim=1).values).nonzero().squeeze(1)
        if rows.numel():
            cols = torch.arange(bs, bs + ncols, device=sims.device).expand(rows.numel(), -1)
            s[rows], i[rows] = top_by_key(sims[rows], cols, k)
    return s, i


def _recheck(q: Tensor, blk: Tensor, ix: Tensor) -> Tensor:
    """fp32 inner products of each query with its candidate rows ``blk[ix]``."""
    out = torch.empty(ix.shape, dtype=torch.float32, device=q.device)
    step = max(1, _RECHECK_FLOATS // max(1, ix.shape[1] * q.shape[1]))
    for a in range(0, q.shape[0], step):
        cand = blk[ix[a:a + step]]  # [c, kk, D]
        out[a:a + step] = torch.bmm(cand, q[a:a + step].unsqueeze(2)).squeeze(2)
    return out


def _block_bf16(q: Tensor, qrows: Tensor, blk: Tensor, blk_lp: Tensor, bs: int, k: int, margin: int,
                exclude_self: bool, stats: dict) -> tuple[Tensor, Tensor]:
    """bf16 scores pick k + margin candidates, fp32 re-check ranks them; rows the bf16 error bound cannot
    certify are redone exactly in fp32."""
    sims = q.bfloat16() @ blk_lp.T
    if exclude_self:
        _mask_self(sims, qrows, bs)
    ncols = sims.shape[1]
    kk = min(k + margin, ncols)
    v, ix = sims.topk(kk, dim=1, sorted=False)
    exact = _recheck(q, blk, ix)
    if exclude_self:
        exact.masked_fill_(ix + bs == qrows.unsqueeze(1), -math.inf)
    s, i = top_by_key(exact, ix + bs, k)
    if kk < ncols:
        # A non-candidate scored <= the last candidate's bf16 score, so its true score is at most that plus
        # the bf16 error; the result is certain only if the k-th re-checked score is strictly above.
        bound = bf16_error_bound(q.shape[1]) * q.norm(dim=1).max() * blk.norm(dim=1).max()
        rows = (s[:, -1] <= v.min(dim=1).values.float() + bound).nonzero().squeeze(1)
        if rows.numel():
            stats["fallback_rows"] += rows.numel()
            s[rows], i[rows] = _block_fp32(q[rows], qrows[rows], blk, bs, k, 1, exclude_self)
    return s, i


def _search_rows(emb, lo: int, hi: int, k: int, chunk: int, device: torch.device, precision: str,
                 exclude_self: bool, margin: int, db_rows: int) -> tuple[np.ndarray, np.ndarray]:
    n = emb.shape[0]
    nq = hi - lo
    best_s = torch.full((nq, k), -math.inf, device=device)
    best_i = torch.full((nq, k), n, dtype=torch.int64, device=device)  # sentinel index n loses every tie
    stats = {"fallback_rows": 0}
    with _ieee_matmul():
        for bs in range(0, n, db_rows):
            be = min(n, bs + db_rows)
            blk = _load(emb, bs, be, device)
            if not bool(torch.isfinite(blk).all()):
                raise SeppError("embeddings contain NaN or inf; the encoder checkpoint is broken (diverged "
                                "training?) — re-train or pick another checkpoint")
            blk_lp = blk.bfloat16() if precision == "bf16" else None
            for qs in range(lo, hi, chunk):
                qe = min(hi, qs + chunk)
                q = blk[qs - bs:qe - bs] if bs <= qs and qe <= be else _load(emb, qs, qe, device)
                qrows = torch.arange(qs, qe, device=device)
                kb = min(k, be - bs)
                if precision == "bf16":
                    s, i = _block_bf16(q, qrows, blk, blk_lp, bs, kb, margin, exclude_self, stats)
                else:
                    s, i = _block_fp32(q, qrows, blk, bs, kb, margin, exclude_self)
                a, b = qs - lo, qe - lo
                best_s[a:b], best_i[a:b] = top_by_key(torch.cat([best_s[a:b], s], 1),
                                                      torch.cat([best_i[a:b], i], 1), k)
    if stats["fallback_rows"]:
        log.info("bf16 search: %d query/block rows not certified by the bf16 bound were redone in fp32",
                 stats["fallback_rows"])
    return best_i.cpu().numpy(), best_s.cpu().numpy()


def topk_exact(emb, k: int, chunk_size: int = 4096, device: str | torch.device = "cpu",
               precision: str = "fp32", exclude_self: bool = True, *, margin: int | None = None,
               db_chunk: int | None = None, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every row against all rows.

    ``emb``: float32 ``[N, D]`` numpy array, ``.npy`` memmap or tensor (rows L2-normalised).
    ``precision="fp32"``: exact fp32 scores (TF32 disabled). ``"bf16"``: bf16 scores pick ``k + margin``
    candidates (default margin ``max(64, k)``), exact fp32 re-check ranks them; a row is accepted only if
    its k-th re-checked score exceeds the last candidate's bf16 score plus ``bf16_error_bound(D)`` (times
    the norms), otherwise it is redone in fp32. So the bf16 result equals the fp32 result (same neighbours,
    fp32 similarities) up to fp32 rounding between kernels. ``"auto"``: bf16 on CUDA, else fp32.
    ``db_chunk``: database rows per device block (default: the whole database when it fits; a memmap
    that does not fit is streamed block by block). With ``exclude_self`` a row is not its own neighbour
    and k is clipped to N-1. Under torchrun (``world > 1``) each rank searches a contiguous block of query
    rows and every rank receives the full result, identical to a single process.
    """
    n, d = emb.shape
    if chunk_size < 1:
        raise SeppError(f"mine.chunk_size={chunk_size} must be >= 1")
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    k = clip_k(k, n, exclude_self)
    lo, hi = shard_range(n, rank, world)
    if k == 0 or hi == lo:
        idx, sim = np.zeros((hi - lo, k), np.int64), np.zeros((hi - lo, k), np.float32)
    else:
        if margin is None:
            margin = max(64, k) if precision == "bf16" else 1
        db_rows = int(db_chunk) if db_chunk else _auto_db_rows(emb, n, d, chunk_size, device, precision)
        idx, sim = _search_rows(emb, lo, hi, k, chunk_size, device, precision, exclude_self, max(1, margin),
                                db_rows)
    if world > 1:
        idx, sim = all_gather_rows(idx, n, rank, world), all_gather_rows(sim, n, rank, world)
    return idx, sim


# ------------------------------------------------------------------------------------------ FAISS search
def _import_faiss():
    try:
        import faiss
    except ImportError:
        raise SeppError("mine.backend=faiss needs FAISS: pip install faiss-cpu (or faiss-gpu), "
                        "or use mine.backend=exact") from None
    return faiss


def _order_rows(sim: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (sim desc, idx asc) and keep k; -inf entries become idx -1 (no neighbour)."""
    order = np.lexsort((idx, -sim), axis=-1)[:, :k]
    sim, idx = np.take_along_axis(sim, order, 1), np.take_along_axis(idx, order, 1)
    idx[~np.isfinite(sim)] = -1
    return idx.astype(np.int64), sim.astype(np.float32)


def _faiss_index(faiss, emb_np: np.ndarray, nlist: int, nprobe: int | None, use_gpu, chunk_size: int):
    """``(index, GPU resources or None)``: a flat (``nlist <= 1``) or trained IVF inner-product index holding
    every row of ``emb_np``, on the GPU when ``use_gpu`` says so (see :func:`topk_faiss`)."""
    n, d = emb_np.shape
    gpu = use_gpu
    if gpu == "auto":
        gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    elif gpu and not (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        raise SeppError("use_gpu=True but this FAISS build has no GPU support or sees no GPU; "
                        "install faiss-gpu or use use_gpu='auto'")
    if nlist <= 1:
        index = faiss.IndexFlatIP(d)
    else:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    res = None
    if gpu:
        res = faiss.StandardGpuResources()
        dev = torch.cuda.current_device() if torch.cuda.is_available() else 0
        index = faiss.index_cpu_to_gpu(res, dev, index)
    if nlist > 1:
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))
        index.train(np.ascontiguousarray(emb_np[sample], dtype=np.float32))
        index.nprobe = int(nprobe) if nprobe else max(8, nlist // 16)
    for s in range(0, n, chunk_size):
        index.add(np.ascontiguousarray(emb_np[s:s + chunk_size], dtype=np.float32))
    return index, res


def topk_faiss(emb, k: int, nlist: int | None = None, nprobe: int | None = None, use_gpu="auto",
               exclude_self: bool = True, *, chunk_size: int = 16384, rank: int = 0, world: int = 1
               ) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-k with FAISS on inner product (rows L2-normalised). Same outputs as ``topk_exact``;
    a row with fewer than k neighbours found (tiny ``nprobe``) is padded with idx -1, sim -inf.

    ``nlist``: IVF cells; ``None`` -> exact ``IndexFlatIP`` below ``FLAT_BELOW`` images, else
    ``4 * sqrt(N)``; ``0`` -> flat. ``nprobe``: cells visited per query (default ``max(8, nlist // 16)``).
    ``use_gpu``: ``"auto"`` uses GPU FAISS when it is installed and sees a GPU.
    Under torchrun each rank builds the index and searches its block of query rows.
    """
    faiss = _import_faiss()
    emb_np = emb.detach().float().cpu().numpy() if isinstance(emb, Tensor) else emb
    n = emb_np.shape[0]
    k = clip_k(k, n, exclude_self)
    lo, hi = shard_range(n, rank, world)
    if nlist is None:
        nlist = 0 if n < FLAT_BELOW else int(round(4 * math.sqrt(n)))
    nlist = min(int(nlist), max(1, n // 39))  # FAISS k-means wants >= 39 points per centroid
    index, res = _faiss_index(faiss, emb_np, nlist, nprobe, use_gpu, chunk_size)  # res: keep GPU memory alive
    kq = min(n, k + int(exclude_self))
    idx = np.empty((hi - lo, k), np.int64)
    sim = np.empty((hi - lo, k), np.float32)
    for s in range(lo, hi, chunk_size):
        e = min(hi, s + chunk_size)
        if k == 0:
            break
        dd, ii = index.search(np.ascontiguousarray(emb_np[s:e], dtype=np.float32), kq)
        dd = dd.astype(np.float32)
        dd[ii < 0] = -np.inf
        if exclude_self:
            dd[ii == np.arange(s, e)[:, None]] = -np.inf
        idx[s - lo:e - lo], sim[s - lo:e - lo] = _order_rows(dd, np.where(ii < 0, n, ii), k)
    if world > 1:
        idx, sim = all_gather_rows(idx, n, rank, world), all_gather_rows(sim, n, rank, world)
    return idx, sim


def topk(emb, k: int, backend: str = "exact", *, chunk_size: int = 4096, device: str | torch.device = "cpu",
         precision: str = "auto", exclude_self: bool = True, nlist: int | None = None,
         nprobe: int | None = None, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to ``topk_exact`` or ``topk_faiss`` (``mine.backend``)."""
    if backend == "exact":
        return topk_exact(emb, k, chunk_size, device, precision, exclude_self, rank=rank, world=world)
    if backend == "faiss":
        use_gpu = "auto" if torch.device(device).type == "cuda" else False
        return topk_faiss(emb, k, nlist, nprobe, use_gpu, exclude_self, rank=rank, world=world)
    raise SeppError(f"mine.backend={backend!r} is not one of {', '.join(BACKENDS)}")

