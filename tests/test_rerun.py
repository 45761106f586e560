"""`sepp run` again in the same folder: each phase is reused only when the settings and inputs that made it
are unchanged, the results then equal a clean run with the new settings, and every description in
results.json / report.md is read off the artifacts used. Re-mining keeps the replaced pair file's settings."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_overrides
from sepp.cli import main as cli
from sepp.config import load_config
from sepp.data.pairs import Pairs, load_pairs, save_pairs
from sepp.engine.phases import Phase, differences, enter, mark_done, settings_of
from sepp.methods.checkpoint import file_hash, load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")

PHASES = {"1/5": "pretrain", "2/5": "mining", "3/5": "sepp", "4/5": "baseline"}


def _args(root, out, *extra) -> list[str]:
    return ["run", "--config", "demo", *tiny_overrides(root, out, method="simclr", subset=40, batch=20),
            "data.eval_subset=100", "run.baseline_epochs=2", "run.sepp_epochs=1", "run.seeds=[]", "mine.k=2",
            "run.evals=[knn]", *extra]


def _run(capsys, args) -> tuple[str, str]:
    """``(log, the comparison table)`` of one `sepp run`."""
    capsys.readouterr()
    assert cli(args) == 0
    text = capsys.readouterr().out
    return text, text[text.index("\nmodel ") + 1: text.index("\nreport: ")]


def _phases(log: str) -> dict[str, str]:
    """What each training/mining phase did: ``reused`` or ``ran``."""
    done = {}
    for line in log.splitlines():
        m = re.match(r"== phase (\d/5)", line)
        if m and m.group(1) in PHASES:
            done[PHASES[m.group(1)]] = "reused" if "unchanged: reusing" in line else "ran"
    return done


def _stored(out: Path, *copied_from: Path) -> dict:
    """results.json without what names the folder (or the folder it was copied from) or counts seconds."""
    text = (out / "results.json").read_text()
    for folder in (out, *copied_from):
        text = text.replace(str(folder), "OUT")
    results = json.loads(text)
    results.pop("seconds")
    # a sepp checkpoint holds its run folder in its config, so the encoder's hash differs between folders;
    # _check_descriptions checks it against the file instead
    results["mining"].pop("encoder_sha256")
    return results


def _check_descriptions(out: Path) -> None:
    """results.json and report.md describe the artifacts used: the pair file's meta, the checkpoints' configs."""
    results = json.loads((out / "results.json").read_text())
    pairs = load_pairs(out / "mining" / "pairs.npz")
    meta, mining = pairs.meta, results["mining"]
    for key in ("k", "threshold", "mutual", "rank_from", "features", "oracle"):
        assert mining[key] == meta[key], key
    assert mining["num_pairs"] == len(pairs) and mining["encoder"] == meta["encoder_checkpoint"]
    assert mining["encoder_sha256"] == file_hash(meta["encoder_checkpoint"], 64)
    sepp = load_checkpoint(out / "sepp" / "last.pt")
    cfg = sepp["config"]
    assert (results["method"], results["backbone"], results["dataset"]) == (
        cfg["method"], cfg["model"]["backbone"], cfg["data"]["name"])
    assert results["sepp"]["mode"] == cfg["sepp"]["mode"] and sepp["pairs"].digest() == pairs.digest()
    assert results["sepp"]["num_pairs"] == len(pairs)
    report = (out / "report.md").read_text()
    assert f"pairs used in **{cfg['sepp']['mode']}** mode" in report
    assert f"| {len(pairs)} | {meta['num_images']} |" in report
    if meta["oracle"] == "none":
        assert f"top-k = {meta['k']} " in report and "diagnostic" not in results
    else:
        assert f"`mine.oracle={meta['oracle']}`" in report and f"k = {meta['k']};" in report
        assert report.startswith("> **DIAGNOSTIC") and results["diagnostic"].startswith("DIAGNOSTIC")
        for arm in ("sepp", "baseline"):
            ev = json.loads((out / arm / "eval.json").read_text())
            assert ev["pair_cosine"][pairs.digest()]["diagnostic"].startswith("DIAGNOSTIC")
        assert json.loads((out / "sepp" / "eval.json").read_text())["diagnostic"].startswith("DIAGNOSTIC")
    for arm in ("sepp", "baseline"):  # each arm's evaluation describes its own checkpoint
        model = json.loads((out / arm / "eval.json").read_text())["model"]
        ckpt = load_checkpoint(out / arm / "last.pt")
        assert (model["method"], model["seed"], model["step"]) == (
            ckpt["config"]["method"], ckpt["config"]["seed"], ckpt["step"])
        assert results[arm]["steps"] == ckpt["step"]


@pytest.fixture(scope="module")
def first(cifar_root, tmp_path_factory):
    """One finished run with the base settings (shared by the re-run tests, each on a copy)."""
    out = tmp_path_factory.mktemp("first") / "exp"
    assert cli(_args(cifar_root, out)) == 0
    _check_descriptions(out)
    return out


# the second run's change -> the phases that must run again (the others are reused)
CHANGES = {
    "mine.k=3": {"mining", "sepp"},
    "mine.oracle=random": {"mining", "sepp"},
    "sepp.mode=enlarge": {"sepp", "baseline"},  # more samples per epoch: the step-matched baseline grows too
    "train.lr=0.6": {"pretrain", "mining", "sepp", "baseline"},
    "seed=1": {"pretrain", "mining", "sepp", "baseline"},
    "eval.knn_k=7": set(),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", list(CHANGES))
def test_second_run_redoes_exactly_the_affected_phases(first, cifar_root, tmp_path, capsys, change):
    again = tmp_path / "again"
    shutil.copytree(first, again, symlinks=True)
    log, table = _run(capsys, _args(cifar_root, again, change))
    ran = {phase for phase, what in _phases(log).items() if what == "ran"}
    assert ran == CHANGES[change], log
    evaluated = set(re.findall(r"evaluation of (\w+): .*: evaluating again", log))
    assert evaluated == ({"sepp", "baseline"} if change == "eval.knn_k=7" else set()), log
    if ran:
        assert "running it again (previous outputs moved to" in log
    _check_descriptions(again)

    clean = tmp_path / "clean"
    _, clean_table = _run(capsys, _args(cifar_root, clean, change))
    assert table.replace(str(again), "OUT") == clean_table.replace(str(clean), "OUT")
    assert _stored(again, first) == _stored(clean)


@pytest.mark.slow
def test_reuse_never_runs_every_phase_again(first, cifar_root, tmp_path, capsys):
    again = tmp_path / "again"
    shutil.copytree(first, again, symlinks=True)
    log, _ = _run(capsys, _args(cifar_root, again, "run.reuse=never"))
    assert set(_phases(log).values()) == {"ran"} and len(_phases(log)) == 4
    assert (again / "stale" / "pretrain" / "done.json").exists()
    assert _stored(again, first) == _stored(first)


@pytest.mark.slow
def test_kill_9_mid_phase_then_rerun_resumes(first, cifar_root, tmp_path, capsys):
    """A run killed with SIGKILL after phase 1's first epoch resumes phase 1 from its last.pt and ends with
    the results of the uninterrupted run."""
    out = tmp_path / "exp"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "sepp.cli", *_args(cifar_root, out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (out / "pretrain" / "last.pt").exists() and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "pretrain" / "done.json").exists(), "killed too late to test a resume"
    log, _ = _run(capsys, _args(cifar_root, out))
    assert "phase 1/5 (baseline pretraining): settings and inputs unchanged: resuming it" in log
    assert "resuming" in log and "from epoch 1" in log
    assert _stored(out) == _stored(first)


# ------------------------------------------------------------------------------------- the phase contract

def test_fingerprint_settings_and_differences():
    cfg = load_config("demo", ["data.root=/x", "mine.k=7", "out=/somewhere"])
    mining = settings_of(cfg, keep=("mine", "data"), drop=("data.eval_split",))
    assert mining["mine.k"] == 7 and mining["data.subset"] == 4000
    assert not {"data.root", "out", "mine.out", "data.eval_split", "train.lr", "command_line"} & set(mining)
    assert "train.lr" in settings_of(cfg) and "out" not in settings_of(cfg)
    assert differences({"mine.k": 5, "a": 1}, {"mine.k": 400, "a": 1, "b": 2}) == "b (none) -> 2, mine.k 5 -> 400"


def test_enter_reuses_resumes_or_moves_a_phase_aside(tmp_path, capsys):
    out, fp = tmp_path / "run", {"mine.k": 5, "format": 1}
    path = out / "mining"
    assert enter(Phase(path, "phase 2/5 (mining)", fp), out) is None
    assert json.loads((path / "fingerprint.json").read_text()) == fp
    (path / "pairs.npz").write_text("half written")
    assert enter(Phase(path, "phase 2/5 (mining)", fp), out) is None  # same settings, unfinished: resume
    assert "unchanged: resuming it" in capsys.readouterr().out and (path / "pairs.npz").exists()
    mark_done(path, {"seconds": 1.0})
    assert enter(Phase(path, "phase 2/5 (mining)", fp), out) == {"seconds": 1.0}
    new = {"mine.k": 400, "format": 1}
    assert enter(Phase(path, "phase 2/5 (mining)", new), out) is None
    log = capsys.readouterr().out
    assert "phase 2/5 (mining): mine.k 5 -> 400: running it again" in log
    assert (out / "stale" / "mining" / "done.json").exists() and not (path / "done.json").exists()
    mark_done(path, {"seconds": 2.0})
    assert enter(Phase(path, "phase 2/5 (mining)", new), out, reuse="never") is None
    assert json.loads((out / "stale" / "mining.2" / "done.json").read_text()) == {"seconds": 2.0}
    shared = tmp_path / "shared"  # a link to another run's arm (precision_sweep --baseline-from) moves, not its target
    shared.mkdir()
    (out / "baseline").symlink_to(shared)
    assert enter(Phase(out / "baseline", "phase 4/5", fp), out) is None
    assert (out / "stale" / "baseline").is_symlink() and shared.is_dir() and not (out / "baseline").is_symlink()
    assert "no fingerprint" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- re-mining

@pytest.mark.slow
@pytest.mark.parametrize("explicit", [False, True])
def test_remining_keeps_the_pair_files_settings(first, cifar_root, tmp_path, capsys, explicit):
    """k, threshold and mutual come from the pair file being replaced, not from the config defaults; a
    mine.* key given on the command line wins, and the log says which was used."""
    base = load_pairs(first / "mining" / "pairs.npz")
    pair_file = tmp_path / "pairs.npz"
    save_pairs(pair_file, Pairs(base.i, base.j, base.sim, {**base.meta, "k": 1, "threshold": -0.5,
                                                           "mutual": True}))
    overrides = tiny_overrides(cifar_root, tmp_path / "run", method="simclr", subset=40, batch=20, epochs=2,
                               **{"sepp.pairs": str(pair_file), "sepp.remine_every": 1})
    overrides = [o for o in overrides if not o.startswith("mine.")] + (["mine.k=2"] if explicit else [])
    from sepp.engine.trainer import pretrain

    capsys.readouterr()
    pretrain(load_config("demo", overrides), progress=False)
    log = capsys.readouterr().out
    fresh = load_pairs(tmp_path / "run" / "remine" / "epoch_0001" / "pairs.npz")
    k = 2 if explicit else 1
    assert (fresh.meta["k"], fresh.meta["threshold"], fresh.meta["mutual"]) == (k, -0.5, True)
    assert fresh.meta["rank_from"] == base.meta["rank_from"] and fresh.meta["mined_at_epoch"] == 1
    assert f"k={k} ({'command line' if explicit else 'pair file'})" in log
    assert "threshold=-0.5 (pair file)" in log and "mutual=True (pair file)" in log
    # mutual pairs: every kept (i, j) has its (j, i); at most k partners per anchor
    kept = set(zip(fresh.i.tolist(), fresh.j.tolist()))
    assert kept == {(j, i) for i, j in kept} and np.bincount(fresh.i).max() <= k
