"""The machinery of controlled SePP experiments: multi-positive losses, false-negative masks, three-view
plans and loaders, oracle pair sources, step-counted schedules, seed statistics, and `sepp run` over seeds."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_overrides
from sepp.cli import main as cli
from sepp.config import load_config
from sepp.engine.setup import resolve
from sepp.data.device_loader import DeviceLoader
from sepp.data.loader import TwoViewDataset
from sepp.data.sampling import epoch_plan
from sepp.engine.experiment import _phase_cfg
from sepp.engine.setup import lr_schedule
from sepp.errors import SeppError
from sepp.eval.stats import paired_difference, summarize, t975
from sepp.methods.byol import BYOL
from sepp.methods.known import KnownPositives
from sepp.methods.losses import (byol_loss, info_nce, multi_positive_ce, negative_cosine, nt_xent,
                                 nt_xent_views, predictive_views)
from sepp.methods.mocov2 import MoCoV2
from sepp.methods.simclr import SimCLR
from sepp.methods.simsiam import SimSiam
from sepp.mining.oracle import nearest_same_class, random_partners
from sepp.data.pairs import load_pairs
from sepp.mining.pairs import select_pairs

pytestmark = pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")


def lse(xs):
    return math.log(sum(math.exp(x) for x in xs))


def dot(u, v):
    return sum(a * b for a, b in zip(u, v))


# ---- losses ------------------------------------------------------------------------------------------------

def test_multi_positive_ce_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.0, float("-inf")], [0.5, 0.0, 1.0, 2.0]])
    pos = torch.tensor([[True, True, False, False], [False, False, False, True]])
    row0 = ((-1 + lse([1, 2, 0])) + (-2 + lse([1, 2, 0]))) / 2
    row1 = -2 + lse([0.5, 0, 1, 2])
    assert abs(float(multi_positive_ce(logits, pos)) - (row0 + row1) / 2) < 1e-6


def test_nt_xent_views_two_views_is_nt_xent():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.allclose(nt_xent_views([z1, z2], 0.3), nt_xent(z1, z2, 0.3), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 3), st.integers(0, 1000), st.floats(0.1, 1.0), st.booleans())
def test_nt_xent_views_matches_brute_force(b, v, seed, temp, with_drop):
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(b, 3, generator=g) for _ in range(v)]
    drop = torch.rand(v * b, v * b, generator=g) < 0.3 if with_drop else None
    rows = [F.normalize(z, dim=1)[i].tolist() for z in views for i in range(b)]  # view-major
    total = 0.0
    for r in range(v * b):
        pos = [c for c in range(v * b) if c % b == r % b and c != r]
        denom = [c for c in range(v * b) if c != r and (c in pos or drop is None or not drop[r, c])]
        logits = {c: dot(rows[r], rows[c]) / temp for c in denom}
        total += sum(-logits[p] + lse(list(logits.values())) for p in pos) / len(pos)
    got = nt_xent_views(views, temp, drop=drop)
    assert abs(float(got) - total / (v * b)) < 1e-4


def test_info_nce_with_two_positives_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[[0.6, 0.8], [0.0, 1.0]]])     # two positives
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    mask = torch.tensor([[True, False]])
    # T = 1: positives 0.6 and 0; negatives 1 (masked) and -1.
    want = ((-0.6 + lse([0.6, 0, -1])) + (0 + lse([0.6, 0, -1]))) / 2
    assert abs(float(info_nce(q, k, queue, 1.0, mask)) - want) < 1e-6
    assert torch.allclose(info_nce(q, k[:, :1], queue, 0.5), info_nce(q, k[:, 0], queue, 0.5))


def test_predictive_views_two_views_is_the_symmetric_loss():
    g = torch.Generator().manual_seed(1)
    p1, p2, z1, z2 = (torch.randn(4, 3, generator=g) for _ in range(4))
    assert torch.allclose(2 * predictive_views([p1, p2], [z1, z2], byol_loss), byol_loss(p1, z2) + byol_loss(p2, z1))
    three = predictive_views([p1, p2, p2], [z1, z2, z1], negative_cosine)
    terms = [negative_cosine(a, b) for a, b in [(p1, z2), (p1, z1), (p2, z1), (p2, z1), (p2, z1), (p2, z2)]]
    assert torch.allclose(three, torch.stack(terms).mean())


# ---- false negatives ------------------------------------------------------------------------------------------

def test_known_positives_mask_against_brute_force():
    known = KnownPositives()
    assert known.mask(torch.tensor([0]), torch.tensor([0])) is None  # off until set
    pairs = [(0, 3), (5, 2), (4, 7), (0, 9)]
    known.set(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]), 10)
    a, b = torch.tensor([0, 2, 4, 9, 1, 3]), torch.tensor([3, 2, 6, 9, -1, 0, 1, 7])
    partners = {x: {x} for x in range(10)}
    for x, y in pairs:
        partners[x].add(y)
        partners[y].add(x)
    want = [[int(c) >= 0 and int(c) in partners[int(r)] for c in b] for r in a]
    assert known.mask(a, b).tolist() == want
    with pytest.raises(SeppError):
        known.set(torch.tensor([0]), torch.tensor([10]), 10)


def tiny_backbone(in_dim=12, out_dim=6):
    return nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim))


def test_simclr_mask_never_counts_same_image_or_partner_views_as_negatives():
    torch.manual_seed(0)
    model = SimCLR(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, temperature=0.5)
    pairs = [(0, 3), (2, 5)]
    model.set_known_positives(torch.tensor([0, 2]), torch.tensor([3, 5]), 8)
    # an enlarged epoch's batch: image 0 twice (self-pair and pair (0, 3)), image 3 as a partner view
    ids1, ids2 = torch.tensor([0, 0, 2, 6]), torch.tensor([0, 3, 2, 6])
    x1, x2 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    ids = torch.cat([ids1, ids2])
    related = {(a, b) for a, b in pairs} | {(b, a) for a, b in pairs}
    brute = [[r != c and (c % 4 != r % 4) and (int(ids[r]) == int(ids[c]) or (int(ids[r]), int(ids[c])) in related)
              for c in range(8)] for r in range(8)]
    drop = model.known.mask(ids, ids) & ~torch.eye(8, dtype=torch.bool)
    positives = torch.tensor([[c != r and c % 4 == r % 4 for c in range(8)] for r in range(8)])
    assert (drop & ~positives).tolist() == brute
    with torch.no_grad():
        z = [F.normalize(model.projector(model.backbone(x)), dim=1) for x in (x1, x2)]
    rows = torch.cat(z).tolist()
    manual = 0.0
    for r in range(8):
        pos = (r + 4) % 8
        keep = [c for c in range(8) if c != r and (c == pos or not brute[r][c])]
        manual += (-dot(rows[r], rows[pos]) / 0.5 + lse([dot(rows[r], rows[c]) / 0.5 for c in keep])) / 8
    out = model(x1, x2, ids1, ids2)
    assert abs(out["loss"].item() - manual) < 1e-5 and float(out["masked_negatives"]) > 0


def test_simclr_batch_positives_count_same_image_and_partner_views_as_positives():
    torch.manual_seed(1)
    model = SimCLR(tiny_backbone(), 6, proj_hidden_dim=8, proj_dim=4, temperature=0.5)
    model.set_known_positives(torch.tensor([0, 2]), torch.tensor([3, 5]), 8, positives=True)
    ids1, ids2 = torch.tensor([0, 0, 2, 6]), torch.tensor([0, 3, 5, 6])
    x1, x2 = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    ids = torch.cat([ids1, ids2]).tolist()
    related = {(0, 3), (3, 0), (2, 5), (5, 2)}
    with torch.no_grad():
        z = [F.normalize(model.projector(model.backbone(x)), dim=1) for x in (x1, x2)]
    rows = torch.cat(z).tolist()
    manual = 0.0
    for r in range(8):  # positives: the other view of the sample, and every view of the same image or a partner
        pos = [c for c in range(8) if c != r and (c % 4 == r % 4 or ids[c] == ids[r] or (ids[r], ids[c]) in related)]
        denom = lse([dot(rows[r], rows[c]) / 0.5 for c in range(8) if c != r])
        manual += sum(-dot(rows[r], rows[p]) / 0.5 + denom for p in pos) / len(pos) / 8
    out = model(x1, x2, ids1, ids2)
    assert abs(out["loss"].item() - manual) < 1e-5
    assert float(out["known_positives"]) > 0 and "masked_negatives" not in out


def test_info_nce_queue_positives_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    k = torch.tensor([[0.6, 0.8]])
    queue = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[True, False, False]])   # queue entry 0 holds a known partner's key
    # T = 1: positives 0.6 (own key) and 1 (partner key), negatives -1 and 0; all four in the denominator
    den = lse([0.6, 1.0, -1.0, 0.0])
    want = ((-0.6 + den) + (-1.0 + den)) / 2
    assert abs(float(info_nce(q, k, queue, 1.0, pos_mask=pos)) - want) < 1e-6
    none = torch.zeros_like(pos)
    assert torch.allclose(info_nce(q, k, queue, 0.3, pos_mask=none), info_nce(q, k, queue, 0.3))


def test_batch_positives_arms_without_pairs_only_mask(tmp_path):
    cfg = load_config("demo", ["sepp.batch_positives=true"])
    base = _phase_cfg(cfg, tmp_path / "baseline", 1)
    assert not base.sepp.batch_positives and base.sepp.mask_negatives
    arm = _phase_cfg(cfg, tmp_path / "sepp", 1, **{"sepp.pairs": "pairs.npz"})
    assert arm.sepp.batch_positives
    with pytest.raises(SeppError, match="batch_positives"):
        resolve(load_config("demo", ["method=byol", "sepp.batch_positives=true", "device=cpu"]))


@pytest.mark.parametrize("cls,kw", [(SimCLR, {"proj_hidden_dim": 8, "proj_dim": 4}),
                                    (MoCoV2, {"proj_hidden_dim": 8, "proj_dim": 4, "queue_size": 16, "bn": "none",
                                              "symmetric": True}),
                                    (BYOL, {"proj_hidden_dim": 8, "proj_dim": 4, "pred_hidden_dim": 8}),
                                    (SimSiam, {"proj_hidden_dim": 8, "proj_dim": 8, "pred_hidden_dim": 4})])
def test_every_method_takes_a_third_view_and_it_changes_the_loss(cls, kw):
    torch.manual_seed(0)
    model = cls(tiny_backbone(), 6, **kw)
    x1, x2, x3 = (torch.randn(6, 3, 2, 2) for _ in range(3))
    ids = torch.arange(6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    two = model(x1, x2, ids, ids)["loss"]
    model.load_state_dict(state)
    three = model(x1, x2, ids, ids, x3, (ids + 1) % 6)["loss"]
    three.backward()
    assert torch.isfinite(three) and abs(three.item() - two.item()) > 1e-6
    assert all(p.grad is not None for p in model.backbone.parameters())


# ---- plans and loaders ------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(0, 60), st.integers(0, 5))
def test_multi_plan_keeps_every_anchor_and_adds_a_partner(n, m, epoch):
    rng = np.random.default_rng(m)
    i = rng.integers(0, n, m)
    j = (i + rng.integers(1, n, m)) % n
    ids1, ids2, ids3 = epoch_plan(n, epoch, 3, pairs=(i, j), mode="multi", views=3)
    assert sorted(ids1.tolist()) == list(range(n)) and np.array_equal(ids1, ids2)
    partners = {a: set() for a in range(n)}
    for a, b in zip(i.tolist(), j.tolist()):
        partners[a].add(b)
    for a, c in zip(ids1.tolist(), ids3.tolist()):
        assert c in partners[a] if partners[a] else c == a
    plain = epoch_plan(n, epoch, 3, views=3)
    assert np.array_equal(plain[0], plain[2]) and np.array_equal(plain[0], plain[1])


class _Aug:
    def __call__(self, x, generator=None):
        return x.float()


def test_three_view_loaders_yield_the_plan():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    pairs = (np.array([0, 1, 2]), np.array([5, 6, 7]))
    loader = DeviceLoader(images, _Aug(), _Aug(), batch_size=5, seed=0, device="cpu", pairs=pairs, mode="multi",
                          views=3)
    loader.set_epoch(1)
    plan = epoch_plan(10, 1, 0, pairs=pairs, mode="multi", views=3)
    batches = list(loader)
    got3 = torch.cat([b[5] for b in batches])
    assert all(len(b) == 6 for b in batches) and got3.tolist() == plan[2].tolist()
    assert torch.equal(torch.cat([b[4][:, 0, 0, 0] for b in batches]).long(), got3)

    class Base:
        def load_image(self, i):
            return int(i) * 10

        def __len__(self):
            return 10

    ds = TwoViewDataset(Base(), lambda v: v + 1, lambda v: v + 2)
    assert ds[(3, 3, 5)] == (31, 32, 3, 3, 52, 5)
    assert ds[(3, 4)] == (31, 42, 3, 4)


# ---- oracle pairs and rank selection -------------------------------------------------------------------------

def test_nearest_same_class_takes_the_first_correct_candidates():
    labels = np.array([0, 1, 0, 0, 1])
    idx = np.array([[1, 2, 3, 4], [0, 2, 4, 3], [3, 0, 1, 4], [4, 1, 0, 2], [1, 0, 2, 3]])
    sim = -np.arange(20, dtype=np.float32).reshape(5, 4)
    i, j, s = nearest_same_class(idx, sim, labels, k=1)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 2), (1, 4), (2, 3), (3, 0), (4, 1)]
    assert s.tolist() == [-1, -6, -8, -14, -16]
    i, j, _ = nearest_same_class(idx, sim, labels, k=2)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 3), (1, 4), (2, 3), (2, 0), (3, 0), (3, 2), (4, 1)]


@pytest.mark.parametrize("precision", [0.0, 0.3, 1.0])
def test_random_partners_have_the_asked_precision(precision):
    labels = np.repeat(np.arange(5), 200)
    i, j = random_partners(labels, k=4, precision=precision, seed=1)
    assert len(i) == 4000 and np.array_equal(np.bincount(i), np.full(1000, 4)) and not (i == j).any()
    assert abs((labels[i] == labels[j]).mean() - precision) < 0.03
    again = random_partners(labels, k=4, precision=precision, seed=1)
    assert np.array_equal(again[1], j)
    with pytest.raises(SeppError):
        random_partners(None, 1, 1.0)


def test_select_pairs_rank_from_skips_the_nearest():
    idx = np.array([[1, 2, 3], [2, 0, 3]])
    sim = np.array([[0.9, 0.8, 0.7], [0.9, 0.5, 0.4]], dtype=np.float32)
    i, j, _ = select_pairs(idx, sim, k=3, threshold=0.45, rank_from=2)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 2), (0, 3), (1, 0)]


# ---- schedules, statistics ------------------------------------------------------------------------------------

def test_matched_arms_share_the_learning_rate_at_every_step():
    cfg = resolve(load_config("demo", ["device=cpu", "train.warmup_epochs=1", "train.epochs=4"]))
    n, per_epoch_plain, pairs = 4000, 4000 // 128, 4000
    sepp_cfg = _phase_cfg(cfg, cfg.out, 4)
    per_epoch_sepp = (n + pairs) // 128  # an enlarged epoch
    total = 4 * per_epoch_sepp
    base_cfg = _phase_cfg(cfg, cfg.out, math.ceil(total / per_epoch_plain), **{"train.max_steps": total})
    a = lr_schedule(sepp_cfg, n, per_epoch_sepp)
    b = lr_schedule(base_cfg, n, per_epoch_plain)
    assert len(a) == len(b) == total and a == b
    peak = max(a)
    assert a.index(peak) == per_epoch_plain - 1  # warm-up is one plain epoch, not one enlarged epoch


def test_paired_difference_by_hand():
    d = paired_difference([40.0, 42.0, 41.0], [38.0, 39.0, 41.0])  # differences 2, 3, 0
    assert d["mean"] == pytest.approx(5 / 3) and d["std"] == pytest.approx(math.sqrt(7 / 3))
    half = 4.303 * math.sqrt(7 / 3) / math.sqrt(3)
    assert d["ci95"] == pytest.approx([5 / 3 - half, 5 / 3 + half]) and d["excludes_zero"] is False
    assert paired_difference([1.0], [0.0])["ci95"] is None
    assert summarize([None, 2.0, 4.0])["mean"] == 3.0 and t975(2) == 4.303


# ---- `sepp run` over seeds with oracle pairs in multi mode --------------------------------------------------------

def test_sepp_run_over_seeds_with_oracle_pairs_and_control(cifar_root, tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["run", "--config", "demo", *tiny_overrides(cifar_root, out, method="simclr", subset=80, batch=20),
            "data.eval_subset=100", "run.baseline_epochs=1", "run.sepp_epochs=1", "eval.linear_epochs=2",
            "mine.oracle=random", "mine.k=2", "mine.oracle_precision=0.5", "sepp.mode=multi",
            "sepp.mask_negatives=true", "run.seeds=[3,4]", "train.knn_every=1"]
    assert cli(args) == 0
    text = (out / "results.json").read_text()
    results = json.loads(text)
    assert text.splitlines()[1].strip().startswith('"diagnostic": "DIAGNOSTIC')
    assert (out / "report.md").read_text().startswith("> **DIAGNOSTIC")
    mining = (out / "mining" / "mining.json").read_text()
    assert mining.splitlines()[1].strip().startswith('"diagnostic": "DIAGNOSTIC')
    meta = load_pairs(out / "mining" / "pairs.npz").meta
    assert meta["oracle"] == "random" and meta["oracle_precision"] == 0.5
    assert results["seeds"] == [3, 4]
    for arm, views in (("baseline", 2), ("control", 3), ("sepp", 3)):
        r = results[arm]
        assert [x["seed"] for x in r["runs"]] == [3, 4] and r["knn"]["n"] == 2 and r["views"] == views
        assert r["images_forwarded"] == r["steps"] * 20 * views
        assert (out / "seed_3" / arm / "last.pt").exists()
    assert results["baseline"]["steps"] == results["sepp"]["steps"] == results["control"]["steps"]
    diff = results["difference"]["sepp-baseline"]["knn"]
    want = [s["knn_top1"] - b["knn_top1"] for s, b in zip(results["sepp"]["runs"], results["baseline"]["runs"])]
    assert diff["values"] == pytest.approx(want) and len(diff["ci95"]) == 2
    table = capsys.readouterr().out
    assert "DIAGNOSTIC" in table and "SePP - control" in table and "95 % CI" in table
    assert (out / "curves.png").stat().st_size > 1000


def test_precision_sweep_runs_end_to_end(cifar_root, tmp_path):
    """benchmarks/precision_sweep.py on a tiny budget: two oracle precisions and the mined point, two seeds,
    the baseline trained once and shared; writes its table, JSON and picture."""
    import importlib.util
    from pathlib import Path

    from sepp.engine.trainer import pretrain

    enc = tmp_path / "enc"
    pretrain(load_config("demo", tiny_overrides(cifar_root, enc, method="simclr", subset=80, batch=20)),
             progress=False)
    spec = importlib.util.spec_from_file_location(
        "precision_sweep", Path(__file__).resolve().parents[1] / "benchmarks" / "precision_sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    out = tmp_path / "sweep"
    assert sweep.main(["--encoder", str(enc / "last.pt"), "--out", str(out), "--precisions", "0.0,1.0",
                       "--seeds", "0,1", *tiny_overrides(cifar_root, out, method="simclr", subset=80, batch=20),
                       "data.eval_subset=100", "eval.linear_epochs=2", "sepp.mode=substitute", "sepp.p=1.0",
                       "run.sepp_epochs=1", "mine.k=2"]) == 0
    result = json.loads((out / "precision_sweep.json").read_text())
    assert set(result["points"]) == {"0.0", "1.0", "mined"}
    assert result["points"]["1.0"]["precision"] == 1.0 and result["points"]["0.0"]["precision"] == 0.0
    assert (out / "oracle_p1.0" / "seed_1" / "baseline").is_symlink()  # trained once, shared
    same = [result["points"][p]["baseline"]["knn"]["values"] for p in result["points"]]
    assert same[0] == same[1] == same[2]
    assert "oracle, P = 1.0" in (out / "precision_sweep.md").read_text()
    # the oracle points say DIAGNOSTIC in every output; each point is described by its pair file
    assert result["diagnostic"].startswith("DIAGNOSTIC") and "diagnostic" not in result["points"]["mined"]
    assert result["points"]["0.0"]["diagnostic"].startswith("DIAGNOSTIC") and result["points"]["0.0"]["k"] == 2
    assert (out / "precision_sweep.md").read_text().startswith("> **DIAGNOSTIC")
    assert load_pairs(out / "oracle_p0.0" / "mining" / "pairs.npz").meta["oracle_precision"] == 0.0
    assert (out / "precision_gain.png").stat().st_size > 1000



def _load_benchmark(name: str):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_headroom_learns_the_labels_and_writes_its_table(cifar_root, tmp_path):
    """benchmarks/label_headroom.py: the supervised reference really fits the labels of the images it trains
    on (well above chance after 60 steps) and writes its DIAGNOSTIC JSON and table."""
    import torch

    from sepp.data.datasets import build_dataset
    from sepp.data.recipes import mean_std
    from sepp.data.transforms import uint8_normalizer
    from sepp.engine.setup import resolve

    headroom = _load_benchmark("label_headroom")
    overrides = [*tiny_overrides(cifar_root, tmp_path, method="simclr", subset=40, batch=20),
                 "train.warmup_epochs=0"]
    cfg = resolve(load_config("demo", overrides))
    train = build_dataset(cfg.data, split=cfg.data.split)
    x = uint8_normalizer(*mean_std(cfg.data.name))(train.uint8_images().float() / 255)
    y = torch.as_tensor(train.labels)
    accuracy = {}
    for steps in (0, 60):
        model = headroom.train_supervised(cfg, steps=steps, seed=0, device=torch.device("cpu")).eval()
        with torch.no_grad():
            accuracy[steps] = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy[60] > accuracy[0] + 0.2  # chance is 0.1; measured 0.375 after 60 steps

    out = tmp_path / "headroom"
    result = headroom.main(["--steps", "2", "--seeds", "0,1", "--out", str(out), *overrides,
                            "data.eval_subset=100", "eval.linear_epochs=1"])
    assert set(result["steps"]) == {2} and len(result["steps"][2]["runs"]) == 2
    assert json.loads((out / "label_headroom.json").read_text())["diagnostic"].startswith("supervised")
    assert (out / "label_headroom.md").read_text().startswith("DIAGNOSTIC")


def test_label_headroom_keeps_the_runs_it_finished_when_stopped(cifar_root, tmp_path, monkeypatch):
    """A long supervised reference stopped during its second seed keeps the first seed's numbers on disk."""
    headroom = _load_benchmark("label_headroom")
    calls = []

    def evaluate(backbone, cfg, device):
        calls.append(cfg.seed)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"knn_top1": 12.5, "linear_top1": 20.0}

    monkeypatch.setattr(headroom, "evaluate", evaluate)
    overrides = [*tiny_overrides(cifar_root, tmp_path, method="simclr", subset=40, batch=20), "train.warmup_epochs=0"]
    out = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        headroom.main(["--steps", "1", "--seeds", "3,4", "--out", str(out), *overrides])
    kept = json.loads((out / "label_headroom.json").read_text())["steps"]["1"]
    assert calls == [3, 4] and [r["seed"] for r in kept["runs"]] == [3]
    assert kept["knn"] == {"mean": 12.5, "std": None, "n": 1, "values": [12.5]}
    assert "| 1 | 12.50" in (out / "label_headroom.md").read_text()
