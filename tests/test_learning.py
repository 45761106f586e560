"""Real behaviour at small scale: a short CPU pretraining on the real CIFAR-10 copy must lift kNN accuracy
clearly above the same network at initialisation (and far above chance)."""
import pytest
import torch

from conftest import tiny_overrides
from sepp.config import load_config
from sepp.engine.setup import resolve
from sepp.eval.knn import knn_eval
from sepp.engine.trainer import pretrain
from sepp.methods import build_method


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_short_training_beats_initialisation_by_5_points(cifar_root, tmp_path):
    overrides = tiny_overrides(cifar_root, tmp_path, method="simclr", subset=4000, batch=128, epochs=4,
                               **{"data.eval_subset": 2000, "eval.knn_k": 200, "train.warmup_epochs": 0,
                                  "train.log_every": 50, "simclr.proj_hidden_dim": 2048, "train.knn_every": 0})
    cfg = load_config("cifar10_simclr", overrides)
    torch.manual_seed(cfg.seed)  # the same initial weights pretrain() starts from
    init = knn_eval(build_method(resolve(cfg)).backbone, resolve(cfg), torch.device("cpu"), {})
    trained = pretrain(cfg, progress=False)["knn_top1"]
    assert trained >= init + 5.0, (init, trained)
    assert trained > 25.0  # chance is 10 %
