"""Datasets: real CIFAR-10, STL-10 and ImageFolder layouts written here in their real formats, subsets,
fingerprints and the one-line errors."""
from __future__ import annotations

import os
import pickle
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sepp.data import datasets
from sepp.data.datasets import ArrayDataset, build_dataset, subset_indices
from sepp.errors import SeppError, reset_warnings


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _build_recording(cfg, split=None):
    reset_warnings()  # the md5 warning is issued once per process; each test sees its own
    datasets._LOADED.clear()  # ... and its own read of the files
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = build_dataset(cfg, split=split)
    return ds, [w for w in caught if issubclass(w.category, UserWarning)]


def test_a_split_is_read_once_per_process_until_its_files_change(cifar_root, tmp_path):
    import shutil

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for f in ("test_batch", "batches.meta"):
        shutil.copy(cifar_root / "cifar-10-batches-py" / f, folder / f)
    cfg = {"name": "cifar10", "root": str(tmp_path)}
    a = build_dataset(cfg, split="test")
    assert build_dataset(cfg, split="test").images is a.images  # the array read the first time
    st = (folder / "test_batch").stat()
    os.utime(folder / "test_batch", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = build_dataset(cfg, split="test")
    assert c.images is not a.images and np.array_equal(c.images, a.images)  # a changed file is read again


@pytest.fixture(scope="module")
def cifar_train(cifar_root):
    return _build_recording({"name": "cifar10", "root": str(cifar_root), "split": "train"})


# ------------------------------------------------------------------------------------------------ CIFAR

def test_cifar10_train_matches_the_pickles_and_warns_once(cifar_root, cifar_train):
    ds, caught = cifar_train
    assert len(ds) == 50000 and ds.name == "cifar10" and ds.split == "train"
    assert len(caught) == 1 and "md5" in str(caught[0].message) and "data_batch_1" in str(caught[0].message)
    batches = [_unpickle(cifar_root / "cifar-10-batches-py" / f"data_batch_{k}") for k in range(1, 6)]
    labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
    pixels = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, labels)
    u8 = ds.uint8_images()
    assert u8.dtype == torch.uint8 and u8.shape == (50000, 3, 32, 32)
    assert np.array_equal(u8.numpy(), pixels)
    assert ds.classes == _unpickle(cifar_root / "cifar-10-batches-py" / "batches.meta")["label_names"]
    img, label, i = ds[12345]
    assert i == 12345 and label == labels[12345]
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), pixels[12345].transpose(1, 2, 0))


def test_cifar10_test_split_and_split_override(cifar_root):
    ds, caught = _build_recording({"name": "cifar10", "root": str(cifar_root), "split": "train"}, split="test")
    assert len(ds) == 10000 and ds.split == "test" and len(caught) == 1
    assert np.array_equal(ds.labels, _unpickle(cifar_root / "cifar-10-batches-py" / "test_batch")["labels"])
    assert ds.source_indices is None


def test_cifar_subset_is_balanced_fixed_and_ordered(cifar_root, cifar_train):
    full = cifar_train[0]
    cfg = {"name": "cifar10", "root": str(cifar_root), "subset": 1005}
    a, _ = _build_recording(cfg)
    b, _ = _build_recording(cfg)
    assert len(a) == 1005
    assert np.bincount(a.labels).tolist() == [101] * 5 + [100] * 5
    assert np.array_equal(a.source_indices, b.source_indices)
    assert np.all(np.diff(a.source_indices) > 0)
    assert np.array_equal(a.labels, full.labels[a.source_indices])
    assert np.array_equal(a.uint8_images().numpy(), full.uint8_images().numpy()[a.source_indices])
    assert a.fingerprint() == b.fingerprint() != full.fingerprint()


def test_cifar_download_true_keeps_the_present_modified_copy(cifar_root, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args, **kwargs):
        raise AssertionError("must not download when the files are present")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    ds, caught = _build_recording({"name": "cifar10", "root": str(cifar_root), "download": True}, split="test")
    assert len(ds) == 10000 and len(caught) == 1


def test_failed_download_is_one_line(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host\nsecond line")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    with pytest.raises(SeppError) as err:
        build_dataset({"name": "cifar100", "root": str(tmp_path), "download": True})
    msg = str(err.value)
    assert "\n" not in msg and "download" in msg and str(tmp_path) in msg


# ------------------------------------------------------------------------------------------------ STL-10

def _write_stl(root: Path, n_train=12, n_test=8, n_unlabeled=6, seed=0) -> dict:
    """Tiny STL-10 in the real binary format: uint8 images stored column-major per channel, labels 1..10."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # [N, C, H, W]
        x.transpose(0, 1, 3, 2).tofile(folder / f"{part}_X.bin")  # column-major: W before H on disk
        arrays[part] = x
        if part != "unlabeled":
            y = rng.integers(0, 10, size=n).astype(np.uint8)
            (y + 1).tofile(folder / f"{part}_y.bin")
            arrays[f"{part}_y"] = y.astype(np.int64)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    (folder / "fold_indices.txt").write_text("\n".join(" ".join(map(str, range(k, n_train, 10)))
                                                       for k in range(10)) + "\n")
    arrays["classes"] = names
    return arrays


def test_stl10_all_four_splits(tmp_path):
    arrays = _write_stl(tmp_path)
    cfg = {"name": "stl10", "root": str(tmp_path)}
    expected = {
        "train": (arrays["train"], arrays["train_y"]),
        "test": (arrays["test"], arrays["test_y"]),
        "unlabeled": (arrays["unlabeled"], None),
        "train+unlabeled": (np.concatenate([arrays["train"], arrays["unlabeled"]]),
                            np.concatenate([arrays["train_y"], -np.ones(len(arrays["unlabeled"]), np.int64)])),
    }
    for split, (x, y) in expected.items():
        ds, caught = _build_recording(cfg, split=split)
        assert len(caught) == 1 and "md5" in str(caught[0].message)  # tiny files are not the official ones
        assert len(ds) == len(x) and ds.split == split and ds.classes == arrays["classes"]
        assert np.array_equal(ds.uint8_images().numpy(), x)
        if y is None:
            assert ds.labels is None and ds[0][1] == -1
        else:
            assert ds.labels.dtype == np.int64 and np.array_equal(ds.labels, y)
        last = len(ds) - 1
        assert np.array_equal(np.asarray(ds.load_image(last)), x[last].transpose(1, 2, 0))
        assert ds[last][1:] == ((-1 if y is None else int(y[last])), last)


def test_stl10_unlabeled_subset_is_fixed_random(tmp_path):
    arrays = _write_stl(tmp_path, n_unlabeled=30)
    cfg = {"name": "stl10", "root": str(tmp_path), "subset": 7}
    a, _ = _build_recording(cfg, split="unlabeled")
    b, _ = _build_recording(cfg, split="unlabeled")
    assert len(a) == 7 and np.array_equal(a.source_indices, b.source_indices)
    assert len(np.unique(a.source_indices)) == 7 and np.all(np.diff(a.source_indices) > 0)
    assert np.array_equal(a.uint8_images().numpy(), arrays["unlabeled"][a.source_indices])


def test_stl10_download_true_fetches_missing_files(tmp_path, monkeypatch):
    import torchvision.datasets.stl10 as tv_stl10

    calls = []

    def fake_download(url, download_root, **kwargs):
        calls.append(url)
        _write_stl(Path(download_root))

    monkeypatch.setattr(tv_stl10, "download_and_extract_archive", fake_download)
    ds = build_dataset({"name": "stl10", "root": str(tmp_path), "download": True}, split="test")
    assert len(calls) == 1 and "stl10_binary" in calls[0] and len(ds) == 8


def test_unreadable_files_are_one_line(tmp_path):
    _write_stl(tmp_path)
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 1000)  # not a whole 3x96x96 image
    with pytest.raises(SeppError) as err, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build_dataset({"name": "stl10", "root": str(tmp_path)}, split="test")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "stl10_binary") in msg and "could not be read" in msg


def test_in_memory_fingerprint_sees_one_pixel(tmp_path):
    _write_stl(tmp_path / "a")
    _write_stl(tmp_path / "b")
    raw = bytearray((tmp_path / "b" / "stl10_binary" / "test_X.bin").read_bytes())
    raw[5 * 96 * 96 * 3 + 1234] ^= 1
    (tmp_path / "b" / "stl10_binary" / "test_X.bin").write_bytes(bytes(raw))
    fa = _build_recording({"name": "stl10", "root": str(tmp_path / "a")}, "test")[0].fingerprint()
    fa2 = _build_recording({"name": "stl10", "root": str(tmp_path / "a")}, "test")[0].fingerprint()
    fb = _build_recording({"name": "stl10", "root": str(tmp_path / "b")}, "test")[0].fingerprint()
    assert fa == fa2 != fb
    assert int(fa, 16) >= 0 and len(fa) == 16

    images = np.zeros((4, 8, 8, 3), np.uint8)
    other = images.copy()
    other[3, 7, 7, 2] = 1
    assert ArrayDataset("x", "train", images, None, None).fingerprint() != \
        ArrayDataset("x", "train", other, None, None).fingerprint()
    assert ArrayDataset("x", "train", images, None, None).fingerprint() != \
        ArrayDataset("x", "test", images, None, None).fingerprint()


# ------------------------------------------------------------------------------------------ image folders

def _write_folder(folder: Path, classes=("cat", "dog", "eel"), per_class=(3, 2, 4), size=(20, 14)) -> None:
    rng = np.random.default_rng(1)
    for c, n in zip(classes, per_class):
        (folder / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{c}_{k}.jpg", quality=90)


@pytest.mark.parametrize("name,sub", [("imagenet", "imagenet"), ("imagenette", "imagenette2")])
def test_named_image_folders(tmp_path, name, sub):
    _write_folder(tmp_path / sub / "train")
    _write_folder(tmp_path / sub / "val", per_class=(1, 1, 2))
    train = build_dataset({"name": name, "root": str(tmp_path), "split": "train"})
    val = build_dataset({"name": name, "root": str(tmp_path)}, split="val")
    assert (len(train), len(val)) == (9, 4) and train.classes == ["cat", "dog", "eel"]
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2] and val.labels.tolist() == [0, 1, 2, 2]
    assert train.uint8_images() is None
    img = train.load_image(4)
    assert img.mode == "RGB" and img.size == (20, 14)
    x, label, i = train.with_transform(lambda im: np.asarray(im).shape)[4]
    assert (x, label, i) == ((14, 20, 3), 1, 4)
    assert train.transform is None and train[4][0].size == (20, 14)


def test_imagefolder_uses_split_subfolder_or_root_itself(tmp_path):
    _write_folder(tmp_path / "split_layout" / "train")
    _write_folder(tmp_path / "flat", classes=("a", "b"), per_class=(2, 5))
    ds = build_dataset({"name": "imagefolder", "root": str(tmp_path / "split_layout"), "split": "train"})
    assert len(ds) == 9 and ds.classes == ["cat", "dog", "eel"]
    flat = build_dataset({"name": "imagefolder", "root": str(tmp_path / "flat")}, split="val")
    assert len(flat) == 7 and flat.classes == ["a", "b"] and flat.labels.tolist() == [0, 0, 1, 1, 1, 1, 1]
    sub = build_dataset({"name": "imagefolder", "root": str(tmp_path / "flat"), "subset": 4})
    assert sub.labels.tolist() == [0, 0, 1, 1] and sub.paths == [flat.paths[k] for k in sub.source_indices]


def test_flat_image_folder_has_no_labels(tmp_path):
    from sepp.data.datasets import has_labels

    _write_folder(tmp_path / "pics" / "train", classes=("x",), per_class=(5,))
    for p in (tmp_path / "pics" / "train" / "x").iterdir():
        p.rename(tmp_path / "pics" / p.name)  # images directly in the folder: no classes
    (tmp_path / "pics" / "notes.txt").write_text("not an image")
    (tmp_path / "pics" / "train" / "x").rmdir()
    (tmp_path / "pics" / "train").rmdir()
    ds = build_dataset({"name": "imagefolder", "root": str(tmp_path / "pics"), "split": "train"})
    assert len(ds) == 5 and ds.labels is None and ds.classes is None and ds[2][1] == -1
    assert [Path(p).name for p in ds.paths] == [f"x_{k}.jpg" for k in range(5)]
    sub = build_dataset({"name": "imagefolder", "root": str(tmp_path / "pics"), "subset": 3})
    assert sub.labels is None and sub.paths == [ds.paths[k] for k in sub.source_indices]
    assert not has_labels({"name": "imagefolder", "root": str(tmp_path / "pics")}, "test")
    _write_folder(tmp_path / "classes")
    assert has_labels({"name": "imagefolder", "root": str(tmp_path / "classes")}, "train")
    assert not has_labels({"name": "stl10"}, "unlabeled") and has_labels({"name": "cifar10"}, "test")


def test_folder_fingerprint_follows_paths_and_sizes(tmp_path):
    _write_folder(tmp_path / "a")
    _write_folder(tmp_path / "b")  # same files elsewhere: same fingerprint (paths are relative)
    fp = lambda p: build_dataset({"name": "imagefolder", "root": str(p)}).fingerprint()  # noqa: E731
    assert fp(tmp_path / "a") == fp(tmp_path / "b")
    os.rename(tmp_path / "b" / "dog" / "dog_1.jpg", tmp_path / "b" / "dog" / "dog_9.jpg")
    assert fp(tmp_path / "a") != fp(tmp_path / "b")
    with open(tmp_path / "a" / "cat" / "cat_0.jpg", "ab") as f:
        f.write(b"\0")
    _write_folder(tmp_path / "c")
    assert fp(tmp_path / "a") != fp(tmp_path / "c")


# ------------------------------------------------------------------------------------------------ errors

def _one_line_error(cfg, split=None) -> str:
    with pytest.raises(SeppError) as err:
        build_dataset(cfg, split=split)
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize("name,expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("stl10", "stl10_binary"),
    ("imagenet", "imagenet/train"), ("imagenette", "imagenette2/train"),
])
def test_missing_data_is_one_line_naming_the_path(tmp_path, name, expected):
    msg = _one_line_error({"name": name, "root": str(tmp_path)})
    assert f"{tmp_path}/{expected}" in msg and "data.root" in msg and "SEPP_DATA" in msg
    if name in ("cifar10", "cifar100", "stl10"):
        assert "data.download=true" in msg
    else:
        assert "<class>" in msg


def test_missing_imagefolder_and_empty_folder(tmp_path):
    msg = _one_line_error({"name": "imagefolder", "root": str(tmp_path / "nothing")})
    assert str(tmp_path / "nothing") in msg and "<class>" in msg
    (tmp_path / "empty").mkdir()
    assert "<class>" in _one_line_error({"name": "imagefolder", "root": str(tmp_path / "empty")})


def test_sepp_data_env_is_the_default_root(tmp_path, monkeypatch):
    _write_folder(tmp_path / "imagenette2" / "val")
    monkeypatch.setenv("SEPP_DATA", str(tmp_path))
    assert len(build_dataset({"name": "imagenette", "root": None, "split": "val"})) == 9


@pytest.mark.parametrize("name,valid", [
    ("cifar10", "train, test"), ("cifar100", "train, test"),
    ("stl10", "train, test, unlabeled, train+unlabeled"), ("imagenet", "train, val"), ("imagenette", "train, val"),
])
def test_unknown_split_lists_valid_ones(tmp_path, name, valid):
    msg = _one_line_error({"name": name, "root": str(tmp_path)}, split="validation")
    assert "'validation'" in msg and msg.endswith(valid)


@pytest.mark.filterwarnings("ignore:.*md5")
def test_unknown_dataset_and_oversized_subset(cifar_root):
    assert "cifar10, cifar100" in _one_line_error({"name": "mnist", "root": str(cifar_root)})
    msg = _one_line_error({"name": "cifar10", "root": str(cifar_root), "subset": 10001}, split="test")
    assert "10001" in msg and "10000" in msg


# ------------------------------------------------------------------------------------------------ subsets

def _greedy_quota(total: int, counts: list[int]) -> list[int]:
    """Brute force: hand out images one at a time to the emptiest class that still has some (lowest index
    first), i.e. as even as possible with the remainder on the first classes."""
    quota = [0] * len(counts)
    for _ in range(total):
        k = min((q, c) for c, q in enumerate(quota) if q < counts[c])[1]
        quota[k] += 1
    return quota


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.integers(1, 12), min_size=1, max_size=6), data=st.data())
def test_subset_indices_match_brute_force_balance(counts, data):
    rng = np.random.default_rng(len(counts))
    labels = rng.permutation(np.repeat(np.arange(len(counts)), counts)).astype(np.int64)
    total = data.draw(st.integers(1, len(labels)))
    idx = subset_indices(len(labels), total, labels)
    assert len(idx) == total and np.all(np.diff(idx) > 0) and idx.dtype == np.int64
    assert np.bincount(labels[idx], minlength=len(counts)).tolist() == _greedy_quota(total, counts)
    assert np.array_equal(idx, subset_indices(len(labels), total, labels))


def test_subset_zero_means_all_and_partial_labels_fall_back_to_random():
    assert subset_indices(10, 0, np.zeros(10, np.int64)) is None
    labels = np.array([0, 1, -1, -1, 0, 1, -1, -1], np.int64)
    idx = subset_indices(8, 5, labels)
    assert len(idx) == 5 and len(set(idx.tolist())) == 5
    with pytest.raises(SeppError):
        subset_indices(8, -1)
