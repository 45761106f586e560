"""Pair selection, pair files, mining statistics, mining figures and the end-to-end mining step."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from sepp.errors import SeppError
from sepp.data.pairs import Pairs, check_pairs_match, load_pairs, save_pairs
from sepp.mining.pairs import select_pairs
from sepp.mining.run import MineSettings, mine_pairs
from sepp.mining.stats import mining_stats
from sepp.mining.plots import pairs_gallery, similarity_hist

PNG = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------- selection
def test_select_pairs_threshold_edges_and_order():
    idx = np.array([[1, 2, 3], [0, 1, 2], [-1, 0, 1], [2, 0, 1]])
    sim = np.array([[0.9, 0.5, 0.5], [0.5, 0.4, 0.2], [0.8, 0.7, 0.6], [0.49999997, 0.3, 0.2]],
                   dtype=np.float32)
    i, j, s = select_pairs(idx, sim, k=2, threshold=0.5)
    # 0.5 == threshold kept; column 3 beyond k ignored; row 1's self (1) dropped; idx -1 dropped;
    # 0.49999997 < 0.5 dropped.
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    np.testing.assert_array_equal(s, np.array([0.9, 0.5, 0.5, 0.7], np.float32))
    assert i.dtype == j.dtype == np.int64 and s.dtype == np.float32
    i, j, s = select_pairs(idx, sim, k=10, threshold=-1.0)  # k beyond the columns uses all
    assert len(i) == 10  # 12 entries minus the -1 and the self entry


@settings(max_examples=80, deadline=None)
@given(n=st.integers(2, 15), kcols=st.integers(1, 6), k=st.integers(1, 7), seed=st.integers(0, 10**6),
       threshold=st.sampled_from([-1.0, 0.0, 0.25, 0.5]), mutual=st.booleans(),
       per_image=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.5, 10.0]))
def test_select_pairs_matches_brute_force(n, kcols, k, seed, threshold, mutual, per_image):
    rng = np.random.default_rng(seed)
    kcols = min(kcols, n - 1)
    idx = np.stack([rng.choice(np.delete(np.arange(n), r), kcols, replace=False) for r in range(n)])
    sim = np.sort(rng.choice([0.0, 0.25, 0.5, 0.75], size=(n, kcols)), axis=1)[:, ::-1].astype(np.float32)
    candidates = [(r, int(idx[r, c]), float(sim[r, c])) for r in range(n) for c in range(min(k, kcols))]
    count = round(per_image * n)  # keep the `count` most similar candidates and every tie of the last one
    floor = sorted((s for _, _, s in candidates), reverse=True)[count - 1] if 0 < count <= len(candidates) else None
    if per_image and count == 0:
        floor = np.inf
    kept = [(a, b, s) for a, b, s in candidates if s >= threshold and (floor is None or s >= floor)]
    if mutual:
        fwd = {(a, b) for a, b, _ in kept}
        kept = [(a, b, s) for a, b, s in kept if (b, a) in fwd]
    i, j, s = select_pairs(idx, sim, k, threshold, mutual, per_image=per_image)
    assert list(zip(i.tolist(), j.tolist(), s.tolist())) == kept


def test_select_pairs_per_image_by_hand():
    # 3 images, 2 neighbours each; per_image=1 keeps the 3 most similar of the 6 pairs, wherever they are
    idx = np.array([[1, 2], [0, 2], [0, 1]])
    sim = np.array([[0.9, 0.8], [0.9, 0.5], [0.8, 0.4]], np.float32)
    i, j, s = select_pairs(idx, sim, k=2, threshold=0.0, per_image=1.0)
    # the 3rd largest similarity is 0.8, and both 0.8 pairs are kept (ties)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 0), (2, 0)]
    i, _, _ = select_pairs(idx, sim, k=2, threshold=0.0, per_image=0.5)  # round(1.5) = 2: the two 0.9 pairs
    assert i.tolist() == [0, 1]
    i, _, _ = select_pairs(idx, sim, k=2, threshold=0.85, per_image=2.0)  # the threshold still applies
    assert i.tolist() == [0, 1]


# ------------------------------------------------------------------------------------------- pair files
META = {"name": "cifar10", "split": "train", "num_images": 10, "fingerprint": "abc123", "k": 2}


def test_pair_file_round_trip(tmp_path):
    path = tmp_path / "sub" / "pairs.npz"
    save_pairs(path, Pairs([0, 3, 9], [1, 2, 0], [0.9, 0.8, 0.75], META))
    p = load_pairs(path)
    assert isinstance(p, Pairs) and len(p) == 3 and p.meta == META and p.path == str(path)
    assert p.i.tolist() == [0, 3, 9] and p.j.tolist() == [1, 2, 0]
    np.testing.assert_array_equal(p.sim, np.float32([0.9, 0.8, 0.75]))
    assert p.i.dtype == np.int64 and p.sim.dtype == np.float32
    check_pairs_match(p, name="cifar10", split="train", num_images=10, fingerprint="abc123")
    assert os.listdir(path.parent) == ["pairs.npz"]  # no temp files left


def test_pair_file_mismatch_errors(tmp_path):
    save_pairs(tmp_path / "p.npz", Pairs([0], [5], [0.9], META))
    p = load_pairs(tmp_path / "p.npz")
    with pytest.raises(SeppError, match=r"num_images 10 != 5.*re-run `sepp mine` for this dataset/subset"):
        check_pairs_match(p, name="cifar10", split="train", num_images=5, fingerprint="abc123")
    with pytest.raises(SeppError, match=r"name 'cifar10' != 'cifar100'; fingerprint 'abc123' != 'x'"):
        check_pairs_match(p, name="cifar100", split="train", num_images=10, fingerprint="x")
    with pytest.raises(SeppError, match="split 'train' != 'test'"):
        check_pairs_match(p, name="cifar10", split="test", num_images=10, fingerprint="abc123")
    save_pairs(tmp_path / "bad.npz", Pairs([0], [12], [0.9], META))
    with pytest.raises(SeppError, match="outside"):
        check_pairs_match(load_pairs(tmp_path / "bad.npz"), name="cifar10", split="train", num_images=10,
                          fingerprint="abc123")


def test_pair_file_missing_or_corrupt(tmp_path):
    with pytest.raises(SeppError, match="not found"):
        load_pairs(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(SeppError, match="corrupt"):
        load_pairs(tmp_path / "junk.npz")
    np.savez(tmp_path / "nometa.npz", i=np.zeros(1, np.int64), j=np.zeros(1, np.int64), sim=np.zeros(1))
    with pytest.raises(SeppError, match="corrupt"):
        load_pairs(tmp_path / "nometa.npz")
    np.savez(tmp_path / "short.npz", i=np.zeros(2, np.int64), j=np.zeros(1, np.int64), sim=np.zeros(1),
             meta=np.array("{}"))
    with pytest.raises(SeppError, match="malformed"):
        load_pairs(tmp_path / "short.npz")


def test_pair_file_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "pairs.npz"
    save_pairs(path, Pairs([0], [1], [0.9], META))
    before = path.read_bytes()

    def crash(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pairs(path, Pairs([0, 1], [1, 0], [0.9, 0.9], META))
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["pairs.npz"]


# ------------------------------------------------------------------------------------------------ stats
def test_mining_stats_by_hand():
    labels = np.array([0, 0, 1, 1, 2, -1])
    i = np.array([0, 0, 1, 2, 3, 3, 4])
    j = np.array([1, 2, 0, 4, 2, 5, 3])
    sim = np.array([0.9, 0.8, 0.9, 0.7, 0.6, 0.95, 0.5], np.float32)
    st_ = mining_stats(i, j, sim, num_images=8, labels=np.append(labels, [0, 1]),
                       classes=["cat", "dog", "car"])
    assert st_["num_pairs"] == 7 and st_["num_images"] == 8
    assert st_["coverage"] == 6 / 8  # images 0..5 appear; 6, 7 do not
    assert st_["anchor_coverage"] == 5 / 8  # anchors 0, 1, 2, 3, 4
    assert st_["sim"]["min"] == pytest.approx(0.5) and st_["sim"]["max"] == pytest.approx(0.95)
    assert st_["sim"]["p50"] == pytest.approx(np.quantile(sim.astype(np.float64), 0.5))
    # labelled pairs (pair (3, 5) has an unknown end): (0,1) ok, (0,2) wrong, (1,0) ok, (2,4) wrong,
    # (3,2) ok, (4,3) wrong -> 3/6
    assert st_["labelled_pairs"] == 6 and st_["precision"] == pytest.approx(0.5)
    assert st_["per_class"]["cat"] == {"pairs": 3, "precision": pytest.approx(2 / 3)}
    assert st_["per_class"]["dog"] == {"pairs": 2, "precision": pytest.approx(0.5)}
    assert st_["per_class"]["car"] == {"pairs": 1, "precision": 0.0}
    assert st_["confusion"] == [[0, 1, 0], [0, 0, 1], [0, 1, 0]]
    assert st_["top_confused"] == [{"classes": ["dog", "car"], "count": 2},
                                   {"classes": ["cat", "dog"], "count": 1}]
    json.dumps(st_)


def test_mining_stats_without_labels_or_pairs():
    st_ = mining_stats([], [], [], num_images=4)
    assert st_["num_pairs"] == 0 and st_["coverage"] == 0.0 and st_["sim"]["p50"] is None
    assert "precision" not in st_
    st_ = mining_stats([0], [1], [0.5], num_images=2, labels=np.array([-1, -1]))
    assert st_["precision"] is None and st_["labelled_pairs"] == 0
    json.dumps(st_)


# ---------------------------------------------------------------------------------------------- figures
def _image(t: int) -> np.ndarray:
    return np.full((8, 8, 3), (t * 40) % 256, np.uint8)


def test_plots_write_pngs(tmp_path):
    i, j = np.array([0, 0, 1, 2]), np.array([1, 2, 0, 0])
    sim = np.array([0.9, 0.8, 0.9, 0.8], np.float32)
    pairs_gallery(_image, i, j, sim, tmp_path / "g.png", labels=np.array([0, 0, 1]), classes=["a", "b"])
    pairs_gallery(_image, i, j, sim, tmp_path / "g2.png", anchors=2, partners=1)
    pairs_gallery(_image, i[:0], j[:0], sim[:0], tmp_path / "g3.png")
    similarity_hist(sim, tmp_path / "h.png", correct=np.array([True, False, True, False]))
    similarity_hist(sim[:0], tmp_path / "h2.png")
    for name in ("g.png", "g2.png", "g3.png", "h.png", "h2.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000
    g2 = Image.open(tmp_path / "g2.png")
    # k=1: groups of (anchor + 1 partner) three to a row; anchors=2 rows allow all 3 anchors in one row
    assert g2.size == (int(1.6 * 2 * 3 * 100), int(1.8 * 1 * 100))


# ----------------------------------------------------------------------------------------------- mining
class ColourDataset(torch.utils.data.Dataset):
    """Three colour classes with noise; items (normalised image, label, index) like an IndexedDataset."""

    name, split, classes = "toy", "train", ["red", "green", "blue"]

    def __init__(self, n: int = 60):
        rng = np.random.default_rng(0)
        self.labels = rng.integers(0, 3, n).astype(np.int64)
        base = np.eye(3)[self.labels] * 180 + 40
        noisy = base[:, None, None, :] + rng.normal(0, 20, (n, 8, 8, 3))
        self.images = np.clip(noisy, 0, 255).astype(np.uint8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, t):
        x = torch.from_numpy(self.images[t]).permute(2, 0, 1).float() / 255 - 0.5
        return x, int(self.labels[t]), t

    def load_image(self, t):
        return Image.fromarray(self.images[t])

    def fingerprint(self):
        return "toyfp"


def test_mine_pairs_end_to_end(tmp_path):
    ds = ColourDataset()
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # mean colour: clusters by class
    settings = MineSettings(k=5, threshold=0.5, mutual=False, backend="exact", chunk_size=16, precision="auto",
                            batch_size=7, save_embeddings=True)
    returned, stats = mine_pairs(encoder, ds, settings, device="cpu", out_dir=tmp_path, meta={"encoder": "ckpt-hash"})
    assert stats["precision"] == 1.0 and stats["num_pairs"] == 60 * 5 and stats["coverage"] == 1.0
    p = load_pairs(tmp_path / "pairs.npz")
    assert returned.digest() == p.digest()  # what mining returns is what it wrote
    assert p.meta["features"] == "backbone" and p.meta["rank_from"] == 1
    check_pairs_match(p, name="toy", split="train", num_images=60, fingerprint="toyfp")
    assert p.meta["encoder"] == "ckpt-hash" and p.meta["k"] == 5 and p.meta["threshold"] == 0.5
    assert p.meta["mutual"] is False and p.meta["precision"] == "fp32"
    assert (ds.labels[p.i] == ds.labels[p.j]).all()
    assert json.loads((tmp_path / "mining.json").read_text())["num_pairs"] == 300
    emb = np.load(tmp_path / "embeddings.npy")
    assert emb.shape == (60, 3)
    np.testing.assert_allclose(p.sim, np.einsum("nd,nd->n", emb[p.i], emb[p.j]), atol=1e-6)
    for name in ("pairs_gallery.png", "similarity_hist.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG)


def test_mine_pairs_never_reads_labels(tmp_path):
    ds = ColourDataset()
    settings = MineSettings(k=3, threshold=0.0, mutual=True, backend="faiss", chunk_size=8, precision="fp32",
                            batch_size=16, plots=False)
    _, ref = mine_pairs(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), ds, settings, device="cpu",
                        out_dir=tmp_path / "a", meta={})
    ds.labels = np.random.default_rng(1).permutation(ds.labels)  # scrambled labels: same pairs
    mine_pairs(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), ds, settings, device="cpu",
               out_dir=tmp_path / "b", meta={})
    a, b = load_pairs(tmp_path / "a" / "pairs.npz"), load_pairs(tmp_path / "b" / "pairs.npz")
    assert ref["num_pairs"] == len(a) > 0
    np.testing.assert_array_equal(a.i, b.i)
    np.testing.assert_array_equal(a.j, b.j)
    assert not (tmp_path / "a" / "pairs_gallery.png").exists()


@pytest.mark.parametrize("mode", ["enlarge", "substitute", "multi"])
def test_epoch_plan_takes_the_pairs_type_as_the_arrays(mode):
    """The trainer hands the loaders its :class:`Pairs` unchanged; the plan equals the one from ``(i, j)``."""
    from sepp.data.pairs import Pairs
    from sepp.data.sampling import epoch_plan

    i, j = np.array([0, 1, 2, 2, 5]), np.array([3, 4, 0, 7, 6])
    views = 3 if mode == "multi" else 2
    a = epoch_plan(8, 2, 1, Pairs(i, j), mode=mode, views=views)
    b = epoch_plan(8, 2, 1, (i, j), mode=mode, views=views)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == views
