"""Shared fixtures: the real CIFAR-10 copy and tiny CPU configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]

# Property tests draw the same examples on every run, so CI cannot pass or fail by chance;
# HYPOTHESIS_PROFILE=explore draws new ones (for looking for bugs, not for CI).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N` (scripts/test.sh): one process per core, one thread each
    import torch

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and the processes the tests start


def _cifar_root() -> Path:
    root = Path(os.environ.get("SEPP_DATA", REPO / "data"))
    if (root / "cifar-10-batches-py" / "data_batch_1").exists():
        return root
    script = REPO.parent / "shared" / "data" / "prepare_cifar10.py"
    if script.exists():
        subprocess.run([sys.executable, str(script), str(root)], check=True)
        return root
    pytest.fail(f"real CIFAR-10 not found under {root}; run `bash scripts/setup.sh` or set SEPP_DATA")


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    return _cifar_root()


def tiny_overrides(root, out, method="mocov2", subset=256, epochs=1, batch=64, **extra) -> list[str]:
    """A config small enough for a few seconds of CPU training on real CIFAR-10. The narrow ResNet-18 keeps
    torchvision's 7x7/2 stem with max-pooling (``model.cifar_stem=false``): ~16x fewer multiply-adds on 32 px
    images than the CIFAR 3x3 stem, which the tests that are about the stem set themselves."""
    items = {
        "method": method, "device": "cpu", "out": str(out), "data.root": str(root), "data.subset": subset,
        "data.eval_subset": 500, "data.workers": 0, "model.backbone": "resnet18_narrow", "model.cifar_stem": False,
        "train.epochs": epochs,
        "train.batch_size": batch, "train.knn_every": -1, "train.log_every": 1, "eval.knn_k": 20,
        "mocov2.queue_size": 256, "simsiam.proj_hidden_dim": 256, "simsiam.proj_dim": 256,
        "simsiam.pred_hidden_dim": 64, "simclr.proj_hidden_dim": 256, "byol.proj_hidden_dim": 256,
        "byol.pred_hidden_dim": 256, "mocov2.proj_hidden_dim": 256,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]
