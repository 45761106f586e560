import math

import pytest
import torch

from sepp.methods.optim import LARS, build_optimizer, lr_at, set_lr


def test_schedule_hand_values():
    # warmup 2 of 10 epochs, base 1.0
    assert lr_at(0.5, 10, 2, 1.0) == pytest.approx(0.25)
    assert lr_at(2.0, 10, 2, 1.0) == pytest.approx(1.0)
    assert lr_at(6.0, 10, 2, 1.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_at(10.0, 10, 2, 1.0, min_lr=0.1) == pytest.approx(0.1)
    assert lr_at(4.0, 10, 0, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.4)))


def test_lars_step_hand_computed():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    w.grad = torch.tensor([0.0, 1.0])  # |g| = 1
    opt = LARS([w], lr=0.1, momentum=0.9, weight_decay=0.1, eta=0.02)
    opt.step()
    # trust = eta |w| / (|g| + wd |w|) = 0.02 * 5 / (1 + 0.5) ; update = trust * (g + wd w)
    trust = 0.02 * 5 / 1.5
    expected = torch.tensor([3.0, 4.0]) - 0.1 * trust * (torch.tensor([0.0, 1.0]) + 0.1 * torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(w.detach(), expected)


def test_lars_excludes_bias_and_norm_and_fix_lr_groups():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)
            self.bn = torch.nn.BatchNorm1d(3)
            self.pred = torch.nn.Linear(3, 3)

        def param_groups(self, lr):
            return [{"name": "main", "params": list(self.lin.parameters()) + list(self.bn.parameters())},
                    {"name": "pred", "params": list(self.pred.parameters()), "fix_lr": True}]

    class Cfg:
        optimizer, weight_decay, momentum = "lars", 1e-4, 0.9

    opt = build_optimizer(Toy(), Cfg, lr=0.5)
    excluded = [g for g in opt.param_groups if g.get("exclude")]
    assert sum(p.numel() for g in excluded for p in g["params"]) == 3 + 3 + 3 + 3  # lin.bias, bn w/b, pred.bias
    assert all(g["weight_decay"] == 0 for g in excluded)
    set_lr(opt, 0.01, 0.5)
    assert {g["lr"] for g in opt.param_groups if g.get("fix_lr")} == {0.5}
    assert {g["lr"] for g in opt.param_groups if not g.get("fix_lr")} == {0.01}
