"""Semantic positive pairs end to end: epoch plans, mining from a checkpoint against brute force, SePP
training with every method, pair-file mismatch, negative masking, re-mining, and `sepp run`."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_overrides
from sepp.cli import main as cli
from sepp.config import load_config
from sepp.data.sampling import epoch_plan, shard
from sepp.engine import trainer as trainer_mod
from sepp.engine.trainer import pretrain
from sepp.errors import SeppError
from sepp.data.pairs import load_pairs

pytestmark = pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")


# ------------------------------------------------------------------------------------------ epoch plans

@st.composite
def pair_sets(draw):
    n = draw(st.integers(2, 60))
    m = draw(st.integers(0, 3 * n))
    i = draw(st.lists(st.integers(0, n - 1), min_size=m, max_size=m))
    j = [(a + draw(st.integers(1, n - 1))) % n for a in i]  # never a self pair
    return n, np.array(i, dtype=np.int64), np.array(j, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(pair_sets(), st.integers(0, 5), st.integers(0, 3))
def test_enlarge_epoch_is_self_pairs_plus_semantic_pairs(ps, epoch, seed):
    n, i, j = ps
    ids1, ids2 = epoch_plan(n, epoch, seed, pairs=(i, j), mode="enlarge")
    assert len(ids1) == n + len(i)
    got = sorted(zip(ids1.tolist(), ids2.tolist()))
    want = sorted([(a, a) for a in range(n)] + list(zip(i.tolist(), j.tolist())))
    assert got == want
    again = epoch_plan(n, epoch, seed, pairs=(i, j), mode="enlarge")
    assert np.array_equal(again[0], ids1) and np.array_equal(again[1], ids2)


@settings(max_examples=40, deadline=None)
@given(pair_sets(), st.integers(1, 4), st.integers(1, 8))
def test_shards_are_disjoint_equal_and_whole_batches(ps, world, batch):
    n, i, j = ps
    ids1, ids2 = epoch_plan(n, 0, 0, pairs=(i, j))
    parts = [shard(ids1, ids2, rank=r, world=world, batch_size=batch) for r in range(world)]
    lengths = {len(p[0]) for p in parts}
    assert len(lengths) == 1 and lengths.pop() % batch == 0
    positions = np.arange(len(ids1))
    taken = np.concatenate([positions[r::world][: len(parts[r][0])] for r in range(world)])
    assert len(np.unique(taken)) == len(taken)


def test_substitute_uses_partners_at_rate_p():
    n = 20000
    rng = np.random.default_rng(0)
    has = rng.random(n) < 0.6  # 60 % of images have partners
    i = np.repeat(np.flatnonzero(has), 3)
    j = (i + rng.integers(1, n, size=len(i))) % n
    partners = {a: set() for a in range(n)}
    for a, b in zip(i.tolist(), j.tolist()):
        partners[a].add(b)
    for p in (0.0, 0.3, 0.8, 1.0):
        ids1, ids2 = epoch_plan(n, 1, 0, pairs=(i, j), mode="substitute", p=p)
        assert len(ids1) == n and sorted(ids1.tolist()) == list(range(n))
        swapped = ids1 != ids2
        assert all(b in partners[a] for a, b in zip(ids1[swapped].tolist(), ids2[swapped].tolist()))
        assert not swapped[~has[ids1]].any()  # no partners: keeps its own image
        k = int(has.sum())
        rate = swapped[has[ids1]].mean()
        sd = np.sqrt(max(p * (1 - p), 1e-12) / k)
        assert abs(rate - p) <= 4 * sd + 1e-9, (p, rate)


# ------------------------------------------------------------------------------------------ mining + SePP

@pytest.fixture(scope="module")
def encoder_run(cifar_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoder")
    pretrain(load_config("cifar10_mocov2", tiny_overrides(cifar_root, out, subset=200, batch=40)), progress=False)
    return out


@pytest.fixture(scope="module")
def mined(encoder_run, cifar_root):
    out = encoder_run / "mined"
    assert cli(["mine", "--checkpoint", str(encoder_run / "last.pt"), f"data.root={cifar_root}",
                "mine.k=3", "mine.threshold=0.3", "mine.save_embeddings=true", "mine.chunk_size=37",
                f"mine.out={out}"]) == 0
    return out


def _brute_force_pairs(emb, k, threshold, mutual):
    sim = emb.astype(np.float64) @ emb.astype(np.float64).T
    np.fill_diagonal(sim, -np.inf)
    keep = set()
    for a in range(len(emb)):
        order = np.lexsort((np.arange(len(emb)), -sim[a]))[:k]
        keep |= {(a, int(b)) for b in order if sim[a, b] >= threshold}
    if mutual:
        keep = {(a, b) for a, b in keep if (b, a) in keep}
    return keep


def test_mined_pairs_equal_brute_force_and_precision_is_label_agreement(mined, cifar_root):
    emb = np.load(mined / "embeddings.npy")
    assert emb.shape[0] == 200 and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    pairs = load_pairs(mined / "pairs.npz")
    got = set(zip(pairs.i.tolist(), pairs.j.tolist()))
    want = _brute_force_pairs(emb, 3, 0.3, False)
    # fp32 matmul vs float64: only pairs within float rounding of the threshold/rank boundary may differ
    assert len(got ^ want) <= max(1, len(want) // 100)
    stats = json.loads((mined / "mining.json").read_text())
    from sepp.data.datasets import build_dataset

    labels = build_dataset({"name": "cifar10", "root": str(cifar_root), "split": "train", "subset": 200}).labels
    agree = (labels[pairs.i] == labels[pairs.j]).mean()
    assert stats["precision"] == pytest.approx(agree)
    assert stats["num_pairs"] == len(pairs.i) and stats["num_images"] == 200
    covered = len(set(pairs.i.tolist()) | set(pairs.j.tolist())) / 200
    assert stats["coverage"] == pytest.approx(covered)
    meta = pairs.meta
    for key in ("name", "split", "num_images", "fingerprint", "encoder_sha256", "k", "threshold", "features"):
        assert key in meta, key
    for png in ("pairs_gallery.png", "similarity_hist.png"):
        assert (mined / png).stat().st_size > 1000


@pytest.mark.parametrize("method", ["mocov2", "simsiam", "simclr", "byol"])
@pytest.mark.parametrize("mode", ["enlarge", "substitute"])
def test_sepp_training_every_method(encoder_run, mined, cifar_root, tmp_path, method, mode):
    pairs = load_pairs(mined / "pairs.npz")
    extra = {"sepp.pairs": str(mined / "pairs.npz"), "sepp.mode": mode}
    if method == "mocov2":
        extra["sepp.mask_negatives"] = "true"
    summary = pretrain(load_config(f"cifar10_{method}", tiny_overrides(cifar_root, tmp_path, method=method,
                                                                        subset=200, batch=40, **extra)),
                       progress=False)
    n_samples = 200 + len(pairs.i) if mode == "enlarge" else 200
    assert summary["steps"] == n_samples // 40
    assert summary["num_pairs"] == len(pairs.i)


def test_mask_negatives_sets_known_positives(mined, cifar_root, tmp_path, monkeypatch):
    seen = {}
    real_build = trainer_mod.build_model

    def spy(cfg, device, world):
        method = real_build(cfg, device, world)
        original = method.set_known_positives

        def record(i, j, n, positives=False):
            seen["args"] = (i.clone(), j.clone(), n)
            seen["positives"] = positives
            return original(i, j, n, positives)

        method.set_known_positives = record
        return method

    monkeypatch.setattr(trainer_mod, "build_model", spy)
    pretrain(load_config("cifar10_mocov2", tiny_overrides(
        cifar_root, tmp_path, subset=200, batch=40, **{"sepp.pairs": str(mined / "pairs.npz"),
                                                        "sepp.mask_negatives": "true"})), progress=False)
    pairs = load_pairs(mined / "pairs.npz")
    i, j, n = seen["args"]
    assert n == 200 and torch.equal(i, torch.as_tensor(pairs.i)) and torch.equal(j, torch.as_tensor(pairs.j))
    assert seen["positives"] is False


def test_pair_file_for_another_dataset_is_rejected(mined, cifar_root, tmp_path):
    cfg = load_config("cifar10_mocov2", tiny_overrides(cifar_root, tmp_path, subset=240, batch=40,
                                                       **{"sepp.pairs": str(mined / "pairs.npz")}))
    with pytest.raises(SeppError) as err:
        pretrain(cfg, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "sepp mine" in msg


def test_remine_every_refreshes_pairs(mined, cifar_root, tmp_path):
    cfg = load_config("cifar10_simsiam", tiny_overrides(
        cifar_root, tmp_path, method="simsiam", subset=200, batch=40, epochs=2,
        **{"sepp.pairs": str(mined / "pairs.npz"), "sepp.remine_every": 1, "mine.k": 2}))
    pretrain(cfg, progress=False)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert rows[0]["pairs"] == "" and int(rows[1]["pairs"]) > 0
    assert (tmp_path / "remine" / "epoch_0001" / "pairs.npz").exists()
    fresh = load_pairs(tmp_path / "remine" / "epoch_0001" / "pairs.npz")
    assert int(rows[1]["pairs"]) == len(fresh.i) and fresh.meta["k"] == 2


def test_sepp_run_end_to_end_and_resumes(cifar_root, tmp_path, capsys):
    args = ["run", "--config", "demo", *tiny_overrides(cifar_root, tmp_path / "exp", subset=160, batch=40),
            "run.baseline_epochs=1", "run.sepp_epochs=1", "train.knn_every=1", "eval.linear_epochs=5",
            "mine.k=2"]
    assert cli(args) == 0
    out = tmp_path / "exp"
    results = json.loads((out / "results.json").read_text())
    for model in ("baseline", "sepp"):
        for key in ("knn_top1", "linear_top1", "epochs", "steps"):
            assert results[model][key] is not None, (model, key)
    assert results["baseline"]["steps"] == results["sepp"]["steps"]  # same optimizer-step budget
    for key in ("precision", "coverage", "num_pairs"):
        assert results["mining"][key] is not None
    assert set(results["seconds"]) >= {"pretrain", "mining", "sepp", "baseline", "eval"}
    for name in ("report.md", "curves.png", "pairs_gallery.png", "similarity_hist.png"):
        assert (out / name).stat().st_size > 100, name
    table = capsys.readouterr().out
    assert "kNN top-1" in table and "SePP" in table
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")}
    assert cli(args) == 0  # rerun: every phase is skipped
    assert {p: p.stat().st_mtime_ns for p in out.rglob("last.pt")} == stamp
    assert json.loads((out / "results.json").read_text())["sepp"] == results["sepp"]


def test_stl10_and_image_folder_experiments(tmp_path, capsys):
    """The other data paths end to end on tiny files in the real formats: STL-10 (in memory, trained on
    train+unlabeled, evaluated with the labelled train split) and an ImageNet-layout folder (DataLoader +
    PIL path), each through `sepp run`."""
    from test_datasets import _write_folder, _write_stl

    _write_stl(tmp_path / "stl", n_train=24, n_test=10, n_unlabeled=16)
    _write_folder(tmp_path / "img" / "imagenet" / "train", per_class=(8, 8, 8))
    _write_folder(tmp_path / "img" / "imagenet" / "val", per_class=(2, 2, 2))
    small = ["model.backbone=resnet18_narrow", "train.batch_size=8", "train.epochs=1", "run.baseline_epochs=1",
             "run.sepp_epochs=1", "mine.k=2", "eval.knn_k=5", "eval.linear_epochs=2", "data.workers=0",
             "mocov2.queue_size=16", "mocov2.proj_hidden_dim=64", "device=cpu", "train.knn_every=0"]
    for name, root, extra in (("stl10", tmp_path / "stl", ["data.image_size=32"]),
                              ("imagenet", tmp_path / "img", ["data.image_size=32", "model.cifar_stem=true"])):
        out = tmp_path / f"run_{name}"
        assert cli(["run", "--config", f"{name}_sepp_mocov2", f"data.root={root}", f"out={out}",
                    *small, *extra]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["sepp"]["knn_top1"] is not None and results["baseline"]["linear_top1"] is not None
        assert results["mining"]["num_pairs"] > 0
        n = 24 + 16 if name == "stl10" else 24
        assert load_pairs(out / "mining" / "pairs.npz").meta["num_images"] == n
