"""Embedding and nearest-neighbour search: exact search against a brute force, bf16 and FAISS against exact,
memmap streaming, and the 2-process sharded path against a single process."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sepp.errors import SeppError
from sepp.data.transforms import uint8_normalizer
from sepp.mining.embed import embed, shard_range
from sepp.mining import search
from sepp.mining.search import sort_key, topk, topk_exact, topk_faiss

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def brute_topk(x: np.ndarray, k: int, exclude_self: bool = True):
    """Full float64 similarity matrix, each row lexsorted by (-sim, index)."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    n = len(x)
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    k = min(k, n - 1 if exclude_self else n)
    order = np.stack([np.lexsort((np.arange(n), -row))[:k] for row in s]).reshape(n, k)
    return order, np.take_along_axis(s, order, 1).astype(np.float32)


def clustered(n: int, d: int, clusters: int, spread: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# Small-integer/4 entries make every inner product exact in fp32 and bf16 (any summation order), so exact
# ties are real ties, and the grid produces many duplicated rows.
@st.composite
def grid_embeddings(draw):
    n = draw(st.integers(2, 40))
    d = draw(st.integers(1, 6))
    vals = draw(st.lists(st.integers(-3, 3), min_size=n * d, max_size=n * d))
    x = np.array(vals, dtype=np.float32).reshape(n, d) / 4
    dup = draw(st.lists(st.integers(0, n - 1), max_size=4))
    if dup:
        x = np.concatenate([x, x[dup]])
    return x


@settings(max_examples=120, deadline=None)
@given(x=grid_embeddings(), k=st.integers(1, 50), chunk=st.integers(1, 50),
       db_chunk=st.one_of(st.none(), st.integers(1, 50)), exclude_self=st.booleans(),
       precision=st.sampled_from(["fp32", "bf16"]))
def test_topk_exact_equals_brute_force(x, k, chunk, db_chunk, exclude_self, precision):
    idx, sim = topk_exact(x, k, chunk_size=chunk, precision=precision, exclude_self=exclude_self,
                          db_chunk=db_chunk)
    ref_idx, ref_sim = brute_topk(x, k, exclude_self)
    assert idx.dtype == np.int64 and sim.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_array_equal(sim, ref_sim)


def test_sort_key_orders_by_similarity_then_index():
    sim = torch.tensor([[0.5, -0.0, 0.0, -1.0, 0.5, float("-inf"), 2.0]])
    idx = torch.tensor([[4, 3, 1, 0, 2, 5, 6]])
    order = sort_key(sim, idx).argsort(dim=1, descending=True)
    # 2.0 first; the two 0.5 by index (2 before 4); +0.0 and -0.0 tie, index 1 before 3; then -1, -inf.
    assert idx[0, order[0]].tolist() == [6, 2, 4, 1, 3, 0, 5]


def test_k_at_least_n_is_clipped():
    x = clustered(6, 4, 2, 0.1)
    idx, sim = topk_exact(x, 10)
    assert idx.shape == sim.shape == (6, 5)
    assert all(sorted(row) == sorted(set(range(6)) - {r}) for r, row in enumerate(idx.tolist()))
    idx, sim = topk_exact(x, 10, exclude_self=False)
    assert idx.shape == (6, 6) and (idx[:, 0] == np.arange(6)).all()
    idx, sim = topk_exact(x[:1], 3)
    assert idx.shape == (1, 0)
    with pytest.raises(SeppError, match="k=0"):
        topk_exact(x, 0)


def test_bf16_matches_fp32_on_separated_data():
    x = clustered(600, 32, 12, 0.3, seed=1)
    i32, s32 = topk_exact(x, 10, chunk_size=128, precision="fp32")
    i16, s16 = topk_exact(x, 10, chunk_size=128, precision="bf16", db_chunk=256)
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(s16, s32, atol=2e-6)


def test_bf16_uncertified_rows_fall_back_to_exact():
    # Points on a short arc: all neighbour similarities lie within one bf16 step of 1.0, so bf16 scores
    # cannot rank them; only the certified fallback to fp32 gets the neighbours right.
    theta = np.random.default_rng(3).permutation(300) * 2e-3
    x = np.zeros((300, 8), np.float32)
    x[:, 0], x[:, 1] = np.cos(theta), np.sin(theta)
    i32, s32 = topk_exact(x, 5, chunk_size=100)
    order = np.argsort(theta)
    pos = np.empty(300, int)
    pos[order] = np.arange(300)
    assert (np.abs(pos[i32] - pos[:, None]) <= 5).all()  # fp32 finds arc neighbours
    i16, s16 = topk_exact(x, 5, chunk_size=100, precision="bf16", margin=2)
    np.testing.assert_array_equal(i16, i32)
    np.testing.assert_allclose(s16, s32, atol=2e-6)


def test_memmap_database_streamed(tmp_path, monkeypatch):
    x = clustered(300, 16, 5, 0.5, seed=2)
    path = tmp_path / "emb.npy"
    np.save(path, x)
    mm = np.load(path, mmap_mode="r")
    ref = topk_exact(x, 7, chunk_size=64)
    for db_chunk in (None, 50, 299):
        got = topk_exact(mm, 7, chunk_size=64, db_chunk=db_chunk)
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], atol=1e-6)
    got = topk_exact(torch.from_numpy(x), 7, chunk_size=1000)
    np.testing.assert_array_equal(got[0], ref[0])
    # A memory budget of ~40 database rows makes the automatic plan stream the memmap in blocks.
    monkeypatch.setattr(search, "_memory_budget", lambda device: 40 * (64 * 4 + 16 * 4))
    assert search._auto_db_rows(mm, 300, 16, 64, torch.device("cpu"), "fp32") == 40
    got = topk_exact(mm, 7, chunk_size=64)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], atol=1e-6)


def test_nan_embeddings_rejected():
    x = clustered(10, 4, 2, 0.1)
    x[3, 1] = np.nan
    with pytest.raises(SeppError, match="NaN"):
        topk_exact(x, 2)


def test_faiss_ivf_recall_on_clustered_data():
    x = clustered(12000, 32, 60, 0.35, seed=4)
    ref, _ = topk_exact(x, 10, chunk_size=2048)
    idx, sim = topk_faiss(x, 10)  # 12000 >= FLAT_BELOW: IVF with default nlist / nprobe
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), ref.tolist())])
    assert recall >= 0.95
    assert (idx != np.arange(len(x))[:, None]).all()
    # rows sorted by similarity, and the similarities are the true inner products
    assert (np.diff(sim, axis=1) <= 0).all()
    np.testing.assert_allclose(sim, np.einsum("nd,nkd->nk", x, x[idx]), atol=1e-5)


def test_faiss_flat_equals_exact_and_dispatch():
    x = clustered(500, 16, 8, 0.5, seed=5)
    ref = topk_exact(x, 6)
    for got in (topk_faiss(x, 6), topk(x, 6, backend="faiss"), topk(x, 6, backend="exact")):
        np.testing.assert_array_equal(got[0], ref[0])
        np.testing.assert_allclose(got[1], ref[1], atol=1e-5)
    with pytest.raises(SeppError, match="backend"):
        topk(x, 6, backend="annoy")


def test_faiss_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(SeppError, match="pip install faiss-cpu"):
        topk_faiss(clustered(20, 4, 2, 0.1), 3)


# ---------------------------------------------------------------------------------------------- embedding
class TinyImages(torch.utils.data.Dataset):
    """IndexedDataset stand-in: items (normalised image, label, index)."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.normalize = uint8_normalizer(MEAN, STD)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.normalize(self.images[i:i + 1].float() / 255)[0], 0, i


def tiny_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 5))


def tiny_images(n: int = 37) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_embed_paths_agree(tmp_path):
    images, enc = tiny_images(), tiny_encoder()
    enc.train()
    ref = embed(enc, TinyImages(images), "cpu", batch_size=8)
    assert enc.training  # mode restored
    assert ref.shape == (37, 5) and ref.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-6)
    with torch.no_grad():
        enc.eval()
        direct = torch.nn.functional.normalize(enc(TinyImages(images).normalize(images.float() / 255)), dim=1).numpy()
    np.testing.assert_allclose(ref, direct, atol=1e-5)

    mm = embed(enc, TinyImages(images), "cpu", batch_size=5, out_path=tmp_path / "e.npy")
    assert isinstance(mm, np.memmap)
    np.testing.assert_allclose(mm, ref, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), ref, atol=1e-6)

    tens = embed(enc, images, "cpu", batch_size=6, normalize=uint8_normalizer(MEAN, STD))
    np.testing.assert_allclose(tens, ref, atol=1e-6)
    with pytest.raises(SeppError, match="normalize"):
        embed(enc, images, "cpu")


def test_shard_range_partitions():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3, 4):
            blocks = [shard_range(n, r, world) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))


# ---------------------------------------------------------------------------------------- 2-process gloo
def _worker(rank: int, world: int, init: str, tmp: str, x: np.ndarray, images: torch.Tensor):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        res = {}
        res["exact_i"], res["exact_s"] = topk_exact(x, 6, chunk_size=16, rank=rank, world=world)
        res["bf16_i"], res["bf16_s"] = topk_exact(x, 6, chunk_size=16, precision="bf16", rank=rank,
                                                  world=world)
        res["faiss_i"], res["faiss_s"] = topk_faiss(x, 6, rank=rank, world=world)
        res["embed"] = embed(tiny_encoder(), TinyImages(images), "cpu", batch_size=4, rank=rank, world=world)
        res["embed_mm"] = np.array(embed(tiny_encoder(), TinyImages(images), "cpu", batch_size=4,
                                         out_path=f"{tmp}/emb.npy", rank=rank, world=world))
        np.savez(f"{tmp}/rank{rank}.npz", **res)
    finally:
        dist.destroy_process_group()


def test_two_process_sharded_equals_single_process(tmp_path):
    x = clustered(61, 8, 4, 0.4, seed=6)
    images = tiny_images(11)
    mp.spawn(_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path), x, images), nprocs=2, join=True)
    single = {"exact": topk_exact(x, 6), "bf16": topk_exact(x, 6, precision="bf16"),
              "faiss": topk_faiss(x, 6)}
    emb = embed(tiny_encoder(), TinyImages(images), "cpu")
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for key, (i, s) in single.items():
            np.testing.assert_array_equal(got[f"{key}_i"], i)
            np.testing.assert_allclose(got[f"{key}_s"], s, atol=1e-6)
        np.testing.assert_allclose(got["embed"], emb, atol=1e-6)
        np.testing.assert_allclose(got["embed_mm"], emb, atol=1e-6)
