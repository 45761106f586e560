"""Recipe fidelity: the shipped configs step exactly like the official recipes they cite.

- MoCo-v2 CIFAR: sepp (averaged symmetric loss, configs/cifar10_mocov2.yaml) against a small reimplementation
  of the official CIFAR demo's update (summed loss, lr 0.06, wd 5e-4, SplitBatchNorm 8, key-encoder momentum
  update at the start of forward, queue of both keys), stepped side by side from the same weights and inputs.
- LARS: one (and a second, momentum) step of sepp's LARS built from the SimCLR/BYOL CIFAR configs against
  solo-learn's per-layer formula (clip_lr, eta, exclude_bias_n_norm).
- Every shipped config shows its cited values in `sepp pretrain --config C --print-config`.
- One home for method defaults, SyncBN under DDP, and the named linear protocols.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from sepp.cli import main as cli
from sepp.config import PACKAGE_CONFIGS, build_config, load_config
from sepp.engine.setup import resolve
from sepp.methods.optim import build_optimizer, lr_at, schedule_steps
from sepp.engine.setup import build_model, scaled_lr
from sepp.engine.trainer import train_step
from sepp.methods import METHODS, build_method, hyperparameter_defaults
from sepp.models.backbones import build_backbone


# ---- MoCo-v2: the official CIFAR demo's update, reimplemented ------------------------------------------

class DemoSplitBN(nn.BatchNorm2d):
    """The demo's SplitBatchNorm (training mode): the batch viewed as [N / s, C * s, H, W], so samples
    g, g + s, g + 2s, ... share statistics, as if spread over s GPUs; running statistics averaged over splits."""

    num_splits = 8

    def forward(self, x):
        N, C, H, W = x.shape
        s = self.num_splits
        running_mean_split = self.running_mean.repeat(s)
        running_var_split = self.running_var.repeat(s)
        out = F.batch_norm(x.view(-1, C * s, H, W), running_mean_split, running_var_split,
                           self.weight.repeat(s), self.bias.repeat(s), True, self.momentum, self.eps).view(N, C, H, W)
        self.running_mean.data.copy_(running_mean_split.view(s, C).mean(dim=0))
        self.running_var.data.copy_(running_var_split.view(s, C).mean(dim=0))
        return out


class DemoMoCo(nn.Module):
    """facebookresearch/moco colab/moco_cifar10_demo.ipynb ModelMoCo (symmetric), on sepp's network."""

    def __init__(self, backbone, projector, queue_keys, m, T):
        super().__init__()
        self.encoder_q = nn.Sequential(backbone, projector)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", queue_keys.t().clone())  # [dim, K], as the demo stores it
        self.ptr, self.m, self.T = 0, m, T

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            pk.data = pk.data * self.m + pq.data * (1.0 - self.m)

    @torch.no_grad()
    def _key(self, im):  # _batch_shuffle_single_gpu / _batch_unshuffle_single_gpu
        idx_shuffle = torch.randperm(im.shape[0])
        k = F.normalize(self.encoder_k(im[idx_shuffle]), dim=1)
        return k[torch.argsort(idx_shuffle)]

    def _contrastive_loss(self, q_im, k):
        q = F.normalize(self.encoder_q(q_im), dim=1)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))

    def forward(self, im1, im2):
        with torch.no_grad():
            self._momentum_update_key_encoder()
        # the keys' random shuffles are drawn in the order sepp draws them (view 1, then view 2); the order of
        # random draws is not part of the recipe
        k1, k2 = self._key(im1), self._key(im2)
        loss = self._contrastive_loss(im1, k2) + self._contrastive_loss(im2, k1)  # the demo SUMS both
        keys = torch.cat([k1, k2], dim=0)
        with torch.no_grad():
            n = keys.shape[0]
            self.queue[:, self.ptr:self.ptr + n] = keys.t()
            self.ptr = (self.ptr + n) % self.queue.shape[1]
        return loss


def _demo_side_by_side(overrides=(), steps=3, batch=16, size=16):
    """Step sepp (shipped cifar10_mocov2 config) and the demo side by side from the same weights, inputs and
    key shuffles. Before every step the demo is set to sepp's state (query weights, queue), so float
    rounding cannot compound through the chaotic early steps; each optimizer keeps its own momentum buffer and
    each side its own key encoder (a linear EMA of the synced weights, so it does not drift).
    Returns the largest difference of the updated weights over steps and tensors, relative to each tensor's
    scale, for conv/linear weights and for 1-d tensors (BN, biases) separately."""
    # The shipped recipe; only the network size, queue length and batch are made small (batch 512 stays in
    # the config, so the learning rate is the one a real run uses).
    cfg = resolve(load_config("cifar10_mocov2", ["device=cpu", "model.backbone=resnet18_narrow",
                                                 f"mocov2.queue_size={4 * batch}", "train.channels_last=false",
                                                 *overrides]))
    assert (cfg.train.batch_size, cfg.mocov2.bn_splits, cfg.mocov2.symmetric) == (512, 8, True)
    torch.manual_seed(0)
    method = build_method(cfg)
    plain, _ = build_backbone("resnet18_narrow", True)
    plain.load_state_dict(method.backbone.state_dict())
    for mod in plain.modules():
        if type(mod) is nn.BatchNorm2d:
            mod.__class__ = DemoSplitBN
    demo = DemoMoCo(plain, copy.deepcopy(method.projector), method.queue.keys, m=0.99, T=0.1)
    # the demo's optimizer: SGD lr 0.06 (batch 512; its cosine is per epoch, so epoch 0 runs at 0.06)
    demo_opt = torch.optim.SGD(demo.encoder_q.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)

    base_lr = scaled_lr(cfg)
    opt = build_optimizer(method, cfg.train, base_lr)
    steps_per_epoch = 50000 // 512  # the full run's schedule: 800 epochs of CIFAR-10 at batch 512
    total, warmup = schedule_steps(cfg.train.epochs, steps_per_epoch, 0, cfg.train.warmup_epochs, steps_per_epoch)
    lrs = [lr_at(t, total, warmup, base_lr, cfg.train.min_lr) for t in range(1, steps + 1)]
    assert base_lr == pytest.approx(0.12) and lrs[0] == pytest.approx(0.12, rel=1e-8)
    ours_q = list(method.backbone.parameters()) + list(method.projector.parameters())
    ours_k = list(method.momentum_backbone.parameters()) + list(method.momentum_projector.parameters())
    g = torch.Generator().manual_seed(1)
    worst = {"weights": 0.0, "vectors": 0.0}
    for step in range(steps):
        with torch.no_grad():
            for a, b in zip(ours_q, demo.encoder_q.parameters()):
                b.copy_(a)
            # sepp writes each step's block as [k2, k1], the demo as [k1, k2]: the same set of negatives
            demo.queue.copy_(method.queue.keys.t())
            demo.ptr = int(method.queue.ptr)
        before = [a.detach().clone() for a in ours_q]
        x1, x2 = torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)
        ids = torch.arange(batch) + batch * step
        rng = torch.get_rng_state()
        train_step(method, method, opt, (x1, x2, ids, ids), torch.device("cpu"), cfg, lrs[step], base_lr,
                   (step + 1) / len(lrs))
        torch.set_rng_state(rng)  # the demo draws the same key shuffles
        loss = demo(x1, x2)
        demo_opt.zero_grad()
        loss.backward()
        demo_opt.step()
        for a, b, p0 in zip(ours_q, demo.encoder_q.parameters(), before):
            # the difference of the two updated weights, in units of the tensor's scale (its largest weight, or
            # update for zero-initialised biases); float32 rounding alone is ~6e-8 of it
            scale = p0.abs().max() + (b.detach() - p0).abs().max()
            kind = "weights" if p0.ndim > 1 else "vectors"
            worst[kind] = max(worst[kind], ((a - b).abs().max() / scale.clamp_min(1e-30)).item())
    # the key encoder: sepp updates it after each step, the demo at the start of the next forward
    with torch.no_grad():
        for a, b in zip(ours_q, demo.encoder_q.parameters()):
            b.copy_(a)
        demo._momentum_update_key_encoder()
    for a, b in zip(ours_k, demo.encoder_k.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    return worst


def test_mocov2_cifar_config_steps_exactly_like_the_official_demo():
    worst = _demo_side_by_side()
    # every weight agrees with the demo's to float rounding (~1e-6 of its scale here); BN parameters and biases (zero-initialised, tiny
    # updates through 2-sample BN groups) to rounding amplified by the tiny test batch
    assert worst["weights"] < 5e-6 and worst["vectors"] < 1e-4, worst
    # and the check can fail: with the averaged loss, the pre-fix wd 5e-4 adds lr x 2.5e-4 = 3e-5 per step
    assert _demo_side_by_side(["train.weight_decay=5e-4"], steps=1)["weights"] > 1e-5


def test_mocov2_old_weight_decay_would_not_match():
    """The check above can fail: with the averaged loss, wd 5e-4 (the pre-fix config) decays twice as fast."""
    p = nn.Parameter(torch.ones(3))
    q = nn.Parameter(torch.ones(3))
    g = torch.tensor([0.1, -0.2, 0.3])  # gradient of the summed loss; the averaged loss has half of it
    for wd, expect_equal in ((2.5e-4, True), (5e-4, False)):
        p.data.fill_(1.0), q.data.fill_(1.0)
        sum_opt = torch.optim.SGD([p], lr=0.06, momentum=0.9, weight_decay=5e-4)
        mean_opt = torch.optim.SGD([q], lr=0.12, momentum=0.9, weight_decay=wd)
        for _ in range(3):
            p.grad, q.grad = g.clone(), g / 2
            sum_opt.step(), mean_opt.step()
        assert torch.allclose(p, q, rtol=0, atol=1e-7) == expect_equal


# ---- LARS: solo-learn's formula -----------------------------------------------------------------------

def solo_lars_step(params, grads, bufs, lr, wd, eta, clip, momentum=0.9, eps=1e-8):
    """solo-learn solo/utils/lars.py step (exclude_bias_n_norm: 1-d tensors are plain SGD without decay),
    written out per layer with Python floats."""
    out = []
    for i, (p, g) in enumerate(zip(params, grads)):
        d = g.clone()
        if p.ndim != 1:
            pn, gn = p.norm().item(), g.norm().item()
            if pn != 0 and gn != 0:
                s = eta * pn / (gn + pn * wd + eps)
                if clip:
                    s = min(s / lr, 1.0)
                d = (g + wd * p) * s
        bufs[i] = d.clone() if bufs[i] is None else bufs[i] * momentum + d
        out.append(p - lr * bufs[i])
    return out


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.big = nn.Linear(4, 4)     # large |w| / |g|: eta * trust > lr, the clip is active
        self.small = nn.Linear(4, 4)   # small |w| / |g|: eta * trust < lr, LARS lowers the rate
        self.bn = nn.BatchNorm1d(4)
        with torch.no_grad():
            self.big.weight.mul_(20)
            self.small.weight.mul_(0.01)

    def param_groups(self, lr):
        return [{"name": "all", "params": list(self.parameters())}]


@pytest.mark.parametrize("config,lr", [("cifar10_simclr", 0.8), ("cifar10_byol", 2.0)])
def test_lars_step_matches_solo_learn(config, lr):
    cfg = load_config(config)
    assert (cfg.train.optimizer, cfg.train.lars_eta, cfg.train.lars_clip_lr) == ("lars", 0.02, True)
    assert scaled_lr(cfg) == pytest.approx(lr)  # solo-learn: lr x batch / 256
    torch.manual_seed(0)
    model = Toy()
    opt = build_optimizer(model, cfg.train, scaled_lr(cfg))
    params = [p.detach().clone() for p in model.parameters()]
    bufs = [None] * len(params)
    grad_scale = {id(model.big.weight): 1e-3, id(model.small.weight): 10.0}
    for step, step_lr in enumerate([lr, 0.7 * lr]):  # the rate changes between steps, as under a schedule
        grads = [torch.randn(p.shape) * grad_scale.get(id(p), 1.0) for p in model.parameters()]
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        for group in opt.param_groups:
            group["lr"] = step_lr
        opt.step()
        expected = solo_lars_step(params, grads, bufs, step_lr, cfg.train.weight_decay, 0.02, True)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-6, atol=1e-7)
        if step == 0:
            # both branches of the clip were taken, and without the clip the step would differ
            wd = cfg.train.weight_decay
            trust = [0.02 * p.norm().item() / (g.norm().item() + wd * p.norm().item())
                     for p, g in zip(params[:1] + params[2:3], grads[:1] + grads[2:3])]
            assert trust[0] > lr > trust[1]
            unclipped = solo_lars_step(params, grads, [None] * len(params), step_lr, wd, 0.02, False)
            assert not torch.allclose(unclipped[0], expected[0])
        params = [e.clone() for e in expected]


# ---- every shipped config shows its cited values ----------------------------------------------------------

CITED = {
    "cifar10_mocov2": {"train.lr": 0.06, "train.weight_decay": 2.5e-4, "train.batch_size": 512,
                       "mocov2.queue_size": 4096, "mocov2.momentum": 0.99, "mocov2.temperature": 0.1,
                       "mocov2.symmetric": True, "mocov2.bn_splits": 8, "train.epochs": 800},
    "cifar10_simclr": {"train.optimizer": "lars", "train.lr": 0.4, "train.lars_eta": 0.02,
                       "train.lars_clip_lr": True, "train.weight_decay": 1e-4, "simclr.temperature": 0.2,
                       "simclr.proj_dim": 256, "train.warmup_epochs": 10},
    "cifar10_byol": {"train.optimizer": "lars", "train.lr": 1.0, "train.lars_eta": 0.02,
                     "train.lars_clip_lr": True, "train.weight_decay": 1e-5, "byol.tau_base": 0.99,
                     "byol.proj_dim": 256, "byol.pred_hidden_dim": 4096},
    "cifar10_simsiam": {"train.lr": 0.03, "train.weight_decay": 5e-4, "simsiam.proj_layers": 2,
                        "simsiam.pred_hidden_dim": 512, "simsiam.fix_pred_lr": True},
    "imagenet_mocov2": {"mocov2.queue_size": 65536, "mocov2.momentum": 0.999, "mocov2.temperature": 0.2,
                        "mocov2.symmetric": False, "train.lr": 0.03, "train.weight_decay": 1e-4,
                        "eval.linear_protocol": "standard"},
    "imagenet_simsiam": {"simsiam.proj_layers": 3, "train.lr": 0.05, "train.batch_size": 512,
                         "train.weight_decay": 1e-4, "train.epochs": 100},
    "imagenet_simclr": {"simclr.temperature": 0.1, "simclr.proj_dim": 128, "train.lr": 0.3,
                        "train.batch_size": 4096, "train.weight_decay": 1e-6, "train.lars_eta": 0.001,
                        "train.lars_clip_lr": False},
    "imagenet_byol": {"byol.tau_base": 0.996, "train.lr": 0.2, "train.batch_size": 4096,
                      "train.weight_decay": 1.5e-6, "train.lars_eta": 0.001, "train.lars_clip_lr": False},
    "cifar10_sepp_mocov2": {"eval.linear_protocol": "standard", "mocov2.bn_splits": 8},
}


@pytest.mark.parametrize("name", sorted(CITED))
def test_print_config_shows_the_cited_values(name, capsys):
    assert cli(["pretrain", "--config", name, "--print-config", "device=cpu"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    for key, value in CITED[name].items():
        section, leaf = key.split(".")
        assert shown[section][leaf] == value, (name, key)


def test_every_shipped_config_resolves_with_no_null_method_value():
    for path in sorted(PACKAGE_CONFIGS.rglob("*.yaml")):
        cfg = resolve(build_config(str(path), {"device": "cpu"}))
        section = cfg[cfg.method]
        assert all(v is not None for v in section.values()), path.name
        build_method(cfg)  # every value is one the constructor accepts


# ---- one home for method defaults ----------------------------------------------------------------------

def test_method_defaults_live_only_in_the_constructors():
    schema = build_config()
    for name in ("mocov2", "simclr", "simsiam", "byol"):
        assert not hasattr(METHODS[name], "CIFAR_DEFAULTS"), name
        assert all(v is None for v in schema[name].values()), name
    # an ImageNet config without a method section gets the papers' values from the constructors
    simsiam = resolve(build_config({"method": "simsiam", "data": {"name": "imagenet"}, "device": "cpu"}))
    byol = resolve(build_config({"method": "byol", "data": {"name": "imagenet"}, "device": "cpu"}))
    simclr = resolve(build_config({"method": "simclr", "device": "cpu"}))
    assert simsiam.simsiam.proj_layers == 3 and byol.byol.tau_base == 0.996 and simclr.simclr.temperature == 0.1
    assert dict(simclr.simclr) == {k: v for k, v in hyperparameter_defaults(METHODS["simclr"]).items()}


# ---- SyncBN under DDP ---------------------------------------------------------------------------------------

def test_sync_bn_is_on_by_default_under_ddp_where_the_paper_uses_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    small = ["model.backbone=resnet18_narrow", "device=cuda"]
    for name, expected in [("cifar10_simclr", True), ("cifar10_simsiam", True), ("cifar10_byol", True),
                           ("cifar10_nnclr", True), ("cifar10_mocov2", False)]:
        cfg = resolve(load_config(name, small))
        assert cfg.model.sync_bn is expected, name
        model = build_model(cfg, torch.device("cpu"), world=2)
        assert any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) is expected, name
        single = build_model(cfg, torch.device("cpu"), world=1)
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in single.modules())
    assert resolve(load_config("cifar10_simclr", small + ["model.sync_bn=false"])).model.sync_bn is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve(load_config("cifar10_simclr", ["device=cpu"])).model.sync_bn is False  # needs a GPU


# ---- linear protocols ----------------------------------------------------------------------------------------

def test_linear_protocol_standard_and_fast(monkeypatch):
    import sepp.eval.linear as lin

    calls = {}

    def fake(kind):
        def run(*args, **kwargs):
            calls[kind] = kwargs
            return {"top1": 1.0, "top5": None, "losses": [], "lr": kwargs.get("lr"), "epochs": kwargs.get("epochs")}
        return run

    monkeypatch.setattr(lin, "train_linear_augmented", fake("augmented"))
    monkeypatch.setattr(lin, "train_linear", fake("precomputed"))

    class DS:
        labels = __import__("numpy").array([0, 1, 1, 0])
        classes = ["a", "b"]

        def with_transform(self, t):
            return self

    feats = lambda backbone, ds: torch.zeros(4, 3)  # noqa: E731
    for data, milestones in (("cifar10", None), ("imagenet", (60, 80))):
        cfg = resolve(load_config("cifar10_mocov2", ["device=cpu", f"data.name={data}",
                                                     "eval.linear_protocol=standard"]))
        res = lin.linear_probe(nn.Identity(), cfg, DS(), DS(), torch.device("cpu"), feats)
        kw = calls.pop("augmented")
        assert res["protocol"] == "standard" and "precomputed" not in calls
        assert (kw["lr"], kw["epochs"], kw["batch_size"], kw["weight_decay"], kw["head_bn"], kw["milestones"]) \
            == (30.0, 100, 256, 0.0, False, milestones)
    cfg = resolve(load_config("cifar10_mocov2", ["device=cpu"]))
    assert cfg.eval.linear_protocol == "fast"
    res = lin.linear_probe(nn.Identity(), cfg, DS(), DS(), torch.device("cpu"), feats)
    assert res["protocol"] == "fast" and calls["precomputed"]["lr"] == pytest.approx(0.01)
    # the step schedule of main_lincls: x0.1 from epoch 60, x0.01 from epoch 80
    assert [lin.milestone_rate(1.0, e * 10, 10, (60, 80)) for e in (0, 59, 60, 79, 80, 99)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_standard_probe_has_a_plain_linear_head():
    from torch.utils.data import TensorDataset

    import sepp.eval.linear as lin

    class Labelled(TensorDataset):
        @property
        def labels(self):
            return self.tensors[1].numpy()

    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = (x[:, 0] > 0).long()
    train = Labelled(x, y)
    kw = {**lin.standard_protocol("imagenet"), "epochs": 2, "lr": 0.5}
    res = lin.train_linear_augmented(nn.Identity(), train, Labelled(x, y), num_classes=2, amp=False, **kw)
    assert res["top1"] > 60 and res["epochs"] == 2


# ---- the GPU experiment, smoke-run on the CPU -----------------------------------------------------------------

def test_gpu_experiment_smoke_runs_the_whole_path_on_cpu(cifar_root, tmp_path):
    """benchmarks/gpu_experiment.sh --smoke: calibration, planning, baseline, mining over every image of the
    subset, SePP, the step-matched baseline and kNN, with every file the GPU run writes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "SEPP_DATA": str(cifar_root),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_experiment.sh"), "--smoke"], env=env,
                          cwd=repo, capture_output=True, text=True, timeout=300)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["plan"]["smoke"] and res["plan"]["epochs"] == 1
    assert res["sepp"]["steps"] == res["baseline"]["steps"] > 0  # step-matched
    # the setting of the CPU's k-matched controls: enlarge mode, masked negatives, ~1 pair per image
    assert res["sepp"]["init"] == "baseline" and res["sepp"]["mode"] == "enlarge"
    assert not res["sepp"]["batch_positives"] and res["sepp"]["mask_negatives"]
    assert res["mining"]["num_images"] == 96 and 0 < res["mining"]["num_pairs"] <= 2 * 96  # every image of the subset
    assert 0 <= res["baseline"]["knn_top1"] <= 100 and 0 <= res["sepp"]["knn_top1"] <= 100
    for name in ("report.md", "curves.png", "pairs_gallery.png", "similarity_hist.png", "gpu_experiment.log"):
        assert (out / name).stat().st_size > 0, name
    assert "kNN top-1: baseline" in done.stdout and "SePP - baseline" in done.stdout
