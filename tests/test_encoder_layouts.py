"""Public SSL checkpoint layouts (sepp.models.layouts): each built here from a torchvision ResNet with its keys
renamed as that code saves them, heads and momentum copies included; each loads to the same backbone, and mining
with it gives the pairs of the plain weights (real CIFAR-10, a few hundred images)."""
import numpy as np
import pytest
import torch

from sepp.data.pairs import load_pairs
from sepp.errors import SeppError
from sepp.models.backbones import torchvision_resnet
from sepp.models.layouts import backbone_state, resnet_children


def _nets(arch="resnet18_narrow"):
    torch.manual_seed(0)
    net, other = torchvision_resnet(arch), torchvision_resnet(arch)  # other: momentum / target / student copy
    return net, other


def _named(net, prefix):
    return {prefix + k: v for k, v in net.state_dict().items()}


def _sequential(net, prefix):
    """``nn.Sequential(*list(resnet.children())[:-1])``: lightly's and PyTorch-BYOL's backbone."""
    return {prefix + k: v for k, v in torch.nn.Sequential(*list(net.children())[:-1]).state_dict().items()}


def _head(prefix, dims=(128, 64, 32)):
    return {f"{prefix}0.weight": torch.randn(dims[1], dims[0]), f"{prefix}0.bias": torch.randn(dims[1]),
            f"{prefix}2.weight": torch.randn(dims[2], dims[1]), f"{prefix}2.bias": torch.randn(dims[2])}


def layouts(net, other) -> dict:
    """name -> the object each public code saves (its keys, heads, wrappers and copies)."""
    fc = {"fc.weight": torch.randn(1000, 128), "fc.bias": torch.randn(1000)}
    return {
        "torchvision / DINO ResNet-50 / VISSL export": _named(net, "") | fc,
        "MoCo v1": {"epoch": 200, "arch": "resnet50", "state_dict": _named(net, "module.encoder_q.")
                    | {"module.encoder_q.fc.weight": torch.randn(128, 128)} | _named(other, "module.encoder_k.")
                    | {"module.queue": torch.randn(128, 4096), "module.queue_ptr": torch.zeros(1)}},
        "MoCo v2": {"epoch": 800, "arch": "resnet50", "state_dict": _named(net, "module.encoder_q.")
                    | _head("module.encoder_q.fc.") | _named(other, "module.encoder_k.") | _head("module.encoder_k.fc.")
                    | {"module.queue": torch.randn(32, 4096)}, "optimizer": {"state": {}, "param_groups": []}},
        "MoCo v3": {"state_dict": _named(net, "module.base_encoder.") | _head("module.base_encoder.fc.")
                    | _named(other, "module.momentum_encoder.") | _head("module.predictor.", (32, 64, 32))},
        "SimSiam": {"state_dict": _named(net, "module.encoder.") | _head("module.encoder.fc.")
                    | _head("module.predictor.", (32, 64, 32))},
        "DINO training checkpoint": {"teacher": _named(net, "module.backbone.") | _head("module.head.mlp."),
                                     "student": _named(other, "module.backbone.") | _head("module.head.mlp.")},
        "solo-learn": {"state_dict": _named(net, "backbone.") | _head("projector.")
                       | _named(other, "momentum_backbone.") | _head("momentum_projector.")},
        "lightly": _sequential(net, "backbone.") | _head("projection_head.layers."),
        "BYOL byol-pytorch": _named(net, "online_encoder.net.") | _head("online_encoder.projector.net.")
        | _named(other, "target_encoder.net.") | _head("online_predictor.net.", (32, 64, 32)),
        "BYOL PyTorch-BYOL": {"online_network_state_dict": _sequential(net, "encoder.") | _head("projetion.net."),
                              "target_network_state_dict": _sequential(other, "encoder.")},
        "BYOL net.": _named(net, "net.") | _head("projector."),
        "VISSL trunk": {"classy_state_dict": {"base_model": {"model": {
            "trunk": _named(net, "_feature_blocks."), "heads": _head("0.clf.0.")}}}, "phase_idx": 3},
    }


def test_sequential_indices_are_torchvision_children_in_order():
    assert resnet_children() == ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                                 "avgpool", "fc")
    net, _ = _nets()
    seq = _sequential(net, "")
    assert "0.weight" in seq and "1.running_mean" in seq and "4.0.conv1.weight" in seq and "7.1.bn2.bias" in seq


@pytest.mark.parametrize("name", list(layouts(*_nets())))
def test_every_public_layout_gives_the_backbone(name, tmp_path):
    from sepp.mining.encoder import load_encoder

    net, other = _nets()
    path = tmp_path / "ckpt.pth"
    torch.save(layouts(net, other)[name], path)
    encoder, info = load_encoder(path)
    assert (info["arch"], info["cifar_stem"], info["kind"]) == ("resnet18_narrow", False, "state_dict")
    want = net.state_dict()
    got = encoder.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), info["layout"]


def test_resnet50_moco_v2_keys_map_to_torchvision_shapes():
    from sepp.mining.encoder import _fit, infer_arch

    net = torchvision_resnet("resnet50")
    obj = {"state_dict": _named(net, "module.encoder_q.") | _head("module.encoder_q.fc.", (2048, 2048, 128))}
    state, layout = backbone_state(obj)
    assert layout == "MoCo v1/v2 at 'state_dict.module.encoder_q.'"
    assert infer_arch(state) == ("resnet50", False)
    assert {k: v.shape for k, v in _fit(state, "resnet50", False).state_dict().items()} == \
        {k: v.shape for k, v in net.state_dict().items()}


def test_unreadable_and_ambiguous_files_give_one_line_and_key_prefix_decides():
    net, other = _nets()
    with pytest.raises(SeppError) as e:
        backbone_state({"classy_state_dict": {"trunk._feature_blocks.conv1.weight": torch.zeros(1)},
                        "heads.0.weight": torch.zeros(1)})
    msg = str(e.value)
    assert "\n" not in msg and "classy_state_dict.trunk._feature_blocks. (1 keys)" in msg and "heads.0." in msg
    two = _named(net, "model_a.") | _named(other, "model_b.")
    with pytest.raises(SeppError, match="'model_a.', 'model_b.'.*--key-prefix"):
        backbone_state(two)
    state, _ = backbone_state(two, key_prefix="model_b")
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    moco = layouts(net, other)["MoCo v2"]  # the key encoder on request
    state, _ = backbone_state(moco, key_prefix="state_dict.module.encoder_k.")
    assert all(torch.equal(state[k], v) for k, v in other.state_dict().items())
    with pytest.raises(SeppError, match="no ResNet backbone at key prefix 'nothing.'.*state_dict.module.encoder_q."):
        backbone_state(moco, key_prefix="nothing.")


def test_bn_counters_a_file_lacks_start_at_zero():
    from sepp.mining.encoder import _fit

    net, _ = _nets()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    fitted = _fit(state, "resnet18_narrow", False).state_dict()
    assert all(torch.equal(fitted[k], v) for k, v in state.items()) and int(fitted["bn1.num_batches_tracked"]) == 0


@pytest.fixture(scope="module")
def mining(cifar_root, tmp_path_factory):
    """The config, the images and the pairs that the plain weights mine (no pictures: they take seconds)."""
    from sepp.config import load_config
    from sepp.engine.setup import resolve
    from sepp.mining.from_model import training_images

    cfg = resolve(load_config(None, ["device=cpu", f"data.root={cifar_root}", "data.subset=32", "mine.k=3",
                                     "data.workers=0", "model.backbone=resnet18_narrow"]))
    dataset = training_images(cfg)
    net, _ = _nets()
    return cfg, dataset, _mine(net.eval(), cfg, dataset, tmp_path_factory.mktemp("plain"))


def _mine(encoder, cfg, dataset, out):
    from sepp.mining.run import MineSettings, mine_pairs

    pairs, _ = mine_pairs(encoder, dataset, MineSettings.from_config(cfg, plots=False), device="cpu", out_dir=out,
                          meta={})
    assert _same(pairs, load_pairs(out / "pairs.npz"))  # what mining returns is what it wrote
    return pairs


def _same(a, b) -> bool:
    return np.array_equal(a.i, b.i) and np.array_equal(a.j, b.j) and np.array_equal(a.sim, b.sim)


@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
@pytest.mark.parametrize("name", list(layouts(*_nets())))
def test_mining_with_each_layout_equals_mining_with_the_plain_weights(name, mining, tmp_path):
    from sepp.mining.encoder import load_encoder

    cfg, dataset, plain = mining
    net, other = _nets()
    torch.save(layouts(net, other)[name], tmp_path / "ckpt.pth")
    pairs = _mine(load_encoder(tmp_path / "ckpt.pth")[0], cfg, dataset, tmp_path / "m")
    assert len(pairs) == 3 * 32 and _same(pairs, plain)


@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_key_prefix_option_of_sepp_mine(mining, tmp_path):
    from sepp.cli import main
    from sepp.mining.encoder import load_encoder

    cfg, dataset, plain = mining
    net, other = _nets()
    torch.save(_named(other, "a.") | _named(net, "b."), tmp_path / "two.pth")
    common = [f"data.root={cfg.data.root}", "data.subset=32", "mine.k=3", "data.workers=0", "device=cpu"]
    assert main(["mine", "--encoder", str(tmp_path / "two.pth"), f"mine.out={tmp_path / 'x'}", *common]) == 2
    assert main(["mine", "--encoder", str(tmp_path / "two.pth"), "--key-prefix", "b.", f"mine.out={tmp_path / 'm'}",
                 *common]) == 0
    pairs = load_pairs(tmp_path / "m" / "pairs.npz")
    assert _same(pairs, plain) and pairs.meta["encoder_layout"] == "torchvision at 'b.'"
    assert _same(_mine(load_encoder(tmp_path / "two.pth", key_prefix="b")[0], cfg, dataset, tmp_path / "c"), plain)
