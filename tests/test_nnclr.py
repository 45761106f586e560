"""NNCLR: the loss against hand-computed values, the support queue's nearest neighbours, the label-agreement
metric, the third (SePP partner) view, the config, and learning on real CIFAR-10."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnclr_run import SUBSET, USES_RUN, nnclr_overrides, pretrained_nnclr
from sepp.config import load_config
from sepp.engine.setup import resolve
from sepp.methods import METHODS, build_method
from sepp.methods.nnclr import NNCLR, nearest_neighbour, nnclr_loss


def _tiny(queue_size=8, temperature=0.5) -> NNCLR:
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 6))
    return NNCLR(backbone, 6, proj_hidden_dim=10, proj_dim=4, pred_hidden_dim=10, queue_size=queue_size,
                 temperature=temperature)


def test_loss_equals_hand_computed_value():
    nn_z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])           # normalised: e1, e2
    p = torch.tensor([[3.0, 0.0], [1.0, 1.0]])              # normalised: e1, (e1 + e2) / sqrt 2
    t, r = 0.5, 1 / math.sqrt(2)
    # anchor 0: logits (1, r) / t, target 0; anchor 1: logits (0, r) / t, target 1
    l0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(r / t)))
    l1 = -math.log(math.exp(r / t) / (math.exp(0.0) + math.exp(r / t)))
    assert nnclr_loss(nn_z, p, t).item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # process 1 of 2 holds anchor 1 only: the same term against the gathered predictions
    assert nnclr_loss(nn_z[1:], p[1:], t, p_all=p, offset=1).item() == pytest.approx(l1, rel=1e-6)


def test_nearest_neighbour_skips_unwritten_slots_and_falls_back_to_self():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z = torch.tensor([[-1.0, 0.0], [0.6, 0.8]])
    nn_z, slot = nearest_neighbour(z, keys, torch.tensor([True, True, False]))
    # z0 = -e1 is closest to the unwritten slot 2; among written slots both have similarity <= 0: slot 1 (0 > -1)
    assert slot.tolist() == [1, 1] and torch.equal(nn_z, keys[[1, 1]])
    nn_z, _ = nearest_neighbour(z, keys, torch.zeros(3, dtype=torch.bool))
    assert torch.equal(nn_z, z)


def _views(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 2, 2, generator=g) for _ in range(3)]


def test_forward_uses_queue_neighbours_symmetrically_and_enqueues_view_one():
    m = _tiny()
    x1, x2, _ = _views()
    ids = torch.arange(4)
    first = m(x1, x2, ids, ids)["loss"]
    with torch.no_grad():  # an empty queue: each view's positive is its own projection (SimCLR + predictor)
        h1, h2 = (m.projector(m.backbone(x)) for x in (x1, x2))
        p1, p2 = m.predictor(h1), m.predictor(h2)
        z1, z2 = nn.functional.normalize(h1, dim=1), nn.functional.normalize(h2, dim=1)
        expected = (nnclr_loss(z1, p2, 0.5) + nnclr_loss(z2, p1, 0.5)) / 2
    assert first.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(m.queue.keys[:4], z1, atol=1e-6) and m.queue.ids[:4].tolist() == [0, 1, 2, 3]
    assert m.queue.ids[4:].eq(-1).all() and int(m.queue.ptr) == 4
    # second step: the positives are the nearest stored projections (4 written slots)
    second = m(x2, x1, ids + 4, ids + 4)["loss"]
    n2, _ = nearest_neighbour(z2, m.queue.keys[:4], torch.ones(4, dtype=torch.bool))
    n1, _ = nearest_neighbour(z1, m.queue.keys[:4], torch.ones(4, dtype=torch.bool))
    expected = (nnclr_loss(n2, p1, 0.5) + nnclr_loss(n1, p2, 0.5)) / 2
    assert second.item() == pytest.approx(expected.item(), rel=1e-5)
    second.backward()
    for part in (m.backbone, m.projector, m.predictor):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_third_view_adds_ordered_pairs_and_two_views_are_unchanged():
    m = _tiny()
    x1, x2, _ = _views()
    ids = torch.arange(4)
    with torch.no_grad():
        h1, h2 = (m.projector(m.backbone(x)) for x in (x1, x2))
        p1, p2 = m.predictor(h1), m.predictor(h2)
        z1, z2 = nn.functional.normalize(h1, dim=1), nn.functional.normalize(h2, dim=1)
    a, b, c = (nnclr_loss(z1, p2, 0.5), nnclr_loss(z2, p1, 0.5), nnclr_loss(z2, p2, 0.5))
    # x3 = x2: the six ordered pairs are (1,2) (2,1) (1,3)=(1,2) (3,1)=(2,1) (2,3)=(2,2) (3,2)=(2,2)
    three = m(x1, x2, ids, ids, x2, ids)["loss"]
    assert three.item() == pytest.approx(((a + b + c) / 3).item(), rel=1e-5)
    m.queue.ids.fill_(-1)
    assert m(x1, x2, ids, ids)["loss"].item() == pytest.approx(((a + b) / 2).item(), rel=1e-5)


def test_nn_agreement_counts_only_anchors_with_a_neighbour_and_a_label():
    m = _tiny(queue_size=3)
    m.set_labels(torch.tensor([0, 1, 0, 2, -1]))
    m.queue.ids.copy_(torch.tensor([2, 3, -1]))
    # anchors 0 (label 0) -> slot 0 (image 2, label 0): hit; 1 (label 1) -> slot 1 (image 3, label 2): miss;
    # 4 (unknown label) -> left out; 2 -> slot 2 (never written) -> left out
    got = m._agreement(torch.tensor([0, 1, 4, 2]), torch.tensor([0, 1, 0, 2]))
    assert got.item() == pytest.approx(0.5)
    x1, x2, _ = _views(b=5)
    out = m(x1, x2, torch.arange(5), torch.arange(5))
    assert 0.0 <= out["nn_agreement"].item() <= 1.0
    m.set_labels(None)
    assert "nn_agreement" not in m(x1, x2, torch.arange(5), torch.arange(5))


def test_epoch_metrics_sum_the_training_steps_and_reset():
    m = _tiny(queue_size=4)
    m.set_labels(torch.tensor([0, 1, 0, 1]))
    m.queue.ids.copy_(torch.tensor([0, 1, 2, 3]))
    m._agreement(torch.tensor([0, 1]), torch.tensor([2, 2]))  # hits: 0 -> image 2 (label 0); 1 -> 2: miss
    m._agreement(torch.tensor([2, 3, 1]), torch.tensor([0, 1, 3]))  # 2 -> 0 hit; 3 -> 1 hit; 1 -> 3 hit
    m.eval()
    m._agreement(torch.tensor([0]), torch.tensor([1]))  # evaluation-mode calls are not counted
    assert m.epoch_metrics() == {"nn_agreement": pytest.approx(4 / 5)}
    assert m.epoch_metrics() == {}  # reset; no anchors since
    m.set_labels(None)
    assert m.epoch_metrics() == {}


def test_config_builds_nnclr_with_cifar_values():
    assert METHODS["nnclr"] is NNCLR
    cfg = resolve(load_config("cifar10_nnclr", ["model.backbone=resnet18_narrow", "device=cpu"]))
    m = build_method(cfg)
    assert isinstance(m, NNCLR) and m.temperature == 0.2 and m.queue.size == 65536
    assert [type(x) for x in m.projector][-2:] == [nn.Linear, nn.BatchNorm1d] and len(m.projector) == 8
    assert cfg.train.optimizer == "lars" and cfg.train.lr == 0.4 and cfg.train.lars_eta == 0.02
    assert [g["name"] for g in m.param_groups(0.1)] == ["backbone", "projector", "predictor"]
    # without a config file the constructor's (the paper's ImageNet) values apply
    paper = resolve(load_config(None, ["method=nnclr", "device=cpu"])).nnclr
    assert (paper.temperature, paper.queue_size, paper.proj_dim, paper.pred_hidden_dim) == (0.1, 98304, 256, 4096)


@USES_RUN
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_short_training_beats_initialisation_by_5_points(cifar_root, tmp_path_factory):
    run = pretrained_nnclr(cifar_root, tmp_path_factory)
    assert run["trained_knn"] >= run["init_knn"] + 5.0, (run["init_knn"], run["trained_knn"])
    assert run["trained_knn"] > 25.0  # chance is 10 %
    # the neighbour's label agreement is logged every epoch (labels exist); above chance once it learns
    agreement = [float(r["nn_agreement"]) for r in run["metrics"]]
    assert len(agreement) == len(run["metrics"]) and all(0.0 <= a <= 1.0 for a in agreement)
    assert agreement[-1] > 0.12, agreement


@USES_RUN
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_trains_with_semantic_pairs(cifar_root, tmp_path_factory, tmp_path):
    from sepp.engine.trainer import pretrain
    from sepp.mining.encoder import encoder_config, mine_with_encoder
    from sepp.data.pairs import load_pairs

    run = pretrained_nnclr(cifar_root, tmp_path_factory)
    cfg = encoder_config(run["checkpoint"], None, ["mine.k=1", "device=cpu", f"data.root={cifar_root}"])
    _, stats = mine_with_encoder(run["checkpoint"], cfg, tmp_path / "mining")
    pairs = load_pairs(tmp_path / "mining" / "pairs.npz")
    assert stats["num_pairs"] == len(pairs.i) == SUBSET  # k = 1: one partner per image
    cfg = load_config("cifar10_nnclr", nnclr_overrides(cifar_root, tmp_path / "sepp", **{
        "sepp.pairs": tmp_path / "mining" / "pairs.npz", "train.max_steps": 3, "train.knn_every": -1}))
    summary = pretrain(cfg, progress=False)
    assert summary["steps"] == 3 and summary["num_pairs"] == SUBSET and np.isfinite(summary["seconds"])
