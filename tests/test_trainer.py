"""The training engine end to end on real CIFAR-10 at tiny scale: outputs, exact resume, interrupts,
atomic checkpoints, divergence, export and the CLI's one-line errors."""
from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from conftest import tiny_overrides
from sepp.cli import main as cli
from sepp.config import load_config
from sepp.engine import trainer as trainer_mod
from sepp.methods.checkpoint import atomic_save, load_checkpoint
from sepp.engine.trainer import pretrain
from sepp.errors import SeppError

pytestmark = pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")


def _cfg(root, out, method="mocov2", **extra):
    return load_config(f"cifar10_{method}", tiny_overrides(root, out, method=method, **extra))


@pytest.mark.parametrize("method", ["mocov2", "simsiam", "simclr", "byol"])
def test_pretrain_writes_run_and_knn_eval(cifar_root, tmp_path, method, capsys):
    out = tmp_path / method
    summary = pretrain(_cfg(cifar_root, out, method, subset=128, batch=32, **{"train.knn_every": 0}),
                       progress=False)
    assert summary["status"] == "finished" and summary["epochs"] == 1 and summary["steps"] == 4
    for name in ("last.pt", "metrics.csv", "config.yaml"):
        assert (out / name).is_file()
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 1 and math.isfinite(float(rows[0]["loss"])) and float(rows[0]["samples_per_s"]) > 0
    assert 0 <= float(rows[0]["knn_top1"]) <= 100
    saved = OmegaConf.load(out / "config.yaml")
    assert saved.method == method and saved.data.image_size == 32
    assert any(p.name.startswith("events") for p in (out / "tb").iterdir())
    assert cli(["eval", "knn", "--checkpoint", str(out / "last.pt"), f"data.root={cifar_root}",
                "data.eval_subset=500", "eval.knn_k=20"]) == 0
    assert "knn_top1=" in capsys.readouterr().out
    assert (out / "last_knn.json").is_file()


def _states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("pipeline", ["device", "loader"])
def test_resume_equals_straight_run(cifar_root, tmp_path, pipeline):
    extra = {"data.pipeline": pipeline}
    pretrain(_cfg(cifar_root, tmp_path / "straight", subset=96, batch=32, epochs=2, **extra), progress=False)
    first = pretrain(_cfg(cifar_root, tmp_path / "split", subset=96, batch=32, epochs=2,
                          **{**extra, "train.stop_at_epoch": 1}), progress=False)
    assert first["status"] == "paused" and first["epochs"] == 1
    pretrain(_cfg(cifar_root, tmp_path / "split", subset=96, batch=32, epochs=2,
                  **{**extra, "train.resume": "true"}), progress=False)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 6
    _states_equal(a["model"], b["model"])  # weights, momentum encoder and queue
    rows = list(csv.DictReader(open(tmp_path / "split" / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_existing_run_needs_resume(cifar_root, tmp_path):
    pretrain(_cfg(cifar_root, tmp_path, subset=64, batch=32), progress=False)
    with pytest.raises(SeppError, match="train.resume=true"):
        pretrain(_cfg(cifar_root, tmp_path, subset=64, batch=32), progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(cifar_root, tmp_path, monkeypatch):
    pretrain(_cfg(cifar_root, tmp_path, subset=64, batch=32, epochs=1), progress=False)
    good = load_checkpoint(tmp_path / "last.pt")
    real_build = trainer_mod.build_model

    def poisoned(cfg, device, world):
        method = real_build(cfg, device, world)
        forward = method.forward
        method.forward = lambda *a: {"loss": forward(*a)["loss"] * float("nan")}
        return method

    monkeypatch.setattr(trainer_mod, "build_model", poisoned)
    with pytest.raises(SeppError, match="loss became nan") as err:
        pretrain(_cfg(cifar_root, tmp_path, subset=64, batch=32, epochs=3, **{"train.resume": "true"}),
                 progress=False)
    assert "\n" not in str(err.value)
    after = load_checkpoint(tmp_path / "last.pt")
    assert after["epoch"] == good["epoch"] == 1
    _states_equal(after["model"], good["model"])


def test_kill_during_checkpoint_write_keeps_previous(tmp_path):
    path = tmp_path / "last.pt"
    atomic_save({"version": 0, "blob": torch.zeros(10)}, path)
    code = (
        "import sys, torch\n"
        "from sepp.methods.checkpoint import atomic_save\n"
        "big = torch.randn(64, 1024, 1024)\n"  # 256 MB: the write takes long enough to be killed inside
        "print('ready', flush=True)\n"
        "v = 1\n"
        "while True:\n"
        "    atomic_save({'version': v, 'blob': big}, sys.argv[1]); v += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(path, weights_only=False)  # complete: either the old or a fully written new version
    assert "version" in ckpt and ckpt["blob"].numel() in (10, 64 * 1024 * 1024)


def test_sigint_saves_resumable_checkpoint(cifar_root, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "sepp.cli", "pretrain", "--config", "cifar10_mocov2",
            *tiny_overrides(cifar_root, out, subset=512, batch=32, epochs=50)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout:  # wait for the first finished epoch, then interrupt inside the second
        if line.startswith("epoch 1/50"):
            break
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 130, rest
    assert "resume" in rest
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] >= 1 and (ckpt["epoch"], ckpt["batch_in_epoch"]) != (50, 0)
    summary = pretrain(load_config("cifar10_mocov2", tiny_overrides(
        cifar_root, out, subset=512, batch=32, epochs=ckpt["epoch"] + 1, **{"train.resume": "true"})),
        progress=False)
    assert summary["epochs"] == ckpt["epoch"] + 1
    assert summary["steps"] == (ckpt["epoch"] + 1) * (512 // 32)


def test_export_loads_into_plain_torchvision_resnet(cifar_root, tmp_path):
    cfg = _cfg(cifar_root, tmp_path, subset=64, batch=32, **{"model.backbone": "resnet18",
                                                              "model.cifar_stem": True, "train.max_steps": 1})
    pretrain(cfg, progress=False)
    out = tmp_path / "backbone.pt"
    assert cli(["export", "--checkpoint", str(tmp_path / "last.pt"), "--out", str(out)]) == 0
    plain = torchvision.models.resnet18()
    plain.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    plain.maxpool = torch.nn.Identity()
    plain.fc = torch.nn.Identity()
    plain.load_state_dict(torch.load(out, weights_only=True), strict=True)
    from sepp.methods.checkpoint import load_trained

    method, _, _ = load_trained(tmp_path / "last.pt", ["device=cpu"])
    x = torch.randn(2, 3, 32, 32)
    plain.eval()
    torch.testing.assert_close(plain(x), method.backbone(x))


@pytest.mark.parametrize("argv, words", [
    (["pretrain", "--config", "cifar10_mocov2", "data.root=/nonexistent/place"], ["/nonexistent/place", "SEPP_DATA"]),
    (["pretrain", "--config", "cifar10_mocov2", "train.epoch=1"], ["unknown config key 'train.epoch'"]),
    (["pretrain", "--config", "cifar10_mocov2", "model.backbone=vgg"], ["model.backbone", "resnet18"]),
    (["pretrain", "--config", "nope"], ["not found"]),
    (["eval", "knn", "--checkpoint", "/nonexistent.pt"], ["does not exist"]),
    (["mine", "--checkpoint", "/nonexistent.pt"], ["does not exist"]),
])
def test_cli_bad_input_one_line(argv, words, capsys, tmp_path):
    assert cli(argv + ([f"out={tmp_path}"] if argv[0] == "pretrain" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    assert cli(["eval", "knn", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be read" in err and "\n" not in err


@pytest.mark.parametrize("precomputed", ["true", "false"])
def test_eval_linear_cli(cifar_root, tmp_path, capsys, precomputed):
    pretrain(_cfg(cifar_root, tmp_path, subset=64, batch=32), progress=False)
    assert cli(["eval", "linear", "--checkpoint", str(tmp_path / "last.pt"), f"data.root={cifar_root}",
                "data.subset=200", "data.eval_subset=200", "eval.linear_epochs=2",
                f"eval.linear_precomputed={precomputed}", "--out", str(tmp_path / "lin.json")]) == 0
    assert "linear_top1=" in capsys.readouterr().out
    import json

    result = json.loads((tmp_path / "lin.json").read_text())
    assert 0 <= result["linear_top1"] <= 100 and result["epochs"] == 2


def test_augment_grid_cli(cifar_root, tmp_path):
    out = tmp_path / "grid.png"
    assert cli(["augment-grid", "--config", "cifar10_byol", "--out", str(out), "--images", "3",
                f"data.root={cifar_root}", "data.subset=10", "device=cpu"]) == 0
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 300 and h > 100


def test_torchrun_two_processes_train_and_resume(cifar_root, tmp_path):
    """The whole trainer under torchrun (gloo, 2 CPU processes): one checkpoint, one metrics file, resumable."""
    out = tmp_path / "ddp"
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "sepp.cli", "pretrain", "--config", "cifar10_mocov2",
            *tiny_overrides(cifar_root, out, subset=128, batch=32, epochs=2, **{"train.knn_every": 1,
                                                                              "train.stop_at_epoch": 1})]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    first = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert first.stdout.count("epoch 1/2") == 1  # only rank 0 prints
    second = subprocess.run(base + ["train.resume=true", "train.stop_at_epoch=0"], capture_output=True,
                            text=True, env=env, timeout=300)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 2 * (128 // 32)  # global batch 32 = 2 x 16
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(r["knn_top1"] for r in rows)


def test_mid_epoch_resume_skips_batches_without_computing_them():
    """Both loaders start an epoch at a given batch from the plan itself (no decoding/augmenting of the
    skipped batches) and yield exactly the tail of the full epoch's ids."""
    import numpy as np

    from sepp.data.device_loader import DeviceLoader
    from sepp.data.loader import PlanSampler

    calls = []

    def aug(x, generator=None):
        calls.append(len(x))
        return x.float()

    images = torch.zeros(40, 3, 4, 4, dtype=torch.uint8)
    pairs = (np.arange(10), (np.arange(10) + 1) % 40)
    dl = DeviceLoader(images, aug, aug, batch_size=5, seed=3, device="cpu", pairs=pairs)
    dl.set_epoch(2)
    full = [b[2].tolist() + b[3].tolist() for b in dl]
    calls.clear()
    dl.set_epoch(2, start_batch=3)
    tail = [b[2].tolist() + b[3].tolist() for b in dl]
    assert len(dl) == len(full) == 10 and tail == full[3:] and len(calls) == 2 * len(tail)

    sampler = PlanSampler(40, seed=3, batch_size=5, pairs=pairs)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, start_batch=3)
    assert list(sampler) == whole[15:] and len(sampler) == len(whole)
