"""The evaluation suite beyond kNN/linear: semi-supervised fine-tuning, linear transfer (Ericsson et al.),
embedding pictures, and mining with any encoder file -- math checks on small tensors, then real CIFAR-10 /
Imagenette runs at CPU scale on the shared short NNCLR pretraining (tests/nnclr_run.py)."""
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nnclr_run import SUBSET, USES_RUN, pretrained_nnclr
from sepp.errors import SeppError
from sepp.eval.finetune import finetune, finetune_settings, label_list_subset, label_subset
from sepp.eval.transfer import c_grid, default_metric, fit_logistic, scores, select_and_fit

# the read-only Imagenette2 copy of the development machines (../shared/data/imagenette2, or $SEPP_SHARED/...)
SHARED_DATA = Path(os.environ.get("SEPP_SHARED", Path(__file__).resolve().parents[2] / "shared" / "data"))
IMAGENETTE_TAR = SHARED_DATA / "imagenette2" / "imagenette2-224.tar"
# the shared 50k-image SimCLR encoder (../shared/encoders/README.md: kNN 58.97; its rebuild command is there)
STRONG_ENCODER = SHARED_DATA.parent / "encoders" / "simclr_narrow_cifar10_50k_10ep.pt"
STRONG_ENCODER_SHA256 = "ad42f137c425777f0477b8c6e8e09d464b5af3c88c12b5ec1454f4b51c19c47a"


# ---- fine-tuning: labelled subsets and the protocol ---------------------------------------------------------

def test_label_subset_is_class_balanced_seeded_and_skips_unknown_labels():
    labels = np.array([0] * 100 + [1] * 50 + [2] * 10 + [-1] * 40)
    idx = label_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[idx]).tolist() == [10, 5, 1] and (np.diff(idx) > 0).all()
    assert np.array_equal(idx, label_subset(labels, 0.1, seed=3))
    assert not np.array_equal(idx, label_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[label_subset(labels, 0.01)]).tolist() == [1, 1, 1]  # at least one per class
    with pytest.raises(SeppError, match="label_fraction"):
        label_subset(labels, 0.0)


def test_label_list_matches_simclr_file_names(tmp_path):
    paths = [f"/data/imagenet/train/n0{c}/n0{c}_{i}.JPEG" for c in range(3) for i in range(4)]
    (tmp_path / "1percent.txt").write_text("n02_3.JPEG\nn00_1.JPEG\n\n")
    assert label_list_subset(paths, tmp_path / "1percent.txt").tolist() == [1, 11]
    (tmp_path / "bad.txt").write_text("n09_1.JPEG\n")
    with pytest.raises(SeppError, match="not in the training split"):
        label_list_subset(paths, tmp_path / "bad.txt")


def test_finetune_settings_follow_simclr_imagenet_values():
    assert finetune_settings("imagenet", 0.01) == (0.05, 60) and finetune_settings("imagenet", 0.1) == (0.05, 30)
    assert finetune_settings("cifar10", 0.1, lr=0.2, epochs=5) == (0.2, 5)


# ---- transfer: the logistic regression ----------------------------------------------------------------------

def _blobs(n=300, d=5, k=3, seed=0, spread=1.0):
    g = np.random.default_rng(seed)
    centres = g.normal(size=(k, d)) * 3
    y = g.integers(0, k, n)
    return torch.tensor(centres[y] + spread * g.normal(size=(n, d))), torch.tensor(y)


def test_logistic_regression_solves_the_penalised_objective():
    x, y = _blobs()
    C = 0.05
    w, b = fit_logistic(x, y, 3, C)
    # stationarity of C * sum_i CE_i + ||W||^2 / 2: C * sum_i (p_i - onehot_i) x_i^T + W = 0, sum_i (p - 1) = 0
    p = torch.softmax(x @ w.t() + b, 1) - torch.nn.functional.one_hot(y, 3).double()
    assert (C * p.t() @ x + w).abs().max() < 1e-4 and w.abs().max() > 0.3  # |W| is ~0.6: a real solution
    assert p.sum(0).abs().max() < 1e-4
    from sklearn.linear_model import LogisticRegression  # a dev dependency: its absence must fail, not skip

    ref = LogisticRegression(C=C, tol=1e-10, max_iter=10000).fit(x.numpy(), y.numpy())
    assert np.allclose(w.numpy(), ref.coef_, atol=1e-4) and np.allclose(b.numpy(), ref.intercept_, atol=1e-4)


def test_scores_and_metric_conventions():
    logits = torch.eye(3)[[0, 0, 0, 1, 2, 0]]  # predictions 0 0 0 1 2 0
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    s = scores(logits, y, 4)  # class 3 absent: left out of the per-class mean
    assert s["top1"] == pytest.approx(500 / 6) and s["mean_per_class"] == pytest.approx(100 * (1 + 1 + 0.5) / 3)
    assert default_metric("imagefolder", "/data/Aircraft") == "mean_per_class"
    assert default_metric("imagenette", "/data") == default_metric("imagefolder", "/x/dtd") == "top1"
    assert c_grid()[0] == pytest.approx(1e-5) and c_grid()[-1] == pytest.approx(1e6) and len(c_grid()) == 45


def test_penalty_is_chosen_on_held_out_rows():
    x, y = _blobs(n=400, d=20, spread=4.0)
    train, test = slice(0, 300), slice(300, 400)
    grid = c_grid(1e-6, 1e2, 9)
    res = select_and_fit(x[train], y[train], x[test], y[test], 3, grid, "top1", 0.2, seed=0)
    assert res["C"] in grid and res["val_curve"][res["C"]] == max(res["val_curve"].values())
    assert res["val_curve"][grid[0]] < res["val_curve"][res["C"]]  # C = 1e-6 predicts one class
    assert res["top1"] > 80


# ---- embedding pictures -------------------------------------------------------------------------------------

def _loo_1nn(xy, y):
    d = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return float((y[d.argmin(1)] == y).mean())


def test_embed_plot_separates_clustered_features_and_not_random_ones(tmp_path):
    from sepp.eval.embed_plot import balanced_sample, embed_plot

    x, y = _blobs(n=400, d=64, k=4, seed=1, spread=0.5)
    noise = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))
    res = embed_plot({"baseline": noise, "SePP": x}, y.numpy(), ["a", "b", "c", "d"], tmp_path / "e.png",
                     algorithm="tsne", max_points=200)
    assert (tmp_path / "e.png").stat().st_size > 10_000 and res["algorithm"] == "tsne"
    assert np.bincount(y.numpy()[res["indices"]]).tolist() == [50, 50, 50, 50]
    yy = y.numpy()[res["indices"]]
    assert _loo_1nn(res["coords"]["SePP"], yy) > 0.95 and _loo_1nn(res["coords"]["baseline"], yy) < 0.5
    assert len(balanced_sample(np.array([0] * 10 + [1] * 2), 6)) == 6


def test_embed_plot_names_the_missing_package(monkeypatch):
    import sepp.eval.embed_plot as ep

    monkeypatch.setattr(ep, "_available", lambda name: False)
    with pytest.raises(SeppError, match="pip install"):
        ep.resolve_algorithm("auto")
    with pytest.raises(SeppError, match="umap-learn"):
        ep.resolve_algorithm("umap")


# ---- mining with an encoder file ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet18_narrow"])
def test_architecture_is_read_off_state_dict_keys(arch):
    from sepp.mining.encoder import infer_arch
    from sepp.models.backbones import torchvision_resnet

    for stem in (False, True):
        assert infer_arch(torchvision_resnet(arch, stem).state_dict()) == (arch, stem)


# ---- real data: the shared NNCLR run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run(cifar_root, tmp_path_factory):
    return pretrained_nnclr(cifar_root, tmp_path_factory)


@pytest.fixture(scope="module")
def strong_encoder() -> Path:
    """The shared SimCLR encoder trained on all 50,000 CIFAR-10 images: the downstream-quality tests need an
    encoder clearly better than random, which a CPU-test-sized pretraining is not (a 300-step NNCLR run
    fine-tunes and transfers within a point of random weights on this JPEG copy)."""
    from sepp.methods.checkpoint import file_hash

    if not STRONG_ENCODER.is_file():
        pytest.fail(f"shared encoder not found at {STRONG_ENCODER}; set SEPP_SHARED to the data folder beside "
                    "encoders/, or rebuild it with the command in that folder's README.md")
    assert file_hash(STRONG_ENCODER, 64) == STRONG_ENCODER_SHA256, "the shared encoder file changed"
    return STRONG_ENCODER


@pytest.fixture(scope="module")
def imagenette_root(tmp_path_factory) -> Path:
    """The first 100 training and 50 validation images of every Imagenette2 class, extracted from the shared
    tar into ``<root>/imagenette2/{train,val}/<wnid>/`` (the layout ``data.name=imagenette`` reads)."""
    if not IMAGENETTE_TAR.is_file():
        pytest.fail(f"Imagenette2 not found at {IMAGENETTE_TAR}; set SEPP_SHARED to the folder holding imagenette2/")
    root = tmp_path_factory.mktemp("imagenette")
    quota, taken = {"train": 100, "val": 50}, {}
    with tarfile.open(IMAGENETTE_TAR) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and taken.get(tuple(parts[:2]), 0) < quota.get(parts[0], 0):
                taken[tuple(parts[:2])] = taken.get(tuple(parts[:2]), 0) + 1
                tar.extract(member, root / "imagenette2", filter="data")
    return root


def _scratch_backbone(cfg, seed=1):
    from sepp.models.backbones import build_backbone

    torch.manual_seed(seed)
    return build_backbone(cfg.model.backbone, bool(cfg.model.cifar_stem))[0]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_finetuning_on_10_percent_beats_training_from_scratch(strong_encoder, cifar_root):
    """SimCLR's protocol (Nesterov SGD, no weight decay, crop + flip) on a class-balanced 10 % of the labels:
    the pretrained encoder beats the same network from random weights after the same optimizer steps."""
    from sepp.data.transforms import linear_train_transform
    from sepp.methods.checkpoint import load_trained
    from sepp.eval.data import eval_data, eval_input

    method, cfg, _ = load_trained(strong_encoder, ["device=cpu", "data.workers=0", f"data.root={cifar_root}"])
    train = eval_data(cfg, "train", SUBSET)
    idx = label_subset(train.labels, 0.1, seed=0)
    assert len(idx) == SUBSET // 10
    aug = torch.utils.data.Subset(train.with_transform(linear_train_transform(32, "cifar10")), idx.tolist())
    test_data, normalize = eval_input(eval_data(cfg, "test", 1000), 32, "cifar10")
    common = dict(epochs=3, lr=0.05, batch_size=64, normalize=normalize, seed=0)  # 18 steps: the encoder is strong
    pre = finetune(method.backbone, aug, test_data, 10, **common)
    base = finetune(_scratch_backbone(cfg), aug, test_data, 10, **common)
    assert pre["steps"] == base["steps"] == 3 * (len(idx) // 64)
    print(f"fine-tune 10 %: pretrained {pre['top1']:.1f}, from scratch {base['top1']:.1f}")
    assert pre["top1"] > base["top1"] + 3.0, (pre["top1"], base["top1"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
@USES_RUN
def test_finetune_command_stores_the_labelled_subset(run, cifar_root, tmp_path):
    from sepp.cli import main
    from sepp.data.datasets import build_dataset, subset_indices

    out = tmp_path / "ft.json"
    assert main(["eval", "finetune", "--checkpoint", str(run["checkpoint"]), "--out", str(out), "device=cpu",
                 f"data.root={cifar_root}", "data.workers=0", "eval.label_fraction=0.01",
                 "eval.finetune_max_steps=2", "eval.finetune_batch_size=16", "data.eval_subset=100"]) == 0
    r = json.loads(out.read_text())
    assert r["num_labels"] == len(r["label_indices"]) == 40 and r["steps"] == 2 and r["epochs"] == 60
    assert r["label_seed"] == 0 and 0 <= r["finetune_top1"] <= 100 and r["lr"] == pytest.approx(0.05 * 16 / 256)
    full = build_dataset({"name": "cifar10", "root": str(cifar_root)}, split="train")
    sub = subset_indices(len(full), SUBSET, full.labels)  # indices are positions in the full split
    assert set(r["label_indices"]) <= set(sub.tolist())
    assert np.bincount(full.labels[r["label_indices"]]).tolist() == [4] * 10


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_transfer_to_imagenette_beats_a_random_network(strong_encoder, imagenette_root, tmp_path):
    """CIFAR-10-pretrained encoder, frozen, on Imagenette (resized to its 32 px): the logistic regression on
    its features beats the same on a randomly initialised network's features."""
    from sepp.cli import main
    from sepp.methods.checkpoint import load_trained
    from sepp.eval.transfer import transfer_features

    overrides = ["device=cpu", "transfer.data.name=imagenette", f"transfer.data.root={imagenette_root}",
                 "transfer.c_steps=6"]
    out = tmp_path / "tr.json"
    assert main(["eval", "transfer", "--checkpoint", str(strong_encoder), "--out", str(out), *overrides]) == 0
    r = json.loads(out.read_text())
    assert (r["num_train"], r["num_test"], r["test_split"], r["metric"]) == (1000, 500, "val", "top1")
    assert r["C"] in c_grid(1e-5, 1e6, 6) and r["score"] == r["top1"] == r["transfer_score"]
    _, cfg, _ = load_trained(strong_encoder, overrides)
    f = transfer_features(_scratch_backbone(cfg), cfg, torch.device("cpu"))[:4]
    rand = select_and_fit(*(t.double() if t.is_floating_point() else t for t in f), 10, c_grid(1e-5, 1e6, 6))
    print(f"transfer to Imagenette: pretrained {r['top1']:.1f}, random network {rand['top1']:.1f}")
    assert r["top1"] > rand["top1"] + 3.0, (r["top1"], rand["top1"])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
@USES_RUN
def test_mining_with_exported_state_dict_gives_the_checkpoints_pairs(run, cifar_root, tmp_path):
    from sepp.cli import main
    from sepp.methods.checkpoint import config_from_checkpoint, file_hash, load_checkpoint
    from sepp.mining.from_model import mine_checkpoint
    from sepp.data.pairs import load_pairs

    ckpt = run["checkpoint"]
    exported = tmp_path / "backbone.pt"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(exported)]) == 0
    raw = tmp_path / "raw.pt"  # a bare torchvision state_dict: DDP prefix, an fc layer, no sidecar
    state = torch.load(exported, weights_only=True)
    state = {"module." + k: v for k, v in state.items()} | {"module.fc.weight": torch.zeros(3, 128)}
    torch.save({"state_dict": state}, raw)
    keys = ["device=cpu", f"data.root={cifar_root}", "mine.k=3", "data.subset=1000"]
    mine_checkpoint(str(ckpt), config_from_checkpoint(load_checkpoint(ckpt), keys), tmp_path / "a")
    assert main(["mine", "--encoder", str(ckpt), f"mine.out={tmp_path / 'd'}", *keys]) == 0  # its own config
    for name, path in (("b", exported), ("c", raw)):
        assert main(["mine", "--encoder", str(path), "--config", "cifar10_nnclr", f"mine.out={tmp_path / name}",
                     *keys]) == 0
    a, b, c, d = (load_pairs(tmp_path / n / "pairs.npz") for n in "abcd")
    assert len(a.i) == 3 * 1000 and a.meta["num_images"] == 1000
    for other in (b, c, d):
        assert np.array_equal(a.i, other.i) and np.array_equal(a.j, other.j) and np.array_equal(a.sim, other.sim)
    assert b.meta["encoder_sha256"] == file_hash(exported) and c.meta["encoder_sha256"] == file_hash(raw)
    assert a.meta["encoder_sha256"] == d.meta["encoder_sha256"] == file_hash(ckpt)
    assert (b.meta["encoder_kind"], c.meta["encoder_kind"], c.meta["encoder_arch"], c.meta["encoder_cifar_stem"]) \
        == ("export", "state_dict", "resnet18_narrow", False)
    assert main(["mine", "--encoder", str(raw), "--arch", "resnet50", f"data.root={cifar_root}"]) == 2
    assert main(["mine", "--encoder", str(raw), "--cifar-stem", f"data.root={cifar_root}"]) == 2


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
@USES_RUN
def test_embed_plot_command_draws_the_evaluation_split(run, tmp_path):
    from sepp.cli import main

    out = tmp_path / "embed.png"
    assert main(["eval", "embed-plot", "--checkpoint", str(run["checkpoint"]), "--baseline",
                 str(run["checkpoint"]), "--out", str(out), "device=cpu", "eval.embed_points=150",
                 "eval.embed_algorithm=tsne"]) == 0
    assert out.stat().st_size > 10_000


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")
def test_sepp_run_evals_every_arm_with_the_whole_suite(cifar_root, imagenette_root, tmp_path):
    """run.evals: fine-tuning, transfer and the embedding picture for both arms, in results.json and report.md."""
    from conftest import tiny_overrides
    from sepp.cli import main

    out = tmp_path / "exp"
    args = ["run", "--config", "demo", *tiny_overrides(cifar_root, out, method="simclr", subset=80, batch=20),
            "data.eval_subset=100", "run.baseline_epochs=1", "run.sepp_epochs=1", "run.seeds=[]", "mine.k=2",
            "run.evals=[knn,finetune,transfer,embed_plot]", "eval.finetune_max_steps=2", "eval.finetune_batch_size=16",
            "transfer.data.name=imagenette", f"transfer.data.root={imagenette_root}", "transfer.data.subset=100",
            "transfer.data.eval_subset=100",
            "transfer.c_steps=3", "eval.embed_points=60", "eval.embed_algorithm=tsne"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    for arm in ("baseline", "sepp"):
        r = results[arm]
        assert r["knn_top1"] is not None and r["linear_top1"] is None
        assert 0 <= r["finetune_top1"] <= 100 and 0 <= r["transfer_score"] <= 100
        assert json.loads((Path(r["dir"]) / "finetune.json").read_text())["steps"] == 2
        assert json.loads((Path(r["dir"]) / "transfer.json").read_text())["dataset"] == "imagenette"
    assert set(results["difference"]["sepp-baseline"]) == {"knn", "finetune", "transfer"}
    assert results["embed_plot"] == "embed.png" and (out / "embed.png").stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "fine-tune top-1" in report and "transfer" in report and "](embed.png)" in report
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "kNN top-1" in header and "fine-tune top-1" in header and "transfer" in header
