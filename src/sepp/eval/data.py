"""The labelled splits that evaluation runs on, and the fastest form to feed them to a backbone."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf

from sepp.data.datasets import build_dataset, has_labels
from sepp.data.recipes import mean_std
from sepp.data.transforms import eval_transform, uint8_normalizer
from sepp.errors import SeppError, warn_once
from sepp.models.features import features_of


def eval_train_split(cfg) -> str:
    """The labelled split that serves as kNN memory bank and linear-probe training set."""
    return cfg.data.eval_train_split or cfg.data.split


def eval_data(cfg, split: str, subset: int):
    """A split of ``cfg.data`` (``subset`` images) with the evaluation transform."""
    data_cfg = OmegaConf.merge(cfg.data, {"subset": subset})
    return build_dataset(data_cfg, split=split, transform=eval_transform(cfg.data.image_size, cfg.data.name))


def eval_splits(cfg):
    """``(train, test)``: the memory bank / probe training split and the test split, both labelled."""
    train = eval_data(cfg, eval_train_split(cfg), cfg.data.subset)
    test = eval_data(cfg, cfg.data.eval_split, cfg.data.eval_subset)
    for ds in (train, test):
        if not labelled(ds):
            raise SeppError(f"evaluation needs labels; split {ds.split!r} of {ds.name} has none — set "
                            "data.eval_train_split / data.eval_split to labelled splits (e.g. train and test)")
    return train, test


def labelled(ds) -> bool:
    """Whether a dataset has at least one known label."""
    return ds.labels is not None and bool((ds.labels >= 0).any())


# `sepp run` evaluations that need labels of cfg.data's evaluation splits (transfer has its own labelled data)
LABEL_EVALS = ("knn", "linear", "finetune", "embed_plot")


def has_eval_labels(cfg) -> bool:
    """Whether ``cfg.data``'s evaluation splits carry labels (answered without reading images)."""
    return has_labels(cfg.data, eval_train_split(cfg)) and has_labels(cfg.data, cfg.data.eval_split)


def without_labels(cfg, evals: bool = False):
    """``cfg`` unchanged when its evaluation splits are labelled; otherwise a copy without the kNN monitor
    (``train.knn_every=-1``) and, with ``evals`` (`sepp run`), without the label evaluations of ``run.evals``,
    after one notice, so that no label-dependent number is computed or reported."""
    if has_eval_labels(cfg):
        return cfg
    dropped = [e for e in cfg.run.evals if e in LABEL_EVALS] if evals else []
    if cfg.train.knn_every >= 0 or dropped:
        warn_once(f"{cfg.data.name} at {cfg.data.root} has no labels (a flat image folder / unlabeled split): "
                  "no kNN monitor" + (f" and no {', '.join(dropped)}" if dropped else "") + "; pairs are "
                  "mined and trained on as usual", key=("no-labels", str(cfg.data.root)))
    cfg = cfg.copy()
    cfg.train.knn_every = -1
    if evals:
        cfg.run.evals = [e for e in cfg.run.evals if e not in LABEL_EVALS]
    return cfg


def eval_input(ds, size: int, dataset_name: str, device=None):
    """``(data, normalize)`` to feed ``ds`` to a backbone: ``((uint8 images, labels), normalizer)`` when the
    dataset is in memory at ``size`` pixels (no decoding; on ``device`` when given), else ``(ds, None)``."""
    images = ds.uint8_images()
    if images is None or tuple(images.shape[-2:]) != (size, size):
        return ds, None
    if device is not None:
        images = images.to(device)
    return (images, torch.as_tensor(ds.labels)), uint8_normalizer(*mean_std(dataset_name))


def features(backbone, ds, cfg, device, memo: dict | None = None) -> torch.Tensor:
    """Backbone features (float32 ``[N, D]``, CPU) of an evaluation split of ``cfg.data``. ``memo``: a dict
    kept for one frozen backbone, so that evaluations sharing a split (kNN, linear probe, pair cosine)
    extract its features once."""
    key = (ds.name, ds.split, len(ds))
    if memo is not None and key in memo:
        return memo[key]
    data, normalize = eval_input(ds, cfg.data.image_size, cfg.data.name)
    out = features_of(backbone, data, device, cfg.eval.batch_size, normalize=normalize)
    if memo is not None:
        memo[key] = out
    return out
