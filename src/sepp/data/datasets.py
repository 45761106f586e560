"""Datasets that return their own index with every sample.

Mining, pair files and the epoch plans all address images by their position in the (sub)set, so every
dataset here is an :class:`IndexedDataset`: ``ds[i] -> (transform(image), label, i)``. CIFAR and STL-10 are
held in memory as uint8 arrays (the device-resident pipeline reads them with :meth:`uint8_images`); ImageNet,
Imagenette and custom class folders are read from disk image by image.
"""
from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10, CIFAR100, STL10, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader

from sepp.errors import SeppError, warn_once

DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "imagenette", "imagefolder")
SPLITS: dict[str, tuple[str, ...] | None] = {
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "stl10": ("train", "test", "unlabeled", "train+unlabeled"),
    "imagenet": ("train", "val"),
    "imagenette": ("train", "val"),
    "imagefolder": None,  # any sub-folder name; the root itself when it has none
}
_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10", "imagenet": "ImageNet",
           "imagenette": "Imagenette", "imagefolder": "image folder"}
# The subset must not depend on the training seed: pair files mined on one run are reused by others.
_SUBSET_SEED = 0x5E99


class IndexedDataset(torch.utils.data.Dataset, ABC):
    """``ds[i] -> (transform(image), label, i)``; label is -1 where unknown."""

    in_memory = False  # True: uint8_images() returns the whole set (device-resident pipeline possible)

    def __init__(self, name: str, split: str, labels: np.ndarray | None, classes: list[str] | None,
                 transform: Callable | None = None, source_indices: np.ndarray | None = None):
        self.name = name
        self.split = split
        self.labels = labels
        self.classes = classes
        self.transform = transform
        # Positions in the full split when data.subset picked a part of it (None: the whole split).
        self.source_indices = source_indices
        self._fingerprint: str | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def load_image(self, i: int) -> Image.Image:
        """The un-augmented RGB image ``i``."""

    def uint8_images(self) -> torch.Tensor | None:
        """All images as one uint8 ``[N, 3, H, W]`` tensor for in-memory datasets, else None."""
        return None

    def fingerprint(self) -> str:
        """Short hex digest identifying these exact images (recorded in pair files)."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    @abstractmethod
    def _compute_fingerprint(self) -> str: ...

    def with_transform(self, transform: Callable | None) -> IndexedDataset:
        """The same images under another transform (the image data is shared, not copied)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, i: int) -> tuple[Any, int, int]:
        i = int(i)
        img = self.load_image(i)
        x = self.transform(img) if self.transform is not None else img
        label = int(self.labels[i]) if self.labels is not None else -1
        return x, label, i

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)})"


class ArrayDataset(IndexedDataset):
    """Images held in memory as a uint8 ``[N, H, W, 3]`` array (CIFAR, STL-10)."""

    in_memory = True

    def __init__(self, name: str, split: str, images: np.ndarray, labels: np.ndarray | None,
                 classes: list[str] | None, transform: Callable | None = None,
                 source_indices: np.ndarray | None = None):
        super().__init__(name, split, labels, classes, transform, source_indices)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected uint8 [N, H, W, 3] images, got {images.dtype} {images.shape}")
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def load_image(self, i: int) -> Image.Image:
        return Image.fromarray(np.ascontiguousarray(self.images[int(i)]), mode="RGB")

    def uint8_images(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images.transpose(0, 3, 1, 2)))

    def _compute_fingerprint(self) -> str:
        n, h, w, _ = self.images.shape
        digest = hashlib.blake2b(f"{self.name}|{self.split}|{n}|{h}x{w}".encode(), digest_size=8)
        for start in range(0, n, 4096):  # chunked: STL-10's unlabeled split is 2.7 GB
            digest.update(np.ascontiguousarray(self.images[start:start + 4096]).data)
        return digest.hexdigest()


class FolderDataset(IndexedDataset):
    """Images read from disk on demand (ImageNet, Imagenette, custom class folders)."""

    def __init__(self, name: str, split: str, folder: str | os.PathLike, paths: list[str],
                 labels: np.ndarray | None, classes: list[str] | None, transform: Callable | None = None,
                 source_indices: np.ndarray | None = None):
        super().__init__(name, split, labels, classes, transform, source_indices)
        self.folder = str(folder)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def load_image(self, i: int) -> Image.Image:
        return pil_loader(self.paths[int(i)])

    def _compute_fingerprint(self) -> str:
        # Paths and sizes rather than pixels: hashing 140 GB of ImageNet JPEGs would take far too long.
        digest = hashlib.blake2b(digest_size=8)
        for path in self.paths:
            rel = os.path.relpath(path, self.folder).replace(os.sep, "/")
            digest.update(f"{rel}\t{os.path.getsize(path)}\n".encode())
        return digest.hexdigest()


def subset_indices(num: int, subset: int, labels: np.ndarray | None = None) -> np.ndarray | None:
    """Sorted indices of a fixed ``subset``-image part of ``num`` images (None for ``subset == 0``).

    Class-balanced when every label is known: ``subset // C`` per class, the remainder to the first classes,
    and a class with too few images hands its shortfall on to the others. Random within a class with a fixed
    generator, so the same data always gives the same subset whatever the training seed."""
    subset = int(subset or 0)
    if subset == 0:
        return None
    if subset < 0 or subset > num:
        raise SeppError(f"data.subset={subset} is outside 0..{num} (the size of the split); "
                        f"set data.subset to at most {num}, or 0 for all images")
    rng = np.random.default_rng(_SUBSET_SEED)
    if labels is None or len(labels) == 0 or labels.min() < 0:
        return np.sort(rng.choice(num, size=subset, replace=False)).astype(np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    quota = _balanced_quota(subset, counts)
    picked = [np.flatnonzero(labels == c)[rng.permutation(n)[:q]]
              for c, n, q in zip(classes, counts, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def _balanced_quota(total: int, counts: np.ndarray) -> np.ndarray:
    """Per-class numbers summing to ``total``: as even as possible (water-filling), never more than a class
    holds; the ones left over go to the first classes that still have images."""
    lo, hi = 0, int(counts.max())
    while lo < hi:  # largest level whose capped sum still fits in total
        mid = (lo + hi + 1) // 2
        if np.minimum(counts, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    quota = np.minimum(counts, lo).astype(np.int64)
    extra = np.flatnonzero(counts > lo)[: total - int(quota.sum())]
    quota[extra] += 1
    return quota


def build_dataset(data_cfg, split: str | None = None, transform: Callable | None = None) -> IndexedDataset:
    """The dataset named by ``data_cfg`` (keys name, root, split, subset, download); ``split`` overrides
    ``data_cfg.split``."""
    name = str(_get(data_cfg, "name", "") or "").lower()
    if name not in DATASETS:
        raise SeppError(f"unknown dataset {name!r}; set data.name to one of {', '.join(DATASETS)}")
    split = str(split or _get(data_cfg, "split", None) or "train")
    valid = SPLITS[name]
    if valid is not None and split not in valid:
        raise SeppError(f"unknown split {split!r} for {name}; choose one of {', '.join(valid)}")
    root = _data_root(data_cfg)
    download = bool(_get(data_cfg, "download", False))
    subset = int(_get(data_cfg, "subset", 0) or 0)

    if name in ("cifar10", "cifar100", "stl10"):
        images, labels, classes = _load_in_memory(name, root, split, download)
        idx = subset_indices(len(images), subset, labels)
        if idx is not None:
            images, labels = images[idx], (labels[idx] if labels is not None else None)
        return ArrayDataset(name, split, images, labels, classes, transform, idx)

    folder = _image_folder(name, root, split)
    paths, labels, classes = _scan_folder(name, folder, root, split)
    idx = subset_indices(len(paths), subset, labels)
    if idx is not None:
        paths, labels = [paths[k] for k in idx], (labels[idx] if labels is not None else None)
    return FolderDataset(name, split, folder, paths, labels, classes, transform, idx)


def has_labels(data_cfg, split: str | None = None) -> bool:
    """Whether a split of ``data_cfg`` carries labels, answered without reading images: STL-10's unlabeled
    split has none, nor has an image folder without class sub-folders (a flat folder of images)."""
    name = str(_get(data_cfg, "name", "") or "").lower()
    split = str(split or _get(data_cfg, "split", None) or "train")
    if name == "stl10":
        return split != "unlabeled"
    if name == "imagefolder":
        return not _is_flat(_image_folder(name, _data_root(data_cfg), split))
    return True


def _is_flat(folder: Path) -> bool:
    """An image folder without sub-folders: its images carry no labels."""
    return not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir())


def _scan_folder(name: str, folder: Path, root: Path, split: str):
    """``(paths, labels, classes)`` of a class-folder tree (torchvision's ImageFolder), or of a flat folder of
    images (``data.name=imagefolder`` only; labels and classes None)."""
    if name == "imagefolder" and _is_flat(folder):
        paths = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not paths:
            raise SeppError(f"image folder {folder} holds no images ({', '.join(IMG_EXTENSIONS)}); "
                            f"expected {_layout(name, root, split)}")
        return paths, None, None
    try:
        scanned = ImageFolder(str(folder))
    except (FileNotFoundError, OSError) as e:
        raise SeppError(f"{_TITLES[name]} at {folder} is not usable ({_one_line(e)}); "
                        f"expected {_layout(name, root, split)}") from None
    return [p for p, _ in scanned.samples], np.asarray(scanned.targets, dtype=np.int64), list(scanned.classes)


# ---------------------------------------------------------------------------------------------- helpers

def _get(cfg, key: str, default=None):
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _data_root(data_cfg) -> Path:
    root = _get(data_cfg, "root", None) or os.environ.get("SEPP_DATA") or "data"
    return Path(str(root)).expanduser()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# In-memory datasets: torchvision's classes with the md5 check reduced to "are the files there".
# Our shared copy of CIFAR-10 is JPEG-degraded on purpose, so its md5s differ from the official ones;
# refusing it would help nobody, so we load it and warn once instead.

class _CIFAR10(CIFAR10):
    _name = "cifar10"
    meta = {**CIFAR10.meta, "md5": None}  # torchvision's check_integrity(path, None) only tests existence

    def _check_integrity(self) -> bool:
        split = "train" if self.train else "test"
        return _files_present(self.root, self.base_folder, _split_files(self._name, split))


class _CIFAR100(_CIFAR10, CIFAR100):
    _name = "cifar100"
    meta = {**CIFAR100.meta, "md5": None}


class _STL10(STL10):
    def _check_integrity(self) -> bool:
        return _files_present(self.root, self.base_folder, _split_files("stl10", self.split))


_TV_CLASSES = {"cifar10": _CIFAR10, "cifar100": _CIFAR100, "stl10": _STL10}


def _split_files(name: str, split: str) -> list[tuple[str, str | None]]:
    """(file name, official md5) of the files one split reads."""
    if name == "stl10":
        md5s = dict(STL10.train_list + STL10.test_list)
        names = {"train": ["train_X.bin", "train_y.bin"], "test": ["test_X.bin", "test_y.bin"],
                 "unlabeled": ["unlabeled_X.bin"],
                 "train+unlabeled": ["train_X.bin", "train_y.bin", "unlabeled_X.bin"]}[split]
        return [(f, md5s[f]) for f in names]
    base = CIFAR100 if name == "cifar100" else CIFAR10
    files = base.train_list if split == "train" else base.test_list
    return [(f, md5) for f, md5 in files] + [(base.meta["filename"], base.meta["md5"])]


def _files_present(root, base_folder: str, files) -> bool:
    return all(os.path.isfile(os.path.join(root, base_folder, f)) for f, _ in files)


_MD5_CACHE: dict[tuple[str, int, int], str] = {}


def _md5(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _MD5_CACHE:
        h = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _MD5_CACHE[key] = h.hexdigest()
    return _MD5_CACHE[key]


def _warn_if_modified(folder: Path, files) -> None:
    changed = [f for f, md5 in files if md5 is not None and _md5(str(folder / f)) != md5]
    if changed:  # once per process and folder, not on every build or split
        warn_once(f"{folder}: md5 of {', '.join(changed)} does not match the official release "
                  f"(a modified copy?); loading anyway", key=("modified", os.path.abspath(folder)))


# arrays read from disk in this process, by (name, folder, split, the files' sizes and mtimes): `sepp run` builds
# the same split several times per phase; a changed file is read again. At most _CACHE_SPLITS splits are kept
# (the oldest goes first), none over _CACHE_MAX_BYTES (STL-10's unlabeled split). Callers index or copy the
# arrays, never write to them.
_LOADED: dict = {}
_CACHE_SPLITS, _CACHE_MAX_BYTES = 4, 512 * 2**20


def _load_in_memory(name: str, root: Path, split: str, download: bool):
    folder = root / _TV_CLASSES[name].base_folder
    try:
        stamp = tuple((st.st_size, st.st_mtime_ns) for st in
                      ((folder / f).stat() for f, _ in _split_files(name, split)))
    except OSError:  # not all there: read (or download) them, nothing kept
        return _read_in_memory(name, root, split, download)
    key = (name, str(folder.resolve()), split, stamp)
    if key not in _LOADED:
        loaded = _read_in_memory(name, root, split, download)
        if loaded[0].nbytes > _CACHE_MAX_BYTES:
            return loaded
        while len(_LOADED) >= _CACHE_SPLITS:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[key] = loaded
    return _LOADED[key]


def _read_in_memory(name: str, root: Path, split: str, download: bool):
    tv_cls = _TV_CLASSES[name]
    files = _split_files(name, split)
    folder = root / tv_cls.base_folder
    if not _files_present(root, tv_cls.base_folder, files):
        if not download:
            missing = [f for f, _ in files if not (folder / f).is_file()]
            raise SeppError(f"{_TITLES[name]} not found: expected {folder}/ with {', '.join(missing)}; "
                            f"set data.root or SEPP_DATA to the folder holding {tv_cls.base_folder}/, "
                            f"or set data.download=true to let torchvision download it")
        try:
            ds = _make_tv(tv_cls, root, split, download=True)
        except Exception as e:  # network and archive errors come in many types
            raise SeppError(f"could not download {_TITLES[name]} to {root}: {_one_line(e)}; "
                            f"check the network or place {tv_cls.base_folder}/ there by hand") from None
    else:
        _warn_if_modified(folder, files)
        try:
            ds = _make_tv(tv_cls, root, split, download=False)
        except (ValueError, OSError, EOFError, KeyError, RuntimeError) as e:
            raise SeppError(f"{_TITLES[name]} files in {folder} could not be read ({_one_line(e)}); "
                            f"replace them with a fresh copy (data.download=true after deleting them)") from None
    if name == "stl10":
        images = ds.data.transpose(0, 2, 3, 1)  # torchvision keeps [N, 3, H, W]; a view, not a copy
        labels = None if split == "unlabeled" else np.asarray(ds.labels, dtype=np.int64)
        classes = list(getattr(ds, "classes", None) or []) or None
    else:
        images = ds.data
        labels = np.asarray(ds.targets, dtype=np.int64)
        classes = list(ds.classes)
    return images, labels, classes


def _make_tv(tv_cls, root: Path, split: str, download: bool):
    if issubclass(tv_cls, STL10):
        return tv_cls(str(root), split=split, download=download)
    return tv_cls(str(root), train=split == "train", download=download)


def _image_folder(name: str, root: Path, split: str) -> Path:
    if name == "imagefolder":
        folder = root / split if (root / split).is_dir() else root
    else:
        folder = root / {"imagenet": "imagenet", "imagenette": "imagenette2"}[name] / split
    if not folder.is_dir():
        raise SeppError(f"{_TITLES[name]} not found: expected {_layout(name, root, split)}")
    return folder


def _layout(name: str, root: Path, split: str) -> str:
    if name == "imagenet":
        return (f"{root}/imagenet/{split}/<class>/<images> (the layout of the official MoCo code); "
                f"set data.root or SEPP_DATA to the folder holding imagenet/")
    if name == "imagenette":
        return (f"{root}/imagenette2/{split}/<class>/<images> (the extracted imagenette2 archive from "
                f"github.com/fastai/imagenette); set data.root or SEPP_DATA to the folder holding imagenette2/")
    return (f"{root}/{split}/<class>/<images> or {root}/<class>/<images>, or images without labels directly in "
            f"{root}/{split}/ or {root}/; set data.root to that folder")
