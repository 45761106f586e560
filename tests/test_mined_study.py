"""The tools of the mined-pair study (issue 15): label-free pair rules, the k-matched DIAGNOSTIC controls,
effective precision, the neighbourhood-consistency signal, the continuation driver and the supervised
reference's start from an encoder."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from sepp.cli import main as cli
from sepp.data.pairs import Pairs, load_pairs
from sepp.errors import SeppError
from sepp.eval.knn import knn_eval
from sepp.methods.checkpoint import load_trained
from sepp.mining.stats import neighbourhood_consistency, shared_neighbours

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_mined(cifar_root, tmp_path_factory):
    """A 2-step SimCLR encoder on 64 images and its `sepp mine` file holding every image's top-3 list."""
    root = tmp_path_factory.mktemp("mined_study")
    cli(["pretrain", "--config", "demo",
         *tiny_overrides(cifar_root, root / "enc", method="simclr", subset=64, batch=32), "train.max_steps=2"])
    cli(["mine", "--checkpoint", str(root / "enc" / "last.pt"), "mine.k=3", "mine.threshold=-1",
         f"mine.out={root / 'mining'}"])
    return root / "enc" / "last.pt", root / "mining" / "pairs.npz"


def test_pair_rules_from_an_encoder_equal_those_from_its_mined_file(tiny_mined, cifar_root, tmp_path):
    """The two inputs of benchmarks/pair_rules.py (embed with the encoder, or read `sepp mine`'s top-k lists)
    give the same rows, and every row's numbers are consistent with its pairs."""
    rules = _benchmark("pair_rules")
    ckpt, pairs = tiny_mined
    common = ["--k", "3", "--root", str(cifar_root), "--no-flip"]
    rules.main(["--encoder", str(ckpt), "--out", str(tmp_path / "a"), *common])
    rules.main(["--mined", f"last={pairs}", "--out", str(tmp_path / "b"), *common])
    a = json.loads((tmp_path / "a" / "rules.json").read_text())
    b = json.loads((tmp_path / "b" / "rules.json").read_text())
    assert len(a) == len(b) > 10
    for x, y in zip(a, b):
        assert x["rule"] == y["rule"] and x["pairs"] == y["pairs"]
        for key in ("precision_report", "precision_choice", "consistency"):
            assert (x[key] is None and y[key] is None) or x[key] == pytest.approx(y[key], abs=1e-9)
        assert 0 <= x["coverage"] <= 1 and x["per_image"] == pytest.approx(x["pairs"] / 64)
    nn_all = next(r for r in a if r["rule"] == "nn_fraction f=1")
    assert nn_all["coverage"] == 1.0 and nn_all["pairs"] == 64
    # the encoder's strength: the kNN of its mining features equals the evaluation suite's kNN of its backbone
    method, cfg, _ = load_trained(ckpt, [f"data.root={cifar_root}"])
    assert [r["encoder_knn"] for r in a] == [pytest.approx(knn_eval(method.backbone, cfg, "cpu"), abs=1e-6)] * len(a)
    assert {r["encoder_knn"] for r in b} == {None}  # read from a pair file: nothing embedded
    assert (tmp_path / "a" / "rules.png").stat().st_size > 0


def test_pair_rules_compare_encoders_only_on_the_same_images(tiny_mined, cifar_root, tmp_path):
    """Two encoders trained on different subsets: their agreement is refused unless --subset gives both the
    same images; then every row counts pairs over those images."""
    rules = _benchmark("pair_rules")
    other = tmp_path / "enc96"
    cli(["pretrain", "--config", "demo",
         *tiny_overrides(cifar_root, other, method="simclr", subset=96, batch=32), "train.max_steps=1"])
    common = ["--k", "3", "--root", str(cifar_root), "--no-flip", "--encoder", str(tiny_mined[0]),
              "--encoder", str(other / "last.pt")]
    with pytest.raises(SeppError, match="--subset"):
        rules.main([*common, "--out", str(tmp_path / "a")])
    rules.main([*common, "--subset", "96", "--out", str(tmp_path / "b")])
    rows = json.loads((tmp_path / "b" / "rules.json").read_text())
    agree = [r for r in rows if r["rule"].startswith("agree top-3")]
    assert len(agree) == 1 and 0 < agree[0]["pairs"] <= 3 * 96
    assert all(r["per_image"] == pytest.approx(r["pairs"] / 96) for r in rows)


def test_shared_neighbours_and_consistency_by_hand():
    idx = np.array([[1, 2, 3], [0, 2, 3], [5, 6, 7], [-1, -1, -1]])
    assert shared_neighbours(idx, np.array([0, 0, 2]), np.array([1, 2, 3])).tolist() == [2, 0, 0]
    # pairs (0, 1): 2 of 3 shared; (0, 2): none -> mean 1/3
    assert neighbourhood_consistency(idx, np.array([0, 0]), np.array([1, 2])) == pytest.approx(1 / 3)
    assert neighbourhood_consistency(idx, np.array([], int), np.array([], int)) is None


def test_effective_precision_counts_symmetric_deduplicated_sets():
    controls = _benchmark("pair_controls")
    labels = np.array([0, 0, 1, 1])
    # (0, 1) and (1, 0) are one correct set entry each way; (0, 2) adds the wrong (0, 2) and (2, 0)
    assert controls.effective_precision(np.array([0, 1, 0]), np.array([1, 0, 2]), labels) == pytest.approx(0.5)
    # a one-way correct pair becomes two correct entries, a one-way wrong pair two wrong ones: 2 of 4
    assert controls.effective_precision(np.array([0, 2]), np.array([1, 0]), labels) == pytest.approx(0.5)
    assert controls.effective_precision(np.array([0]), np.array([1]), labels) == 1.0


def test_controls_keep_anchors_and_counts_and_fix_only_the_partners():
    controls = _benchmark("pair_controls")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 40)
    i = np.sort(rng.choice(200, 300))
    j = rng.choice(200, 300)
    j[j == i] = (j[j == i] + 1) % 200
    mined = Pairs(i, j, np.ones(300, np.float32), {"k": 3, "oracle": "none"}, "mined.npz")
    out = controls.controls(mined, labels, seed=1, encoder=None, cfg=None)
    correct = labels[i] == labels[j]
    assert 0 < correct.mean() < 1
    d = out["dropped"]
    assert d.i.tolist() == i[correct].tolist() and d.j.tolist() == j[correct].tolist()
    r = out["replaced"]
    assert r.i.tolist() == i.tolist() and r.j[correct].tolist() == j[correct].tolist()
    assert (labels[r.j[~correct]] != labels[i[~correct]]).all()
    o = out["oracle_random"]
    assert o.i.tolist() == i.tolist() and (labels[o.j] == labels[i]).all() and (o.j != i).all()
    p = out["oracle_at_p"]
    assert p.i.tolist() == i.tolist() and abs((labels[p.j] == labels[i]).mean() - correct.mean()) < 0.12
    for kind, pairs in out.items():
        assert pairs.meta["diagnostic"].startswith("DIAGNOSTIC") and pairs.meta["control"] == kind


def test_pair_rules_points_by_hand():
    rules = _benchmark("pair_rules")
    # 4 images; image 3's nearest neighbour is the most similar, image 0's the least
    idx = np.array([[1, 2], [2, 0], [1, 3], [2, 1]])
    sim = np.array([[0.5, 0.4], [0.7, 0.5], [0.8, 0.7], [0.9, 0.1]], np.float32)
    points = {name: (i.tolist(), j.tolist()) for name, i, j in rules.rule_points(idx, sim, 2)}
    assert points["nn_fraction f=0.5"] == ([2, 3], [1, 2])  # the two anchors most similar to their neighbour
    assert points["mutual k=1"] == ([1, 2], [2, 1])
    labels = np.array([0, 0, 1, 1])
    row = rules.score("x", np.array([2, 3]), np.array([1, 2]), labels, 4, np.array([False, False, True, False]),
                      idx, "enc")
    assert row["precision_choice"] == 0.0 and row["precision_report"] == 1.0 and row["coverage"] == 0.5


def test_label_headroom_starts_from_the_encoders_backbone(tiny_mined):
    headroom = _benchmark("label_headroom")
    from sepp.methods.checkpoint import load_checkpoint
    from sepp.models.backbones import build_backbone

    ckpt = load_checkpoint(tiny_mined[0])
    backbone, _ = build_backbone("resnet18_narrow", ckpt["config"]["model"]["cifar_stem"])
    headroom.init_backbone(backbone, str(tiny_mined[0]))
    state = ckpt["model"]
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[f"backbone.{key}"])


def test_continuation_trains_every_arm_from_one_encoder_and_refuses_mixed_settings(tiny_mined, cifar_root, tmp_path):
    cont = _benchmark("continuation")
    ckpt, pairs = tiny_mined
    tiny = tiny_overrides(cifar_root, tmp_path, method="simclr", subset=64, batch=32)
    arm = f"mined={pairs},sepp.mode=enlarge,sepp.batch_positives=false"
    common = [o for o in tiny if not o.startswith("out=")] + ["data.eval_subset=100", "eval.linear_epochs=1"]
    args = ["--encoder", str(ckpt), "--steps", "2", "--seeds", "0,1", "--arm", arm,
            "--out", str(tmp_path / "cont"), *common]
    assert cont.main(args) == 0
    result = json.loads((tmp_path / "cont" / "continuation.json").read_text())
    assert set(result["table"]) == {"baseline", "mined"}
    assert [r["steps"] for r in result["runs"]["mined"]] == [2, 2]
    assert result["runs"]["mined"][0]["num_pairs"] == len(load_pairs(pairs))
    assert result["table"]["mined"]["minus_baseline"]["knn_top1"]["n"] == 2
    assert "| mined |" in (tmp_path / "cont" / "continuation.md").read_text()
    changed = list(args)
    changed[changed.index("--steps") + 1] = "3"  # the same folders with another budget: refused, not mixed
    with pytest.raises(SeppError, match="other settings"):
        cont.main(changed)


def test_sepp_mine_pairs_per_image_keeps_the_most_similar_pairs_and_reports_consistency(tiny_mined, tmp_path):
    """`sepp mine mine.pairs_per_image=R` keeps exactly the pairs that select_pairs keeps from the full top-k
    lists (the brute-force-tested rule), records R, and mining.json carries the consistency signal."""
    from sepp.mining.pairs import select_pairs

    ckpt, full = tiny_mined
    lists = load_pairs(full)
    n = lists.meta["num_images"]
    idx, sim = lists.j.reshape(n, 3), lists.sim.reshape(n, 3)
    cli(["mine", "--checkpoint", str(ckpt), "mine.k=3", "mine.threshold=-1", "mine.pairs_per_image=0.5",
         f"mine.out={tmp_path}"])
    got = load_pairs(tmp_path / "pairs.npz")
    i, j, _ = select_pairs(idx, sim, 3, -1.0, per_image=0.5)
    assert got.i.tolist() == i.tolist() and got.j.tolist() == j.tolist()
    assert len(got) >= round(0.5 * n) and got.sim.min() >= np.sort(sim.ravel())[::-1][round(0.5 * n) - 1]
    assert got.meta["pairs_per_image"] == 0.5
    stats = json.loads((tmp_path / "mining.json").read_text())
    assert stats["consistency"] == pytest.approx(neighbourhood_consistency(idx, got.i, got.j))
    assert 0.0 <= stats["consistency"] <= 1.0


def test_break_even_precision_and_encoder_strength_by_hand(tmp_path):
    """benchmarks/break_even.py: the line through (77.9 %, -1.15) and (100 %, +1.22) crosses 0 at
    0.779 + 1.15 * 0.221 / 2.37 = 0.88624; per seed from paired differences; the precision-kNN line through
    three encoders on an exact line (precision = 0.2 + 0.01 kNN) reaches p* at kNN (p* - 0.2) / 0.01."""
    be = _benchmark("break_even")
    assert be.crossing(0.779, -1.15, 1.0, 1.22) == pytest.approx(0.88624, abs=1e-5)
    assert be.crossing(0.779, 1.0, 1.0, 0.5) is None  # the gain does not rise with precision
    assert be.crossing(0.779, -1.6, 1.0, -0.96) is None  # still a loss with every pair correct: no break-even
    runs = {"baseline": [{"seed": 0, "knn_top1": 50.0}, {"seed": 1, "knn_top1": 51.0}],
            "mined": [{"seed": 0, "knn_top1": 49.0}, {"seed": 1, "knn_top1": 49.0}],
            "oracle_random": [{"seed": 0, "knn_top1": 51.0}, {"seed": 1, "knn_top1": 53.0},
                              {"seed": 2, "knn_top1": 60.0}]}  # seed 2 has no baseline: left out
    controls = [{"file": "mined", "effective_precision": 0.8}, {"file": "oracle_random", "effective_precision": 1.0}]
    cont, ctrl = tmp_path / "c.json", tmp_path / "k.json"
    cont.write_text(json.dumps({"runs": runs}))
    ctrl.write_text(json.dumps(controls))
    rows = [{"encoder": f"e{k}", "encoder_knn": knn, "rule": "threshold t=0.9 (1/img)", "coverage": 0.3,
             "precision_report": 0.2 + 0.01 * knn, "consistency": 0.1 + 0.001 * knn} for k, knn in enumerate((40, 50, 60))]
    rows += [{"encoder": "e9", "encoder_knn": 99.0, "rule": "threshold t=0.9 (2/img)", "coverage": 0.5,
              "precision_report": 0.1, "consistency": 0.0},  # another operating point: not picked
             {"encoder": "mined_file", "encoder_knn": None, "rule": "threshold t=0.9 (1/img)", "coverage": 0.3,
              "precision_report": 0.5, "consistency": 0.0}]  # no kNN (read from a pair file): not picked
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(rows))
    rows += [{"encoder": "e0", "encoder_knn": 40.0, "rule": f"mutual k={k}", "coverage": 0.5,
              "precision_report": p, "consistency": c} for k, p, c in ((1, 0.9, 0.3), (2, 0.5, 0.2), (5, 0.7, 0.1))]
    rows.append({"encoder": "label_trained", "encoder_knn": 70.0, "rule": "threshold t=0.9 (1/img)", "coverage": 0.3,
                 "precision_report": 0.1, "consistency": 0.5})  # off the line, and --exclude'd
    rules.write_text(json.dumps(rows))
    be.main(["--study", f"E={cont},{ctrl}", "--rules", str(rules), "--out", str(tmp_path / "out"),
             "--exclude", "label_trained"])
    result = json.loads((tmp_path / "out" / "break_even.json").read_text())
    s = result["studies"]["E"]
    assert s["seeds"] == [0, 1]
    # means: mined -1.5, oracle +1.5 -> crossing at 0.9; seed 0: -1/+1 -> 0.9; seed 1: -2/+2 -> 0.9
    assert s["break_even"] == pytest.approx(0.9) and s["break_even_per_seed"] == pytest.approx([0.9, 0.9])
    fit = result["strength"]
    assert [p["encoder"] for p in fit["points"]] == ["e0", "e1", "e2"]
    assert fit["slope"] == pytest.approx(0.01) and fit["intercept"] == pytest.approx(0.2) and fit["r2"] == pytest.approx(1.0)
    assert s["knn_at_break_even"] == pytest.approx(70.0)
    assert fit["consistency_spearman"] == pytest.approx(1.0)
    # e0's four rules: consistency 0.14, 0.3, 0.2, 0.1 against precision 0.6, 0.9, 0.5, 0.7 -> ranks
    # (2, 4, 3, 1) vs (2, 4, 1, 3): Spearman 1 - 6 * (0 + 0 + 4 + 4) / (4 * 15) = 0.2
    assert fit["consistency_within_encoder"] == {"e0": {"rules": 4, "spearman": pytest.approx(0.2)}}
    assert (tmp_path / "out" / "break_even.png").stat().st_size > 0
