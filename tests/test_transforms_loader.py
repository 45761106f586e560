"""View/eval transforms against hand-computed outputs, and the DataLoader path's batch contract."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from sepp.data.datasets import ArrayDataset, build_dataset
from sepp.data.loader import PlanSampler, TwoViewDataset, build_loader, eval_loader
from sepp.data.recipes import ViewSpec, mean_std, view_specs
from sepp.methods import METHODS
from sepp.data.sampling import epoch_plan, shard
from sepp.data.transforms import eval_transform, view_transform

CIFAR_MEAN, CIFAR_STD = mean_std("cifar10")


def _normalised(pixels_hwc: np.ndarray, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    x = torch.from_numpy(pixels_hwc).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _denormalised(out: torch.Tensor, mean=CIFAR_MEAN, std=CIFAR_STD) -> torch.Tensor:
    return out * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _identity_spec(size: int) -> ViewSpec:
    """A spec whose random view is the image itself (full-image crop, every random op off)."""
    return ViewSpec(size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                    gray_p=0.0, blur_p=0.0, solarize_p=0.0, mean=CIFAR_MEAN, std=CIFAR_STD)


def _ops(t: v2.Compose) -> list:
    """The transforms of a pipeline, with those inside RandomApply unwrapped."""
    out = []
    for op in t.transforms:
        out += list(op.transforms) if isinstance(op, v2.RandomApply) else [op]
    return out


# ---------------------------------------------------------------------------------------- view_transform

def test_identity_view_is_exactly_the_normalised_image():
    pixels = _random_image(16, 16)
    out = view_transform(_identity_spec(16))(Image.fromarray(pixels))
    assert out.dtype == torch.float32 and out.shape == (3, 16, 16)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), _normalised(pixels), rtol=0, atol=1e-6)


def test_flip_grayscale_and_solarize_by_hand():
    pixels = _random_image(12, 12, seed=1)
    pixels[0, 0] = (127, 128, 255)  # straddle the solarize threshold 0.5 (= 128 in uint8)
    img = Image.fromarray(pixels)
    flipped = view_transform(replace(_identity_spec(12), flip_p=1.0))(img)
    torch.testing.assert_close(flipped.as_subclass(torch.Tensor), _normalised(pixels[:, ::-1].copy()),
                               rtol=0, atol=1e-6)
    gray = _denormalised(view_transform(replace(_identity_spec(12), gray_p=1.0))(img))
    torch.testing.assert_close(gray[0], gray[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(gray[0], gray[2], rtol=0, atol=1e-6)
    solar = view_transform(replace(_identity_spec(12), solarize_p=1.0))(img)
    expected = np.where(pixels >= 128, 255 - pixels, pixels).astype(np.uint8)
    assert expected[0, 0].tolist() == [127, 127, 0]
    torch.testing.assert_close(solar.as_subclass(torch.Tensor), _normalised(expected), rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("size,dataset,src", [(32, "cifar10", (32, 32)), (96, "stl10", (96, 96)),
                                              (224, "imagenet", (180, 240))])
def test_recipe_views_shape_dtype_and_optional_ops(method, size, dataset, src):
    img = Image.fromarray(_random_image(*src, seed=size))
    mean, std = mean_std(dataset)
    for spec in view_specs(METHODS[method].augmentation, size, dataset):
        t = view_transform(spec)
        ops = _ops(t)
        blurs = [op for op in ops if isinstance(op, v2.GaussianBlur)]
        solar = [op for op in t.transforms if isinstance(op, v2.RandomSolarize)]
        assert len(blurs) == (spec.blur_p > 0) and len(solar) == (spec.solarize_p > 0)
        if blurs:
            assert list(blurs[0].kernel_size) == [spec.blur_kernel] * 2
            assert spec.blur_kernel % 2 == 1
        if solar:
            assert solar[0].threshold == 127.5 and solar[0].p == spec.solarize_p
        crop = next(op for op in ops if isinstance(op, v2.RandomResizedCrop))
        assert tuple(crop.scale) == spec.crop_scale and crop.antialias
        torch.manual_seed(0)
        out = t(img)
        assert out.dtype == torch.float32 and out.shape == (3, size, size)
        pixels = _denormalised(out, mean, std)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


# ---------------------------------------------------------------------------------------- eval_transform

def test_eval_transform_small_is_only_normalisation():
    pixels = _random_image(32, 32, seed=2)
    t = eval_transform(32, "cifar10")
    torch.testing.assert_close(t(Image.fromarray(pixels)).as_subclass(torch.Tensor), _normalised(pixels),
                               rtol=0, atol=1e-6)
    assert eval_transform(64, "stl10")(Image.fromarray(_random_image(96, 96))).shape == (3, 64, 64)


def test_eval_transform_large_resizes_256_and_centre_crops():
    pixels = _random_image(256, 256, seed=3)
    out = eval_transform(224, "imagenet")(Image.fromarray(pixels))
    mean, std = mean_std("imagenet")
    expected = _normalised(pixels[16:240, 16:240].copy(), mean, std)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), expected, rtol=0, atol=1e-6)
    assert eval_transform(224, "imagenet")(Image.fromarray(_random_image(300, 500))).shape == (3, 224, 224)
    resize = next(op for op in eval_transform(160, "imagenet").transforms if isinstance(op, v2.Resize))
    assert resize.size == [183]  # round(160 * 256 / 224)


# ------------------------------------------------------------------------------------------- PlanSampler

@pytest.mark.parametrize("mode", ["enlarge", "substitute"])
def test_plan_sampler_is_its_shard_of_the_epoch_plan(mode):
    pairs = (np.array([0, 3, 5, 5, 9], np.int64), np.array([3, 0, 9, 2, 5], np.int64))
    n, seed, bs, world = 23, 7, 4, 2
    seen = []
    for rank in range(world):
        s = PlanSampler(n, seed, bs, rank, world, pairs, mode, p=0.7)
        for epoch in (0, 3):
            s.set_epoch(epoch)
            ids1, ids2 = shard(*epoch_plan(n, epoch, seed, pairs, mode, 0.7), rank=rank, world=world, batch_size=bs)
            got = list(s)
            assert got == list(zip(ids1.tolist(), ids2.tolist())) and len(s) == len(got)
            assert all(type(a) is int and type(b) is int for a, b in got)
        total = n + 5 if mode == "enlarge" else n
        assert len(s) == (total // world) // bs * bs
        s.set_epoch(0)
        seen.append(list(s))
    assert seen[0] != seen[1]
    s.set_epoch(1)
    assert list(s) != seen[1]


def test_plan_sampler_without_pairs_visits_each_image_once_across_ranks():
    shards = [list(PlanSampler(40, 1, 5, rank, 4)) for rank in range(4)]
    flat = [a for sh in shards for a, _ in sh]
    assert all(len(sh) == 10 for sh in shards) and sorted(flat) == list(range(40))
    assert all(a == b for sh in shards for a, b in sh)


# ----------------------------------------------------------------------------------------------- loaders

def _constant_images(n: int, side: int = 6) -> ArrayDataset:
    """Image k is filled with the value k, so a view tells which image it came from."""
    images = np.repeat(np.arange(n, dtype=np.uint8), side * side * 3).reshape(n, side, side, 3)
    return ArrayDataset("toy", "train", images, np.arange(n, dtype=np.int64) % 3, None)


_TO_FLOAT = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])


def _decode(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.flatten(1).mean(1) * 255).long()


@pytest.mark.parametrize("workers", [0, 2])
def test_build_loader_batches_follow_the_contract(workers):
    n, bs, seed = 30, 4, 5
    pairs = (np.array([1, 2, 7], np.int64), np.array([2, 1, 20], np.int64))
    loader = build_loader(_constant_images(n), _TO_FLOAT, _TO_FLOAT, bs, workers, seed, pairs=pairs)
    assert loader.drop_last and loader.persistent_workers == (workers > 0)
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == (n + 3) // bs
        for x1, x2, ids1, ids2 in batches:
            assert x1.shape == x2.shape == (bs, 3, 6, 6) and x1.dtype == x2.dtype == torch.float32
            assert ids1.dtype == ids2.dtype == torch.int64 and ids1.shape == (bs,)
            assert torch.equal(_decode(x1), ids1) and torch.equal(_decode(x2), ids2)
        ids1, ids2 = shard(*epoch_plan(n, epoch, seed, pairs), rank=0, world=1, batch_size=bs)
        assert torch.cat([b[2] for b in batches]).tolist() == ids1.tolist()
        assert torch.cat([b[3] for b in batches]).tolist() == ids2.tolist()


def test_worker_seeds_differ_by_rank():
    ds = _constant_images(8)
    g = [build_loader(ds, _TO_FLOAT, _TO_FLOAT, 2, 0, seed=3, rank=r, world=2).generator.initial_seed()
         for r in (0, 1)]
    assert g[0] != g[1]
    assert build_loader(ds, _TO_FLOAT, _TO_FLOAT, 2, 0, seed=3).generator.initial_seed() == g[0]


def test_two_view_dataset_applies_each_transform_to_its_image():
    ds = _constant_images(5)
    x1, x2, a, b = TwoViewDataset(ds, _TO_FLOAT, lambda im: np.asarray(im)[0, 0, 0])[(4, 2)]
    assert (a, b) == (4, 2) and int(_decode(x1[None])) == 4 and x2 == 2


def test_loader_on_an_image_folder_with_real_views(tmp_path):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for k in range(5):
            pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / c / f"{k}.jpg")
    ds = build_dataset({"name": "imagefolder", "root": str(tmp_path), "split": "train"})
    v1, v2_ = view_specs(METHODS["byol"].augmentation, 32, "imagefolder")
    x1, x2, ids1, ids2 = next(iter(build_loader(ds, view_transform(v1), view_transform(v2_), 4, 0, seed=0)))
    assert x1.shape == x2.shape == (4, 3, 32, 32) and torch.equal(ids1, ids2)
    assert x1.dtype == torch.float32 and ids1.dtype == torch.int64


def test_eval_loader_keeps_order():
    ds = _constant_images(11).with_transform(_TO_FLOAT)
    batches = list(eval_loader(ds, 4, 0))
    assert [len(b[0]) for b in batches] == [4, 4, 3]
    ids = torch.cat([b[2] for b in batches])
    assert ids.tolist() == list(range(11)) and torch.equal(_decode(torch.cat([b[0] for b in batches])), ids)
    assert torch.cat([b[1] for b in batches]).tolist() == [k % 3 for k in range(11)]
