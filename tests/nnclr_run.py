"""One short NNCLR pretraining on real CIFAR-10, shared by the NNCLR learning tests and the evaluation-suite
tests that need any trained checkpoint (the fine-tuning command, embedding pictures, mining with an encoder
file): trained once per test session (per pytest-xdist worker; ``USES_RUN`` keeps its tests on one).

The narrow ResNet-18 keeps torchvision's 7x7/2 stem with max-pooling (``model.cifar_stem=false``, as every
tiny config does): on 32 px images that is ~16x fewer multiply-adds than the 3x3 CIFAR stem, which buys
NNCLR -- slower to start than SimCLR, because its positives are stored projections of *other* images -- the
few hundred optimizer steps it needs to clear initialisation by a margin within the test budget.
"""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_overrides

SUBSET = 4000
EVAL_SUBSET = 2000
EPOCHS = 20  # 300 steps of 256 images
_CACHE: dict = {}
# the tests that use the run: one pytest-xdist worker takes them all (`--dist loadgroup`), so it trains once
USES_RUN = pytest.mark.xdist_group("nnclr_run")


def nnclr_overrides(root, out, **extra) -> list[str]:
    items = {"data.eval_subset": EVAL_SUBSET, "eval.knn_k": 200, "train.warmup_epochs": 0,
             "train.log_every": 50, "train.knn_every": 0,
             "nnclr.queue_size": 4096, "nnclr.proj_hidden_dim": 512, "nnclr.pred_hidden_dim": 512}
    items.update(extra)
    return tiny_overrides(root, out, method="nnclr", subset=SUBSET, batch=256, epochs=EPOCHS, **items)


def pretrained_nnclr(root, tmp_path_factory) -> dict:
    """``{"checkpoint", "init_knn", "trained_knn", "cfg", "metrics"}`` of the shared run (trained on first
    use; ``metrics``: the rows of its metrics.csv)."""
    key = str(root)
    if key not in _CACHE:
        import csv

        from sepp.config import load_config
        from sepp.engine.setup import resolve
        from sepp.eval.knn import knn_eval
        from sepp.engine.trainer import pretrain
        from sepp.methods import build_method

        out = tmp_path_factory.mktemp("nnclr_run")
        cfg = load_config("cifar10_nnclr", nnclr_overrides(root, out))
        torch.manual_seed(cfg.seed)  # the initial weights pretrain() starts from
        init = knn_eval(build_method(resolve(cfg)).backbone, resolve(cfg), torch.device("cpu"), {})
        summary = pretrain(cfg, progress=False)
        with open(out / "metrics.csv") as f:
            metrics = list(csv.DictReader(f))
        _CACHE[key] = {"checkpoint": out / "last.pt", "init_knn": init, "trained_knn": summary["knn_top1"],
                       "cfg": resolve(cfg), "metrics": metrics, "summary": summary}
    return _CACHE[key]
