"""`sepp export --format detectron2`: Detectron2's ResNet key names (a table of its stages), values that
round-trip, the refusal of backbones Detectron2 cannot hold."""
import json
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from sepp.cli import main
from sepp.config import load_config
from sepp.engine.setup import resolve
from sepp.methods.checkpoint import FORMAT
from sepp.errors import SeppError
from sepp.methods import build_method
from sepp.models.backbones import torchvision_resnet
from sepp.models.detectron2 import from_detectron2, to_detectron2
from sepp.methods.export import export_backbone, load_exported

# Detectron2's ResNet (detectron2/modeling/backbone/resnet.py): block type and blocks per stage res2..res5;
# BasicBlock has conv1, conv2; BottleneckBlock conv1..conv3; a stage's first block has a `shortcut` when its
# input and output widths differ (all stages of R50; res3..res5 of R18). Every conv carries a `.norm`.
DETECTRON2_RESNETS = {
    "resnet18": {"convs": 2, "blocks": [2, 2, 2, 2], "shortcut_stages": [3, 4, 5]},
    "resnet50": {"convs": 3, "blocks": [3, 4, 6, 3], "shortcut_stages": [2, 3, 4, 5]},
}
NORM = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]


def detectron2_names(arch: str) -> set[str]:
    spec = DETECTRON2_RESNETS[arch]
    names = {"stem.conv1.weight"} | {f"stem.conv1.norm.{n}" for n in NORM}
    for stage, blocks in zip((2, 3, 4, 5), spec["blocks"]):
        for b in range(blocks):
            convs = [f"conv{c}" for c in range(1, spec["convs"] + 1)]
            if b == 0 and stage in spec["shortcut_stages"]:
                convs.append("shortcut")
            for conv in convs:
                names.add(f"res{stage}.{b}.{conv}.weight")
                names |= {f"res{stage}.{b}.{conv}.norm.{n}" for n in NORM}
    return names


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_exported_keys_are_detectron2_resnet_names_and_values_round_trip(arch):
    state = torchvision_resnet(arch).state_dict()
    payload = to_detectron2(state)
    assert set(payload["model"]) == detectron2_names(arch)
    assert payload["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in payload["model"].values())
    back = from_detectron2(pickle.loads(pickle.dumps(payload)))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    m = payload["model"]
    if arch == "resnet50":
        assert m["stem.conv1.weight"].shape == (64, 3, 7, 7)
        assert m["res2.0.shortcut.weight"].shape == (256, 64, 1, 1)
        assert m["res5.2.conv3.weight"].shape == (2048, 512, 1, 1)
        assert m["res3.0.conv2.weight"].shape == (128, 128, 3, 3)  # stride in the 3x3 (STRIDE_IN_1X1 False)
    else:
        assert m["res3.0.shortcut.norm.running_var"].shape == (128,)
        assert m["res5.1.conv2.weight"].shape == (512, 512, 3, 3)


def _checkpoint(tmp_path, backbone="resnet18", cifar_stem=False):
    cfg = resolve(load_config("cifar10_simclr", ["device=cpu", f"model.backbone={backbone}",
                                                  f"model.cifar_stem={cifar_stem}", "simclr.proj_hidden_dim=16"]))
    torch.manual_seed(0)
    method = build_method(cfg)
    with torch.no_grad():  # non-trivial BN statistics, so a mix-up of running_mean/var would show
        for mod in method.backbone.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-1, 1)
                mod.running_var.uniform_(0.5, 2)
    path = tmp_path / f"{backbone}_{cifar_stem}.pt"
    torch.save({"format": FORMAT, "model": method.state_dict(), "epoch": 3, "step": 30,
                "config": OmegaConf.to_container(cfg, resolve=True)}, path)
    return path, method


def test_export_command_writes_moco_pickle_and_config_keys(tmp_path):
    ckpt, method = _checkpoint(tmp_path)
    out = tmp_path / "model.pkl"
    assert main(["export", "--checkpoint", str(ckpt), "--format", "detectron2", "--out", str(out)]) == 0
    with open(out, "rb") as f:
        payload = pickle.load(f)
    assert set(payload) == {"model", "__author__", "matching_heuristics"}
    assert set(payload["model"]) == detectron2_names("resnet18")
    state = method.backbone.state_dict()
    assert np.array_equal(payload["model"]["res4.0.shortcut.norm.running_mean"],
                          state["layer3.0.downsample.1.running_mean"].numpy())
    assert np.array_equal(payload["model"]["stem.conv1.norm.weight"], state["bn1.weight"].numpy())
    side = json.loads((tmp_path / "model.pkl.json").read_text())
    assert side["format"] == "detectron2"
    assert side["detectron2_config"]["MODEL.RESNETS.STRIDE_IN_1X1"] is False
    assert side["detectron2_config"]["INPUT.FORMAT"] == "RGB"
    assert side["detectron2_config"]["MODEL.PIXEL_STD"] == [58.395, 57.120, 57.375]
    assert "NORM: SyncBN" in side["detectron2_yaml"] and "DEPTH: 18" in side["detectron2_yaml"]
    model = load_exported(str(out)).eval()  # back to torchvision, strictly
    x = torch.randn(2, 3, 64, 64)
    method.backbone.eval()
    assert torch.allclose(model(x), method.backbone(x), atol=1e-6)


@pytest.mark.parametrize("backbone,cifar_stem,match", [("resnet18", True, "CIFAR 3x3 stem"),
                                                       ("resnet18_narrow", False, "no Detectron2")])
def test_export_refuses_backbones_detectron2_cannot_hold(tmp_path, backbone, cifar_stem, match):
    ckpt, _ = _checkpoint(tmp_path, backbone, cifar_stem)
    with pytest.raises(SeppError, match=match):
        export_backbone(str(ckpt), str(tmp_path / "x.pkl"), format="detectron2")
    assert not (tmp_path / "x.pkl").exists()
