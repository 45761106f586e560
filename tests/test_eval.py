"""Evaluation: weighted kNN, linear probe, feature extraction, training-curve plots."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.transforms import v2

import sepp.eval.knn as knn_mod
from sepp.errors import SeppError
from sepp.models.features import extract_features
from sepp.eval.knn import evaluate_knn, knn_predict, knn_top1
from sepp.eval.linear import train_linear, train_linear_augmented
from sepp.report.curves import plot_curves, read_metrics, series

# ---------------------------------------------------------------- kNN


def test_knn_hand_computed_vote():
    s = 1 / math.sqrt(2)
    # Unnormalised on purpose: cosine similarity must not depend on the feature scale.
    train = torch.tensor([[3.0, 0.0], [0.0, 2.0], [5 * s, 5 * s], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 0])
    test = torch.tensor([[2.0, 0.0]])
    # Similarities to the test row: 1, 0, 0.7071, -1; k=3 keeps the first three.
    # t=0.5: class 0 gets e^2 = 7.39, class 1 gets e^1.414 + e^0 = 5.11 -> 0.
    assert math.exp(1 / 0.5) > math.exp(s / 0.5) + math.exp(0 / 0.5)
    assert knn_predict(train, labels, test, 2, k=3, t=0.5).tolist() == [0]
    # t=10 flattens the weights: class 0 gets e^0.1 = 1.105, class 1 gets e^0.0707 + 1 = 2.07 -> 1.
    assert math.exp(1 / 10) < math.exp(s / 10) + math.exp(0 / 10)
    assert knn_predict(train, labels, test, 2, k=3, t=10.0).tolist() == [1]
    # k=1: only the identical direction votes, whatever t.
    assert knn_predict(train, labels, test, 2, k=1, t=10.0).tolist() == [0]
    # k=4 adds [-1, 0] (class 0, weight e^-0.1 = 0.905): 2.01 vs 2.07 -> still 1.
    assert math.exp(0.1) + math.exp(-0.1) < math.exp(s / 10) + 1
    assert knn_predict(train, labels, test, 2, k=4, t=10.0).tolist() == [1]
    assert knn_top1(train, labels, test, torch.tensor([1]), 2, k=3, t=10.0) == 100.0
    assert knn_top1(train, labels, test, torch.tensor([1]), 2, k=3, t=0.5) == 0.0


def naive_knn(train, labels, test, num_classes, k, t):
    tr = train.double() / train.double().norm(dim=1, keepdim=True)
    te = test.double() / test.double().norm(dim=1, keepdim=True)
    preds = []
    for q in te:
        sims = [float(q @ x) for x in tr]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        scores = [0.0] * num_classes
        for i in order:
            scores[int(labels[i])] += math.exp(sims[i] / t)
        preds.append(max(range(num_classes), key=lambda c: scores[c]))
    return preds


@settings(max_examples=25, deadline=None)
@given(n_train=st.integers(1, 40), n_test=st.integers(1, 25), dim=st.integers(2, 6),
       classes=st.integers(1, 5), k=st.integers(1, 60), t=st.sampled_from([0.05, 0.1, 1.0]),
       chunk=st.integers(1, 30), seed=st.integers(0, 10_000))
def test_knn_matches_brute_force_for_any_chunk(n_train, n_test, dim, classes, k, t, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g)
    test = torch.randn(n_test, dim, generator=g)
    labels = torch.randint(0, classes, (n_train,), generator=g)
    expected = naive_knn(train, labels, test, classes, k, t)  # k > n_train -> all rows vote
    assert knn_predict(train, labels, test, classes, k=k, t=t, chunk=chunk).tolist() == expected
    assert knn_predict(train, labels, test, classes, k=k, t=t, chunk=10_000).tolist() == expected


def test_knn_small_temperature_does_not_overflow():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0, 1])
    # t=0.005: e^(sim/t) overflows float32 (inf for both classes, and a tie would go to class 0). Exactly:
    # sims 1, 0.9939, 0.9701, so relative to class 1's weight 1, class 0 gets e^-1.22 + e^-5.97 = 0.30.
    assert knn_predict(train, labels, torch.tensor([[1.0, 0.0]]), 2, k=3, t=0.005).tolist() == [1]


def test_knn_memory_cap_does_not_change_results(monkeypatch):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(33, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    full = knn_predict(train, labels, test, 4, k=7)
    monkeypatch.setattr(knn_mod, "_MAX_BLOCK_ELEMENTS", 120)  # 2 test rows per block
    assert torch.equal(knn_predict(train, labels, test, 4, k=7), full)


def test_knn_k_larger_than_train_set_uses_all_rows():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(6, 3, generator=g), torch.randn(9, 3, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(knn_predict(train, labels, test, 3, k=1000), knn_predict(train, labels, test, 3, k=6))


def test_knn_rejects_bad_labels():
    with pytest.raises(SeppError, match="labels"):
        knn_predict(torch.randn(3, 2), torch.tensor([0, -1, 1]), torch.randn(2, 2), 2)
    with pytest.raises(SeppError, match="labels"):
        knn_predict(torch.randn(3, 2), torch.tensor([0, 1]), torch.randn(2, 2), 2)


# ---------------------------------------------------------------- features


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.net(x)


class UInt8Dataset(torch.utils.data.Dataset):
    """IndexedDataset stand-in: items (transform(image), label, index)."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), int(self.labels[i]), i


MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def eval_transform():
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])


def trained_cnn(seed=0):
    torch.manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():  # non-trivial running stats, so train and eval mode differ
        model.net[1].running_mean.uniform_(-0.5, 0.5)
        model.net[1].running_var.uniform_(0.5, 2.0)
    return model


def test_features_identical_from_dataset_and_uint8_tensor():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8, generator=g)
    model = trained_cnn().train()
    ds = UInt8Dataset(images, np.zeros(23), eval_transform())
    from_ds = extract_features(model, ds, "cpu", batch_size=5)
    from_tensor = extract_features(model, images, "cpu", batch_size=7, normalize=v2.Normalize(MEAN, STD))
    assert model.training  # mode restored
    assert from_ds.dtype == torch.float32 and from_ds.shape == (23, 8)
    torch.testing.assert_close(from_ds, from_tensor, rtol=1e-5, atol=1e-6)
    # Eval mode (running BN statistics), dataset order.
    with torch.no_grad():
        x = (images.float() / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        expected = model.eval()(x)
    torch.testing.assert_close(from_tensor, expected, rtol=1e-5, atol=1e-6)


def test_features_tensor_path_needs_uint8_and_normalize():
    model = TinyCNN()
    with pytest.raises(SeppError, match="normalize"):
        extract_features(model, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "cpu")
    with pytest.raises(SeppError, match="uint8"):
        extract_features(model, torch.zeros(2, 3, 4, 4), "cpu", normalize=v2.Normalize(MEAN, STD))


def colour_classes(n, num_classes=3, size=8, seed=0):
    """uint8 images whose dominant colour channel is the label (plus noise): linearly separable features."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 90, (n, 3, size, size), generator=g)
    images[torch.arange(n), labels] += 150
    return images.to(torch.uint8), labels


def test_evaluate_knn_dataset_and_tensor_paths_agree():
    tr_img, tr_lab = colour_classes(60)
    te_img, te_lab = colour_classes(30, seed=1)
    model = trained_cnn()
    a = evaluate_knn(model, UInt8Dataset(tr_img, tr_lab, eval_transform()),
                     UInt8Dataset(te_img, te_lab, eval_transform()), "cpu", k=5, t=0.1, batch_size=16)
    b = evaluate_knn(model, (tr_img, tr_lab), (te_img, te_lab), "cpu", k=5, t=0.1, batch_size=16,
                     normalize=v2.Normalize(MEAN, STD))
    assert a == b
    assert a > 90.0


# ---------------------------------------------------------------- linear probe


def blobs(n, dim=32, num_classes=6, seed=0, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    y = torch.randint(0, num_classes, (n,), generator=g)
    # Uneven per-dimension scale and offset, like raw pooled features: standardisation has to handle it.
    scale = torch.linspace(0.01, 5.0, dim)
    x = (means[y] + spread * torch.randn(n, dim, generator=g)) * scale + 2.0
    return x, y


def test_linear_probe_learns_separable_data():
    xtr, ytr = blobs(600)
    xte, yte = blobs(300, seed=1)
    r = train_linear(xtr, ytr, xte, yte, 6, epochs=15, seed=0)
    assert r["top1"] > 95.0
    assert r["top5"] >= r["top1"]
    assert len(r["losses"]) == 15 and r["losses"][-1] < r["losses"][0]


def test_linear_probe_near_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(800, 16, generator=g), torch.randn(2000, 16, generator=g)
    ytr, yte = torch.randint(0, 4, (800,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    r = train_linear(xtr, ytr, xte, yte, 4, epochs=10, seed=0)
    assert 19.0 < r["top1"] < 31.0  # chance is 25 %, test-set sd ~1 %
    assert r["top5"] is None  # fewer than five classes


def test_linear_probe_deterministic_given_seed():
    xtr, ytr = blobs(200, spread=3.0)
    xte, yte = blobs(100, seed=1, spread=3.0)
    a = train_linear(xtr, ytr, xte, yte, 6, epochs=3, seed=5)
    b = train_linear(xtr, ytr, xte, yte, 6, epochs=3, seed=5)
    c = train_linear(xtr, ytr, xte, yte, 6, epochs=3, seed=6)
    assert a == b
    assert a["losses"] != c["losses"]


def test_linear_probe_invariant_to_feature_scale_and_offset():
    # Features are standardised with the train mean/std, so per-dimension affine maps change nothing.
    xtr, ytr = blobs(200, spread=3.0)
    xte, yte = blobs(100, seed=1, spread=3.0)
    scale, shift = torch.logspace(-2, 2, xtr.shape[1]), torch.linspace(-50, 50, xtr.shape[1])
    a = train_linear(xtr, ytr, xte, yte, 6, epochs=3, seed=0)
    b = train_linear(xtr * scale + shift, ytr, xte * scale + shift, yte, 6, epochs=3, seed=0)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-4)
    assert abs(a["top1"] - b["top1"]) <= 1.0  # at most one borderline test row may flip


def test_linear_probe_rejects_unlabelled_rows():
    with pytest.raises(SeppError, match="labels"):
        train_linear(torch.randn(4, 2), torch.tensor([0, 1, -1, 0]), torch.randn(2, 2), torch.tensor([0, 1]),
                     num_classes=2)


def augmented_setup():
    tr_img, tr_lab = colour_classes(48)
    te_img, te_lab = colour_classes(30, seed=1)
    train_tf = v2.Compose([v2.RandomResizedCrop(8, scale=(0.3, 1.0), antialias=True),
                           v2.RandomHorizontalFlip(), eval_transform()])
    return (UInt8Dataset(tr_img, tr_lab, train_tf), (te_img, te_lab))


def test_linear_augmented_learns_and_freezes_backbone():
    model = trained_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_ds, test = augmented_setup()
    rng_before = torch.get_rng_state()
    r = train_linear_augmented(model, train_ds, test, 3, epochs=6, lr=0.05, batch_size=16, seed=0,
                               normalize=v2.Normalize(MEAN, STD))
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    assert model.training
    for k, v in model.state_dict().items():  # frozen, and BN running stats not updated (eval mode)
        assert torch.equal(v, before[k]), k
    assert r["top1"] > 90.0 and r["top5"] is None and len(r["losses"]) == 6
    again = train_linear_augmented(model, train_ds, test, 3, epochs=6, lr=0.05, batch_size=16, seed=0,
                                   normalize=v2.Normalize(MEAN, STD))
    assert again == r


# ---------------------------------------------------------------- curves


def write_csv(path, rows, extra_column=False):
    header = "epoch,step,loss,lr,samples_per_s,knn_top1" + (",linear_top1" if extra_column else "")
    lines = [header] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_plot_curves_writes_png_and_skips_empty_cells(tmp_path):
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    write_csv(a, [(1, 10, 5.0, 0.1, 100, ""), (2, 20, 4.0, 0.1, 100, 31.5), (3, 30, 3.5, 0.05, 100, ""),
                  (4, 40, 3.0, 0.01, 100, 40.0)])
    write_csv(b, [(1, 10, 5.5, 0.1, 90, "", ""), (2, 20, 4.5, 0.1, 90, "", 20.0)], extra_column=True)
    assert series(read_metrics(a), "knn_top1") == ([2.0, 4.0], [31.5, 40.0])
    assert series(read_metrics(a), "loss") == ([1.0, 2.0, 3.0, 4.0], [5.0, 4.0, 3.5, 3.0])
    assert series(read_metrics(b), "knn_top1") == ([], [])
    out = plot_curves({"mocov2": a, "mocov2+sepp": b}, tmp_path / "plots" / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 5000
    with pytest.raises(SeppError, match="not found"):
        plot_curves({"x": tmp_path / "missing.csv"}, tmp_path / "c.png")


def test_shared_features_give_the_same_scores_with_one_extraction_per_split(cifar_root, tmp_path, monkeypatch):
    """`sepp run` evaluates an arm with one feature memo: kNN, linear probe and pair cosine then extract each
    split once, and every score equals the one computed without the memo."""
    import sepp.eval.data as eval_data_mod
    from conftest import tiny_overrides
    from sepp.config import load_config
    from sepp.data.pairs import Pairs, save_pairs
    from sepp.engine.setup import resolve
    from sepp.eval.pairs import pair_cosine
    from sepp.eval.run import knn_from_method, linear_from_method
    from sepp.methods import build_method

    cfg = resolve(load_config("demo", tiny_overrides(cifar_root, tmp_path, method="simclr", subset=50)
                              + ["data.eval_subset=40", "eval.knn_k=5", "eval.linear_epochs=2"]))
    torch.manual_seed(0)
    method = build_method(cfg).eval()
    save_pairs(tmp_path / "pairs.npz", Pairs(np.arange(10), np.arange(10, 20), np.zeros(10, np.float32), {}))
    plain = (knn_from_method(method, cfg), linear_from_method(method, cfg)["top1"],
             pair_cosine(method.backbone, cfg, tmp_path / "pairs.npz"))
    calls = []
    real = eval_data_mod.features_of
    monkeypatch.setattr(eval_data_mod, "features_of", lambda *a, **k: calls.append(1) or real(*a, **k))
    memo: dict = {}
    shared = (knn_from_method(method, cfg, memo), linear_from_method(method, cfg, memo)["top1"],
              pair_cosine(method.backbone, cfg, tmp_path / "pairs.npz", memo=memo))
    assert shared == plain
    assert len(calls) == 2 and len(memo) == 2  # the training subset and the test split, once each


def test_pair_cosine_samples_large_pair_files(cifar_root, tmp_path):
    """More pairs than ``max_pairs``: a seeded sample of them, the same for the same seed."""
    from conftest import tiny_overrides
    from sepp.config import load_config
    from sepp.data.pairs import Pairs, save_pairs
    from sepp.engine.setup import resolve
    from sepp.eval.pairs import pair_cosine
    from sepp.methods import build_method

    cfg = resolve(load_config("demo", tiny_overrides(cifar_root, tmp_path, method="simclr", subset=50)))
    torch.manual_seed(0)
    backbone = build_method(cfg).backbone.eval()
    i = np.repeat(np.arange(50), 49)
    j = np.concatenate([np.delete(np.arange(50), a) for a in range(50)])
    save_pairs(tmp_path / "pairs.npz", Pairs(i, j, np.zeros(len(i), np.float32), {}))
    full = pair_cosine(backbone, cfg, tmp_path / "pairs.npz")
    sampled = [pair_cosine(backbone, cfg, tmp_path / "pairs.npz", max_pairs=500) for _ in range(2)]
    assert sampled[0] == sampled[1]
    assert abs(sampled[0]["pairs"] - full["pairs"]) < 0.02  # every ordered pair once: a fair sample is close
