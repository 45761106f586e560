"""Time nearest-neighbour mining backends on random clustered, L2-normalised embeddings.

    python benchmarks/mining.py --n 20000 --d 128 --k 20 --device cpu
    python benchmarks/mining.py --n 1281167 --d 2048 --device cuda --json results.json

Rows: exact fp32, exact bf16 (CUDA only: bf16 candidates + certified fp32 re-check) and FAISS IVF.
Throughput counts the full similarity matrix, 2 * N * N * d FLOPs, whatever the backend really does;
recall@k is the mean fraction of the exact top-k each backend returns.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from sepp.mining.search import topk_exact, topk_faiss


def clustered_embeddings(n: int, d: int, clusters: int, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def recall(idx: np.ndarray, ref: np.ndarray) -> float:
    """Mean over rows of |idx_row & ref_row| / k."""
    k = ref.shape[1]
    hits = (idx[:, :, None] == ref[:, None, :]).any(axis=2).sum(axis=1)
    return float(hits.mean() / k)


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="number of embeddings")
    ap.add_argument("--d", type=int, default=128, help="embedding width")
    ap.add_argument("--k", type=int, default=20, help="neighbours per row")
    ap.add_argument("--clusters", type=int, default=100, help="clusters in the synthetic data")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--chunk", type=int, default=4096, help="query rows per matmul")
    ap.add_argument("--nlist", type=int, default=None, help="FAISS IVF cells (default 4 sqrt(N))")
    ap.add_argument("--nprobe", type=int, default=None, help="FAISS cells visited per query")
    ap.add_argument("--no-faiss", action="store_true", help="skip FAISS")
    ap.add_argument("--backends", default="fp32,bf16,faiss",
                    help="comma list of fp32, bf16 (CUDA only), faiss; the first is the recall reference")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    args = ap.parse_args(argv)

    x = clustered_embeddings(args.n, args.d, args.clusters)
    flops = 2.0 * args.n * args.n * args.d
    dev = torch.device(args.device)
    # Each exact backend is warmed up on a small slice first (kernel selection, allocator).
    wanted = [b for b in args.backends.split(",") if b]
    if args.no_faiss:
        wanted = [b for b in wanted if b != "faiss"]
    runs = []
    for name in wanted:
        if name in ("fp32", "bf16"):
            if name == "bf16" and dev.type != "cuda":
                continue
            topk_exact(x[:2048], args.k, args.chunk, dev, name)
            runs.append((f"exact {name}", lambda p=name: topk_exact(x, args.k, args.chunk, dev, p)))
        elif name == "faiss":
            gpu = "auto" if dev.type == "cuda" else False
            runs.append(("faiss", lambda: topk_faiss(x, args.k, args.nlist, args.nprobe, use_gpu=gpu)))
        else:
            ap.error(f"unknown backend {name!r}")

    results, ref = [], None
    for name, fn in runs:
        (idx, _), secs = timed(fn)
        ref = idx if ref is None else ref
        results.append({"backend": name, "n": args.n, "d": args.d, "k": args.k, "device": str(dev),
                        "seconds": secs, "tflops": flops / secs / 1e12, "recall_at_k": recall(idx, ref)})

    print(f"{'backend':<12} {'seconds':>9} {'TFLOP/s':>9} {'recall@k':>9}   (N={args.n}, d={args.d}, "
          f"k={args.k}, {dev})")
    for r in results:
        print(f"{r['backend']:<12} {r['seconds']:>9.3f} {r['tflops']:>9.3f} {r['recall_at_k']:>9.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
