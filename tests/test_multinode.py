"""Two single-process "nodes" on this machine (two torchrun agents with node ranks 0 and 1, c10d rendezvous
on localhost) train, resume and mine exactly like one ``--nproc_per_node=2`` launch, and a run directory the
nodes do not share is refused on every process with one line (instead of a hang or ranks resuming from
different checkpoints).

To stay within a minute on two cores each launch runs all phases in one job (`multinode_worker.py`): torch
and sepp are imported once per process; the resume reads ``last.pt`` back from disk like a fresh launch."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from multinode_worker import mine
from sepp.methods.checkpoint import load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*md5.*:UserWarning")

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "SEPP_SHARED_DIR_WAIT_S": "0.5"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

WORKER = Path(__file__).with_name("multinode_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(commands, timeout=300):
    """Run torchrun agents side by side (a launch alone keeps about one of two cores busy)."""
    procs = [subprocess.Popen([*TORCHRUN, *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=ENV) for cmd in commands]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def _results(tmp):
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(2)]


def test_two_nodes_train_resume_and_mine_like_one_node(cifar_root, tmp_path):
    script = WORKER
    overrides = [f"data.root={cifar_root}",
                 *(o for o in tiny_overrides(cifar_root, tmp_path, method="simclr", subset=64, batch=32, epochs=2)
                   if not o.startswith(("out=", "data.root=")))]
    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    one.mkdir(), two.mkdir()

    port = _free_port()
    two_nodes = [["--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}", "--rdzv_backend=c10d",
                  f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=sepp-{port}", f"--rdzv_conf=is_host={1 - node}",
                  str(script), str(two), "split", *overrides] for node in (0, 1)]
    one_node = ["--standalone", "--nproc_per_node=2", str(script), str(one), "straight", *overrides]
    _launch([*two_nodes, one_node])

    for r in _results(one) + _results(two):
        assert r["world"] == 2 and r["second"] == "finished" and r["mine"] == 64, r
    for r in _results(two):
        assert r["first"] == "paused"
        assert "not on a filesystem shared by all processes" in r["unshared"] and "\n" not in r["unshared"], r
    assert not any((two / f"disk_of_rank{r}" / "last.pt").exists() for r in range(2))

    # training and resume: the resumed two-node run equals the straight one-node run bit for bit
    a, b = load_checkpoint(one / "run" / "last.pt"), load_checkpoint(two / "run" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 2 * (64 // 32)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k

    # sharded mining (both nodes write embedding rows into one memmap): equal to one node and to one process
    single = tmp_path / "single"
    mine(two / "run" / "last.pt", f"data.root={cifar_root}", single)
    e1, e2, e0 = (np.load(d / "embeddings.npy") for d in (one / "mined", two / "mined", single))
    assert e2.shape == (64, e0.shape[1]) and np.array_equal(e1, e2) and np.array_equal(e2, e0)
    for key in ("i", "j", "sim"):
        got = [np.load(d / "pairs.npz")[key] for d in (one / "mined", two / "mined", single)]
        assert np.array_equal(got[0], got[1]) and np.array_equal(got[1], got[2]), key
