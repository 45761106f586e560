from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sepp.config import PACKAGE_CONFIGS, build_config, load_config
from sepp.engine.setup import resolve
from sepp.errors import SeppError


def _err(overrides, path=None) -> str:
    """The one line that loading (or, for values a registry owns, resolving) the config raises."""
    with pytest.raises(SeppError) as e:
        resolve(load_config(path, ["device=cpu"] + overrides))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.epochs=3", "data.subset=100", "mine.threshold=0.5"])
    assert cfg.train.epochs == 3 and cfg.data.subset == 100 and cfg.mine.threshold == 0.5
    assert cfg.method is None and resolve(cfg.copy()).method == "mocov2"  # sepp.methods.DEFAULT_METHOD


@pytest.mark.parametrize("overrides, words", [
    (["train.epoch=3"], ["unknown config key 'train.epoch'", "epochs"]),
    (["bogus=1"], ["unknown config key 'bogus'", "train"]),
    (["method=moco"], ["method='moco'", "mocov2, simsiam, simclr, byol"]),
    (["data.name=mnist"], ["data.name", "cifar10"]),
    (["model.backbone=vit"], ["model.backbone", "resnet18_narrow"]),
    (["train.epochs=abc"], ["train.epochs", "abc"]),
    (["train.epochs=0"], ["train.epochs must be > 0"]),
    (["data.subset=-5"], ["data.subset must be >= 0"]),
    (["sepp.p=1.5"], ["sepp.p"]),
    (["mine.threshold=2"], ["mine.threshold"]),
    (["sepp.mode=swap"], ["sepp.mode", "enlarge, substitute"]),
    (["device=tpu"], ["device", "auto, cpu, cuda"]),
    (["epochs"], ["not key=value"]),
    (["method=byol", "sepp.mask_negatives=true"], ["mask_negatives", "mocov2, simclr"]),
    (["run.evals=[knn,detection]"], ["run.evals", "knn, linear"]),
    (["mine.rank_from=6", "mine.k=5"], ["rank_from", "mine.k=5"]),
    # method sections, derived from the constructors' keyword-only parameters and annotations
    (["mocov2.queue_sizee=3"], ["unknown config key 'mocov2.queue_sizee'", "queue_size, symmetric, temperature"]),
    (["simclr.temperature=warm"], ["simclr.temperature", "warm"]),
    (["mocov2.bn=split"], ["mocov2.bn='split'", "shuffle, sync, none"]),
])
def test_bad_input_is_one_line(overrides, words):
    msg = _err(overrides)
    for w in words:
        assert w in msg


def test_missing_config_file_lists_shipped():
    msg = _err([], path="no_such_config.yaml")
    assert "cifar10_mocov2" in msg


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: {epochs: [1,\n")
    assert "cannot parse" in _err([], path=str(p))
    p.write_text("- a\n- b\n")
    assert "mapping" in _err([], path=str(p))


def test_base_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("method: simclr\ntrain: {epochs: 7, lr: 0.5}\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain: {epochs: 9}\n")
    cfg = load_config(str(tmp_path / "b.yaml"), ["train.lr=0.1"])
    assert (cfg.method, cfg.train.epochs, cfg.train.lr) == ("simclr", 9, 0.1)
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    assert "itself" in _err([], path=str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("path", sorted(PACKAGE_CONFIGS.rglob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_validate(path: Path):
    cfg = resolve(build_config(path))
    assert cfg.data.image_size in (32, 96, 224)
    if path.parent.name == "experiments" or path.stem == "demo":
        assert cfg.run.budget in ("steps", "epochs")


def test_resolve_fills_automatic_values(monkeypatch):
    monkeypatch.setenv("SEPP_DATA", "/somewhere")
    cfg = resolve(load_config(None, ["device=cpu", "data.name=stl10"]))
    assert cfg.data.root == "/somewhere" and cfg.data.image_size == 96 and cfg.model.cifar_stem is False
    assert cfg.train.amp == "fp32"
    assert OmegaConf.to_yaml(cfg)
