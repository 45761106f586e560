"""Checkpoints open with ``weights_only=True``: a pickled payload never runs, old and foreign files are
refused with one line, and what sepp writes (config as YAML text, pairs as tensors) round-trips exactly,
also through a resume that restores re-mined pairs from the checkpoint."""
from __future__ import annotations

import builtins
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import tiny_overrides
from sepp.cli import main as cli
from sepp.config import load_config, to_yaml
from sepp.methods import resolve
from sepp.methods.checkpoint import FORMAT, config_from_checkpoint, load_checkpoint, save_checkpoint
from sepp.engine.trainer import pretrain
from sepp.errors import SeppError
from sepp.data.pairs import Pairs, save_pairs

pytestmark = pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")


class CreatesFile:
    """Unpickling this calls ``open(path, "w")``: the file appears iff the pickle was executed."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def _tiny_cfg():
    return resolve(load_config("cifar10_simclr", ["device=cpu", "model.backbone=resnet18_narrow",
                                                   "simclr.proj_hidden_dim=16"]))


def _evil_checkpoint(tmp_path, marker, zipfile=True):
    path = tmp_path / "shared.pt"
    torch.save({"format": FORMAT, "model": {"w": torch.zeros(2)}, "epoch": 1, "step": 1,
                "config": CreatesFile(marker)}, path, _use_new_zipfile_serialization=zipfile)
    return path


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_not_executed_and_refused_in_one_line(tmp_path, capsys, zipfile):
    # the payload is real: an unsafe load creates the file
    control = tmp_path / "control_marker"
    torch.load(_evil_checkpoint(tmp_path, control, zipfile), weights_only=False)
    assert control.exists()

    marker = tmp_path / "pwned"
    path = _evil_checkpoint(tmp_path, marker, zipfile)
    with pytest.raises(SeppError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert "\n" not in msg and "refuses" in msg and ("open" in msg or not zipfile), msg
    assert not marker.exists()
    for argv in (["eval", "knn", "--checkpoint", str(path)], ["mine", "--checkpoint", str(path)],
                 ["export", "--checkpoint", str(path), "--out", str(tmp_path / "b.pt")]):
        assert cli(argv) == 2
        err_text = capsys.readouterr().err.strip()
        assert err_text.startswith("error: ") and "\n" not in err_text and "refuses" in err_text, err_text
    assert not marker.exists()


def test_saved_checkpoint_is_plain_data_and_round_trips(tmp_path):
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()  # momentum buffers in the optimizer state
    pairs = Pairs(np.array([0, 5]), np.array([3, 1]), np.array([0.9, 0.25], np.float32),
                  {"k": np.int64(2), "threshold": np.float32(0.5), "name": "cifar10", "mined_at_epoch": 3})
    path = tmp_path / "last.pt"
    save_checkpoint(path, model, opt, cfg, epoch=4, step=40, pairs=pairs, batch_in_epoch=2)

    raw = torch.load(path, weights_only=True)  # what a user's own safe load sees
    assert raw["format"] == FORMAT == "sepp-checkpoint/2"
    assert isinstance(raw["config"], str) and OmegaConf.create(raw["config"]).method == "simclr"
    assert isinstance(raw["pairs"]["i"], torch.Tensor) and isinstance(raw["pairs"]["meta"], str)

    ckpt = load_checkpoint(path)
    assert (ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]) == (4, 40, 2)
    assert ckpt["config"]["method"] == "simclr" and isinstance(ckpt["config"], dict)
    restored = config_from_checkpoint(ckpt, ["device=cpu"])
    assert restored.model.backbone == "resnet18_narrow" and restored.simclr.proj_hidden_dim == 16
    assert to_yaml(restored) == to_yaml(resolve(load_config(
        "cifar10_simclr", ["device=cpu", "model.backbone=resnet18_narrow", "simclr.proj_hidden_dim=16"])))
    p = ckpt["pairs"]
    assert isinstance(p, Pairs) and p.i.dtype == np.int64 and p.i.tolist() == [0, 5] and p.j.tolist() == [3, 1]
    assert p.sim.dtype == np.float32 and np.array_equal(p.sim, pairs.sim)
    assert p.meta == {"k": 2, "threshold": 0.5, "name": "cifar10", "mined_at_epoch": 3}
    fresh = torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=0.9)
    fresh.load_state_dict(ckpt["optimizer"])
    assert torch.equal(fresh.state_dict()["state"][0]["momentum_buffer"],
                       opt.state_dict()["state"][0]["momentum_buffer"])


def test_state_that_safe_loading_would_refuse_fails_at_save_time(tmp_path):
    class WithNumpyState(torch.nn.Linear):
        def get_extra_state(self):
            return {"rng": np.random.default_rng(0).bit_generator.state, "seen": np.arange(3)}

        def set_extra_state(self, state):
            pass

    model = WithNumpyState(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"'_extra_state'\]\['seen'\] is a numpy.ndarray"):
        save_checkpoint(tmp_path / "last.pt", model, opt, _tiny_cfg(), epoch=1, step=1)
    assert not (tmp_path / "last.pt").exists()


def test_retired_keys_are_dropped_from_yaml_config(tmp_path):
    container = OmegaConf.to_container(_tiny_cfg(), resolve=True)
    container["run"]["linear"] = False  # written by older versions
    path = tmp_path / "old_keys.pt"
    torch.save({"format": FORMAT, "model": {}, "epoch": 1, "step": 1,
                "config": OmegaConf.to_yaml(OmegaConf.create(container))}, path)
    cfg = config_from_checkpoint(load_checkpoint(path), ["device=cpu"])
    assert "linear" not in cfg.run and cfg.method == "simclr"


def test_format_1_files(tmp_path):
    container = OmegaConf.to_container(_tiny_cfg(), resolve=True)
    plain = tmp_path / "v1_plain.pt"  # a /1 run without pairs: only tensors and plain values
    torch.save({"format": "sepp-checkpoint/1", "model": {"module.w": torch.ones(2)}, "epoch": 2, "step": 8,
                "config": container, "pairs": None}, plain)
    ckpt = load_checkpoint(plain)
    assert ckpt["config"]["method"] == "simclr" and list(ckpt["model"]) == ["w"]

    with_pairs = tmp_path / "v1_pairs.pt"  # a /1 run with pairs pickled numpy arrays
    torch.save({"format": "sepp-checkpoint/1", "model": {}, "epoch": 2, "step": 8, "config": container,
                "pairs": {"i": np.arange(3), "j": np.arange(3), "sim": np.ones(3, np.float32), "meta": {}}},
               with_pairs)
    with pytest.raises(SeppError) as err:
        load_checkpoint(with_pairs)
    msg = str(err.value)
    assert "\n" not in msg and "sepp-checkpoint/1" in msg and "retrain" in msg, msg


@pytest.mark.parametrize("obj, words", [
    ({"conv1.weight": torch.zeros(1)}, "not a sepp checkpoint"),           # a plain state_dict
    ({"format": "sepp-checkpoint/9", "model": {}}, "not a sepp checkpoint"),
    ({"format": FORMAT, "model": {}, "epoch": 1, "step": 1}, "damaged"),    # no config
])
def test_foreign_or_damaged_files_are_one_line(tmp_path, obj, words):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    with pytest.raises(SeppError) as err:
        load_checkpoint(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_resume_restores_remined_pairs_bit_exactly(cifar_root, tmp_path):
    """Re-mined pairs live only in the checkpoint: a run paused after re-mining and resumed equals the
    uninterrupted run (weights, queue, optimizer, pairs)."""
    from sepp.data.datasets import build_dataset

    cfg0 = load_config("cifar10_simclr", tiny_overrides(cifar_root, tmp_path / "x", method="simclr", subset=64))
    ds = build_dataset(cfg0.data, split=cfg0.data.split)
    pair_file = tmp_path / "pairs.npz"
    rng = np.random.default_rng(0)
    save_pairs(pair_file, Pairs(rng.integers(0, 64, 20), rng.integers(0, 64, 20), np.ones(20, np.float32),
                                {"name": ds.name, "split": ds.split, "num_images": len(ds), "fingerprint": ds.fingerprint()}))

    def cfg(out, **extra):
        return load_config("cifar10_simclr", tiny_overrides(
            cifar_root, out, method="simclr", subset=64, batch=32, epochs=4,
            **{"sepp.pairs": str(pair_file), "sepp.mode": "substitute", "sepp.remine_every": 2, "mine.k": 2,
               "sepp.mask_negatives": "true", **extra}))

    pretrain(cfg(tmp_path / "straight"), progress=False)
    assert pretrain(cfg(tmp_path / "split", **{"train.stop_at_epoch": 3}), progress=False)["status"] == "paused"
    pretrain(cfg(tmp_path / "split", **{"train.resume": "true"}), progress=False)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4 and a["step"] == b["step"]
    meta_a, meta_b = ({k: v for k, v in c["pairs"].meta.items() if k != "encoder"} for c in (a, b))
    assert meta_a["mined_at_epoch"] == 2 and meta_a == meta_b  # "encoder" names the run directory
    for key in ("i", "j", "sim"):
        assert np.array_equal(getattr(a["pairs"], key), getattr(b["pairs"], key)), key
    assert not np.array_equal(a["pairs"].i, np.load(pair_file)["i"])  # the re-mined pairs, not the file's
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert json.loads(json.dumps(a["config"])) == a["config"]  # plain data
