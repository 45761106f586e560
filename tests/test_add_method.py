"""Adding a method is one module plus one registry line: a method defined here, registered in ``METHODS`` and
nowhere else, gets its config section, is checked, resolved and pretrained through the command line."""
import csv

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import tiny_overrides

from sepp.cli import main
from sepp.data.recipes import Recipe
from sepp.methods import METHODS, Method
from sepp.methods.checkpoint import load_checkpoint
from sepp.models.heads import mlp


class Toy(Method):
    """Negative cosine between the projections of the two views (a SimSiam without predictor)."""

    augmentation = Recipe(crop_scale=(0.5, 1.0), brightness=0.1, contrast=0.1, saturation=0.1, hue=0.0,
                          blur_p=(0.0, 0.0))
    metric_columns = ("toy_steps", "toy_labels")

    def __init__(self, backbone, feat_dim: int, *, proj_dim: int = 32, scale: float = 1.0):
        super().__init__()
        self.backbone = backbone
        self.projector = mlp(feat_dim, 2 * proj_dim, proj_dim, 2)
        self.scale = scale
        self.steps_seen = 0
        self.num_labels = None

    def forward(self, x1, x2, ids1, ids2, x3=None, ids3=None):
        z1, z2 = (self.projector(self.backbone(x)) for x in (x1, x2))
        return {"loss": -self.scale * F.cosine_similarity(z1, z2, dim=1).mean()}

    def after_step(self, progress: float) -> None:
        self.steps_seen += 1

    def set_labels(self, labels) -> None:
        self.num_labels = len(labels)

    def epoch_metrics(self) -> dict[str, float]:
        return {"toy_steps": float(self.steps_seen), "toy_labels": float(self.num_labels)}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy", Toy)  # the one registry line


def test_a_registered_method_gets_a_config_section_and_its_errors(toy, capsys):
    assert main(["pretrain", "--config", "cifar10_simclr", "--print-config", "device=cpu", "method=toy",
                 "toy.proj_dim=8"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["toy"] == {"proj_dim": 8, "scale": 1.0}  # the constructor's default filled in
    assert main(["pretrain", "--config", "cifar10_simclr", "device=cpu", "method=toy", "toy.width=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown config key 'toy.width'; valid keys under toy: proj_dim, scale"
    assert main(["pretrain", "--config", "cifar10_simclr", "device=cpu", "toy.proj_dim=wide"]) == 2
    assert "toy.proj_dim" in capsys.readouterr().err  # typed by the constructor's annotation
    assert main(["pretrain", "--config", "cifar10_simclr", "device=cpu", "method=toy",
                 "sepp.mask_negatives=true"]) == 2
    assert "toy has none" in capsys.readouterr().err  # Toy.has_negatives is the base's False


def test_a_registered_method_pretrains_through_the_cli(toy, cifar_root, tmp_path):
    out = tmp_path / "toy"
    args = tiny_overrides(cifar_root, out, method="toy", subset=64, batch=32)
    assert main(["pretrain", "--config", "cifar10_simclr", *args, "toy.proj_dim=8", "toy.scale=2.0",
                 "train.max_steps=1"]) == 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["step"] == 1 and ckpt["config"]["toy"] == {"proj_dim": 8, "scale": 2.0}
    linear = [v.shape for k, v in ckpt["model"].items() if k.startswith("projector.") and v.dim() == 2]
    assert linear[-1] == (8, 16)  # built with the configured proj_dim: mlp(feat_dim, 2 * proj_dim, proj_dim)
    (row,) = list(csv.DictReader(open(out / "metrics.csv")))
    assert float(row["toy_steps"]) == 1.0 and float(row["toy_labels"]) == 64.0  # the hooks were called
    assert -2.0 <= float(row["loss"]) <= 2.0 and torch.isfinite(torch.tensor(float(row["loss"])))
