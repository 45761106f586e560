"""Your encoder, your images: an encoder file starts training (train.init_backbone, run.baseline_checkpoint with
run.init=baseline), and the practitioner's flow on real Imagenette2 images in a flat folder without labels --
pretrain, `sepp export`, `sepp run` from the exported file -- reports no label-dependent number anywhere."""
import csv
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from sepp.cli import main
from sepp.config import load_config
from sepp.errors import SeppError
from sepp.methods import build_method, resolve
from sepp.methods.checkpoint import file_hash, initial_state

IMAGENETTE_TAR = Path(os.environ.get("SEPP_SHARED", Path(__file__).resolve().parents[2] / "shared" / "data")) / \
    "imagenette2" / "imagenette2-224.tar"


@pytest.fixture(scope="module")
def own_images(tmp_path_factory) -> Path:
    """Four Imagenette2 training images of every class, shrunk to 48 px (decoding stays cheap), all in one flat
    folder (no class sub-folders)."""
    if not IMAGENETTE_TAR.is_file():
        pytest.fail(f"Imagenette2 not found at {IMAGENETTE_TAR}; set SEPP_SHARED to the folder holding imagenette2/")
    root = tmp_path_factory.mktemp("my_photos")
    taken: dict[str, int] = {}
    with tarfile.open(IMAGENETTE_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and parts[0] == "train" and taken.get(parts[1], 0) < 4:
                taken[parts[1]] = taken.get(parts[1], 0) + 1
                image = Image.open(tar.extractfile(member)).convert("RGB")
                image.thumbnail((72, 72))
                image.save(root / parts[2], quality=90)  # flat: the image itself, no class folder
    assert len(taken) == 10 and len(list(root.iterdir())) == 40
    return root


def tiny(root, out, **extra) -> list[str]:
    """The Imagenette MoCo-v2 config on an image folder, shrunk to seconds on a CPU."""
    items = {"data.name": "imagefolder", "data.root": str(root), "data.image_size": 32, "data.workers": 0,
             "device": "cpu", "out": str(out), "model.backbone": "resnet18_narrow", "train.epochs": 1,
             "train.batch_size": 20, "train.knn_every": 1, "train.log_every": 1, "mocov2.queue_size": 40,
             "mocov2.proj_hidden_dim": 64, "mocov2.proj_dim": 32, "mine.k": 2, "mine.batch_size": 32,
             "sepp.mode": "substitute"}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def _method(overrides=()):
    cfg = resolve(load_config("imagenette_mocov2", ["device=cpu", "model.backbone=resnet18_narrow",
                                                    "mocov2.proj_hidden_dim=64", *overrides]))
    torch.manual_seed(1)
    return build_method(cfg)


def test_backbone_weights_go_to_the_momentum_copy_and_heads_start_fresh():
    source, fresh = _method(), _method()
    for p in source.backbone.parameters():
        p.data.add_(1.0)  # weights that no construction gives
    init = {f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}
    state = initial_state(fresh, init)
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(state[f"backbone.{k}"], v) and torch.equal(state[f"momentum_backbone.{k}"], v)
    assert torch.equal(state["projector.0.weight"], fresh.state_dict()["projector.0.weight"])
    whole = initial_state(fresh, source.state_dict())  # a sepp checkpoint of the same method: heads too
    assert torch.equal(whole["projector.0.weight"], source.state_dict()["projector.0.weight"])
    other_heads = _method(["mocov2.proj_dim=16"])  # other head sizes: only the backbone is taken
    with pytest.warns(UserWarning, match="heads do not fit"):
        mixed = initial_state(other_heads, source.state_dict())
    assert torch.equal(mixed["backbone.conv1.weight"], source.state_dict()["backbone.conv1.weight"])


def test_encoder_init_takes_heads_only_from_a_sepp_checkpoint_of_the_same_method(tmp_path):
    from sepp.methods.checkpoint import save_checkpoint
    from sepp.mining.encoder import encoder_init

    overrides = ["device=cpu", "model.backbone=resnet18_narrow", "mocov2.proj_hidden_dim=64",
                 "simclr.proj_hidden_dim=64"]
    cfg = resolve(load_config("imagenette_mocov2", overrides))
    method = _method()
    save_checkpoint(tmp_path / "moco.pt", method, torch.optim.SGD(method.parameters(), lr=0.1), cfg, 1, 1)
    init, info = encoder_init(tmp_path / "moco.pt", cfg)
    assert info["loaded"] == "whole model" and set(init) == set(method.state_dict())
    simclr = resolve(load_config("imagenette_mocov2", [*overrides, "method=simclr"]))
    init, info = encoder_init(tmp_path / "moco.pt", simclr)  # another method: its backbone only
    assert info["loaded"] == "backbone" and set(init) == {f"backbone.{k}" for k in method.backbone.state_dict()}
    moco_file = {"state_dict": {f"module.encoder_q.{k}": v for k, v in method.backbone.state_dict().items()}}
    torch.save(moco_file, tmp_path / "moco_v2.pth.tar")
    init, info = encoder_init(tmp_path / "moco_v2.pth.tar", cfg)
    assert info["layout"].startswith("MoCo v1/v2") and info["sha256"] == file_hash(tmp_path / "moco_v2.pth.tar", 64)
    assert all(torch.equal(init[f"backbone.{k}"], v) for k, v in method.backbone.state_dict().items())
    with pytest.raises(SeppError, match="holds a resnet18_narrow backbone .* set model.backbone=resnet18_narrow"):
        encoder_init(tmp_path / "moco_v2.pth.tar", resolve(load_config("imagenette_mocov2", ["device=cpu"])))


@pytest.mark.filterwarnings("ignore:.*no labels.*")
def test_your_own_images_from_an_exported_encoder_without_labels(own_images, tmp_path, capsys):
    # 1. an encoder trained here (the kNN monitor asked for is turned off: there are no labels), exported
    with pytest.warns(UserWarning, match="has no labels"):
        assert main(["pretrain", "--config", "imagenette_mocov2", *tiny(own_images, tmp_path / "enc")]) == 0
    with open(tmp_path / "enc" / "metrics.csv") as f:
        assert [row["knn_top1"] for row in csv.DictReader(f)] == [""]
    exported = tmp_path / "encoder.pt"
    assert main(["export", "--checkpoint", str(tmp_path / "enc" / "last.pt"), "--out", str(exported)]) == 0
    # 2. `sepp pretrain` can start from it (train.init_backbone)
    assert main(["pretrain", "--config", "imagenette_mocov2", *tiny(own_images, tmp_path / "cont"),
                 f"train.init_backbone={exported}", "train.max_steps=1"]) == 0
    assert f"from {exported}" in capsys.readouterr().out
    # 3. `sepp run` with it as phase 1: mining, SePP and the step-matched baseline both start from it
    out = tmp_path / "run"
    assert main(["run", "--config", "imagenette_mocov2", *tiny(own_images, out), f"run.baseline_checkpoint={exported}",
                 "run.init=baseline", "run.sepp_epochs=1"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["mining"]["encoder"] == str(exported)
    assert results["mining"]["encoder_sha256"] == file_hash(exported, 64)
    assert results["evals"] == [] and results["sepp"]["init"] == "baseline" and results["mining"]["num_pairs"] == 80
    text = json.dumps(results)
    for word in ('"knn', '"linear', '"precision"', '"finetune', "NaN"):
        assert word not in text, word
    report = (out / "report.md").read_text()
    assert file_hash(exported, 64) in report and str(exported) in report
    for word in ("kNN", "linear top-1", "precision", "nan", "—"):
        assert word not in report and word not in printed.split("report:")[0].split("== phase 5/5")[-1], word
    page = (out / "pairs.html").read_text()
    assert page.count('class="row"') == 40 and 'class="label"' not in page and "✗" not in page
    assert "partner wrong" not in page and "figure.wrong" not in page and "precision" not in page
    # 4. the encoder's backbone must be the config's
    assert main(["run", "--config", "imagenette_mocov2", *tiny(own_images, tmp_path / "bad"),
                 f"run.baseline_checkpoint={exported}", "run.init=baseline", "model.backbone=resnet18"]) == 2
    assert "holds a resnet18_narrow backbone" in capsys.readouterr().err
