"""Backbones, heads, the memory queue and the four methods."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision.models import ResNet, resnet18

from sepp.errors import SeppError
from sepp.methods import METHODS, Method, build_method
from sepp.methods.byol import BYOL, byol_tau
from sepp.methods.mocov2 import MoCoV2
from sepp.methods.queue import MemoryQueue
from sepp.models import build_backbone, mlp, torchvision_resnet


# ---- backbones and heads ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048),
                                      ("resnet18_narrow", 128)])
@pytest.mark.parametrize("cifar_stem", [True, False])
def test_backbone_export_loads_strictly_into_torchvision(name, dim, cifar_stem):
    model, feat_dim = build_backbone(name, cifar_stem)
    assert feat_dim == dim and isinstance(model, ResNet)
    torchvision_resnet(name, cifar_stem).load_state_dict(model.state_dict(), strict=True)
    assert (model.conv1.kernel_size, model.conv1.stride) == (((3, 3), (1, 1)) if cifar_stem else ((7, 7), (2, 2)))
    assert isinstance(model.maxpool, nn.Identity) == cifar_stem


def test_narrow_resnet_has_torchvision_key_names_and_maps_to_128_features():
    model, _ = build_backbone("resnet18_narrow", cifar_stem=True)
    reference = {k for k in resnet18(weights=None).state_dict() if not k.startswith("fc.")}
    assert set(model.state_dict()) == reference
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 128)
    assert build_backbone("resnet18_narrow", cifar_stem=False)[0](torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_unknown_backbone_lists_choices():
    with pytest.raises(SeppError, match="resnet18_narrow"):
        build_backbone("vit_b16")


def test_mlp_layouts():
    simsiam_proj = mlp(8, 16, 4, 3, last_bn=True)
    assert [type(m) for m in simsiam_proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    assert all(m.bias is None for m in simsiam_proj if isinstance(m, nn.Linear))
    assert not simsiam_proj[-1].affine
    moco = mlp(8, 16, 4, hidden_bn=False)
    assert [type(m) for m in moco] == [nn.Linear, nn.ReLU, nn.Linear]
    assert moco[0].bias is not None and moco[2].bias is not None
    byol = mlp(8, 16, 4, last_bias=False)
    assert byol[-1].bias is None and byol[-1].out_features == 4


# ---- memory queue --------------------------------------------------------------------------------------------

def test_queue_initial_state():
    queue = MemoryQueue(dim=3, size=5)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    assert queue.ids.tolist() == [-1] * 5 and int(queue.ptr) == 0
    assert set(queue.state_dict()) == {"keys", "ids", "ptr"}


def test_queue_ring_buffer_wraps_when_size_is_not_a_multiple_of_the_batch():
    queue = MemoryQueue(dim=2, size=5)
    rows = lambda ids: torch.tensor([[float(i), 0.0] for i in ids])
    queue.enqueue(rows([10, 11]), torch.tensor([10, 11]))
    queue.enqueue(rows([12, 13]), torch.tensor([12, 13]))
    queue.enqueue(rows([14, 15]), torch.tensor([14, 15]))   # slots 4, 0
    assert queue.ids.tolist() == [15, 11, 12, 13, 14] and int(queue.ptr) == 1
    assert queue.keys[:, 0].tolist() == [15, 11, 12, 13, 14]
    # 7 > size, written from slot 1 one at a time: 20..26 land in slots 1 2 3 4 0 1 2.
    queue.enqueue(rows(range(20, 27)), torch.arange(20, 27))
    assert queue.ids.tolist() == [24, 25, 26, 22, 23] and int(queue.ptr) == 3
    assert queue.keys[:, 0].tolist() == [24, 25, 26, 22, 23]


# ---- MoCo-v2 -------------------------------------------------------------------------------------------------

def tiny_backbone(in_dim=12, out_dim=6):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim))


def test_moco_negative_masking_removes_exactly_the_partners_and_the_own_image():
    torch.manual_seed(0)
    model = MoCoV2(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, queue_size=6, temperature=0.5, bn="none")
    queue_ids = [0, 3, 5, -1, 3, 7]
    model.queue.ids.copy_(torch.tensor(queue_ids))
    pairs = [(0, 3), (5, 2), (4, 7), (0, 9)]
    # (0, 9) is also a trap: code 0*10+9 == 1*10+(-1), the empty slot seen from query 1.
    model.set_known_positives(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]), 10)
    ids1 = torch.tensor([0, 2, 4, 9, 1])
    ids2 = torch.tensor([3, 2, 6, 9, 1])
    partners = {}
    for a, b in pairs:
        partners.setdefault(a, set()).add(b)
        partners.setdefault(b, set()).add(a)
    expected = [[queue_ids[s] in partners.get(int(a), set()) | {int(a)} for s in range(6)] for a in ids1]
    assert model.negative_mask(ids1).tolist() == expected
    # query 0: slots 0 (itself), 1, 4; query 2: slot 2; query 4: slot 5; query 9: slot 0
    assert sum(map(sum, expected)) == 6

    x1, x2 = torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)
    queue_before = model.queue.keys.clone()
    with torch.no_grad():
        q = F.normalize(model.projector(model.backbone(x1)), dim=1).tolist()
        k = F.normalize(model.momentum_projector(model.momentum_backbone(x2)), dim=1)
    out = model(x1, x2, ids1, ids2)
    dot = lambda u, v: sum(a * b for a, b in zip(u, v))
    manual = 0.0
    for b in range(5):
        pos = dot(q[b], k[b].tolist()) / 0.5
        negs = [dot(q[b], queue_before[s].tolist()) / 0.5 for s in range(6) if not expected[b][s]]
        manual += (-pos + math.log(sum(math.exp(v) for v in [pos] + negs))) / 5
    assert abs(out["loss"].item() - manual) < 1e-5
    assert abs(float(out["masked_negatives"]) - 6 / 5) < 1e-6  # 6 masked entries over 5 queries
    # The batch's keys and their ids (view 2) were enqueued at slots 0-4.
    assert torch.allclose(model.queue.keys[:5], k, atol=1e-6)
    assert model.queue.ids.tolist() == [3, 2, 6, 9, 1, 7] and int(model.queue.ptr) == 5


def test_moco_rejects_pairs_outside_the_dataset():
    model = MoCoV2(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, queue_size=6)
    with pytest.raises(SeppError):
        model.set_known_positives(torch.tensor([0]), torch.tensor([10]), 10)


def test_moco_symmetric_enqueues_both_directions_and_averages():
    torch.manual_seed(0)
    model = MoCoV2(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, queue_size=8, symmetric=True, bn="none")
    x1, x2 = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    loss = model(x1, x2, torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))["loss"]
    assert model.queue.ids.tolist()[:6] == [5, 6, 7, 0, 1, 2] and int(model.queue.ptr) == 6
    # Same state, asymmetric, each direction on its own: the symmetric loss is their mean.
    torch.manual_seed(0)
    ref = MoCoV2(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, queue_size=8, bn="none")
    ref2 = MoCoV2(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, queue_size=8, bn="none")
    ref2.load_state_dict(ref.state_dict())
    l12 = ref(x1, x2, torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7]))["loss"]
    l21 = ref2(x2, x1, torch.tensor([5, 6, 7]), torch.tensor([0, 1, 2]))["loss"]
    assert torch.allclose(loss, (l12 + l21) / 2, atol=1e-6)


def test_moco_momentum_update():
    model = MoCoV2(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, queue_size=4, momentum=0.9)
    with torch.no_grad():
        for p in model.momentum_backbone.parameters():
            p.fill_(2.0)
        for p in model.backbone.parameters():
            p.fill_(1.0)
    model.after_step(0.5)
    for p in model.momentum_backbone.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.9 * 2.0 + 0.1 * 1.0))
    assert all(not p.requires_grad for p in model.momentum_projector.parameters())


def test_moco_rejects_unknown_bn_mode():
    with pytest.raises(SeppError, match="shuffle"):
        MoCoV2(tiny_backbone(), 6, bn="group")


# ---- BYOL ----------------------------------------------------------------------------------------------------

def test_byol_tau_schedule():
    assert byol_tau(0.996, 0.0) == pytest.approx(0.996)
    assert byol_tau(0.996, 0.5) == pytest.approx(0.998)
    assert byol_tau(0.996, 1.0) == pytest.approx(1.0)
    assert byol_tau(0.99, 0.25) == pytest.approx(1 - 0.01 * (math.sqrt(0.5) + 1) / 2)


def test_byol_after_step_applies_the_scheduled_tau():
    model = BYOL(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, pred_hidden_dim=8, tau_base=0.9)
    with torch.no_grad():
        for p in model.target_projector.parameters():
            p.fill_(0.0)
        for p in model.projector.parameters():
            p.fill_(1.0)
    model.after_step(0.5)  # tau = 1 - 0.1 * 0.5 = 0.95
    assert model.tau == pytest.approx(0.95)
    for p in model.target_projector.parameters():
        assert torch.allclose(p, torch.full_like(p, 0.05))


# ---- every method --------------------------------------------------------------------------------------------

def config(method, **section):
    return OmegaConf.create({"method": method, "model": {"backbone": "resnet18_narrow", "cifar_stem": True},
                             method: section})


SMALL = {"mocov2": {"proj_hidden_dim": 64, "queue_size": 32},
         "simsiam": {"proj_hidden_dim": 64, "proj_dim": 64, "pred_hidden_dim": 16},
         "simclr": {"proj_hidden_dim": 64},
         "byol": {"proj_hidden_dim": 64, "pred_hidden_dim": 64},
         "nnclr": {"proj_hidden_dim": 64, "pred_hidden_dim": 64, "queue_size": 32}}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_one_step_with_finite_loss_and_gradients(method):
    torch.manual_seed(0)
    model = build_method(config(method, **SMALL[method]))
    x1, x2 = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    ids = torch.arange(4)
    out = model(x1, x2, ids, ids)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert any(p.grad.abs().sum() > 0 for p in model.backbone.parameters())
    model.after_step(0.1)

    groups = model.param_groups(0.05)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all("name" in g and g["lr"] == 0.05 for g in groups)
    assert model.backbone(x1).shape == (4, 128) and model.projector is not None


@pytest.mark.parametrize("method, names", [("mocov2", ["backbone", "projector"]),
                                           ("simclr", ["backbone", "projector"]),
                                           ("simsiam", ["backbone", "projector", "predictor"]),
                                           ("byol", ["backbone", "projector", "predictor"]),
                                           ("nnclr", ["backbone", "projector", "predictor"])])
def test_param_groups_come_from_the_method_base(method, names):
    """One default (sepp.methods.base.Method): a group per trained child, momentum/target copies left out."""
    model = build_method(config(method, **SMALL[method]))
    assert isinstance(model, Method) and [g["name"] for g in model.param_groups(0.1)] == names
    assert ("param_groups" in vars(type(model))) == (method == "simsiam")  # only SimSiam overrides it
    assert type(model).has_negatives == (method in ("mocov2", "simclr"))


def test_nnclr_projector_ends_in_an_affine_bn_like_solo_learn():
    last = build_method(config("nnclr", **SMALL["nnclr"])).projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and last.affine


def test_simsiam_predictor_has_fixed_lr():
    groups = {g["name"]: g for g in build_method(config("simsiam", **SMALL["simsiam"])).param_groups(0.1)}
    assert groups["predictor"]["fix_lr"] and not groups["backbone"]["fix_lr"]


def test_missing_or_null_keys_take_the_constructor_defaults_and_yield_to_the_section():
    # one home for method defaults: the constructor (the paper's ImageNet values), also for CIFAR stems
    model = build_method(config("mocov2", proj_hidden_dim=64, temperature=0.3, momentum=None))
    assert (model.queue.size, model.temperature, model.momentum, model.symmetric) == (65536, 0.3, 0.999, False)
    simsiam = build_method(config("simsiam", **SMALL["simsiam"]))
    assert sum(isinstance(m, nn.Linear) for m in simsiam.projector) == 3
    simsiam = build_method(config("simsiam", **SMALL["simsiam"], proj_layers=2))
    assert sum(isinstance(m, nn.Linear) for m in simsiam.projector) == 2


def test_build_method_errors():
    with pytest.raises(SeppError, match="simclr"):
        build_method(config("swav"))
    with pytest.raises(SeppError, match="tempreature"):
        build_method(config("simclr", tempreature=0.2))


def test_split_batchnorm_normalises_each_group_and_keeps_state_keys():
    from sepp.models.backbones import SplitBatchNorm2d, split_batchnorm

    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    bn = SplitBatchNorm2d(3, num_splits=2)
    y = bn(x)
    for g in range(2):  # group g = samples g, g+2, g+4, g+6, normalised with their own statistics
        xg = x[g::2]
        ref = (xg - xg.mean((0, 2, 3), keepdim=True)) / torch.sqrt(xg.var((0, 2, 3), unbiased=False,
                                                                          keepdim=True) + bn.eps)
        torch.testing.assert_close(y[g::2], ref, atol=1e-5, rtol=1e-5)
    running = torch.stack([0.1 * x[g::2].mean((0, 2, 3)) for g in range(2)]).mean(0)
    torch.testing.assert_close(bn.running_mean, running)
    bn.eval()
    torch.testing.assert_close(bn(x), torch.nn.functional.batch_norm(
        x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    keys = net.state_dict().keys()
    split_batchnorm(net, 4)
    assert isinstance(net[1], SplitBatchNorm2d) and net.state_dict().keys() == keys


def test_moco_single_process_split_shuffle_trains():
    from sepp.models.backbones import SplitBatchNorm2d, build_backbone

    backbone, dim = build_backbone("resnet18_narrow", True)
    model = MoCoV2(backbone, dim, proj_hidden_dim=16, proj_dim=8, queue_size=16, bn="shuffle", bn_splits=4)
    assert model.split_shuffle
    assert any(isinstance(m, SplitBatchNorm2d) for m in model.momentum_backbone.modules())
    x1, x2, ids = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32), torch.arange(8)
    out = model(x1, x2, ids, ids)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
