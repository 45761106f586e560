"""The job `tests/test_multinode.py` launches under torchrun, all phases in one process so torch and sepp are
imported once (two cores): ``python multinode_worker.py TMP straight|split data.root=ROOT OVERRIDES...``.

``split`` (the two-node launch): first a run whose ``out`` is a different folder on every process (as with
node-local disks), which must fail with one line; then one epoch, and a resume from ``last.pt`` for the
second. ``straight``: both epochs at once. Both then mine the final checkpoint, sharded over the processes.
Each rank writes what happened to ``TMP/rank<R>.json``."""
from __future__ import annotations

import json
import sys

import torch

from sepp.config import load_config
from sepp.data.datasets import build_dataset
from sepp.data.transforms import eval_transform
from sepp.methods.checkpoint import load_trained
from sepp.distributed import init_distributed
from sepp.engine.trainer import pretrain
from sepp.errors import SeppError
from sepp.mining.run import MineSettings, mine_pairs


def mine(checkpoint, root_override: str, out) -> dict:
    """Mining as `sepp mine --checkpoint` does it (embedding and search sharded under torchrun, embeddings in a
    shared memmap), without the figures."""
    method, cfg, _ = load_trained(checkpoint, ["device=cpu", root_override])
    data = build_dataset(cfg.data, split=cfg.data.split, transform=eval_transform(32, "cifar10"))
    settings = MineSettings(k=3, threshold=0.0, mutual=False, backend="exact", chunk_size=16, precision="fp32",
                            batch_size=24, save_embeddings=True, plots=False)
    return mine_pairs(method.backbone, data, settings, device=torch.device("cpu"), out_dir=out, meta={})[1]


def main(tmp: str, kind: str, overrides: list[str]) -> None:
    rank, world, _ = init_distributed()
    result: dict = {"world": world}

    def cfg(out, *extra):
        return load_config("cifar10_simclr", [*overrides, f"out={out}", *extra])

    if kind == "split":
        try:
            pretrain(cfg(f"{tmp}/disk_of_rank{rank}"), progress=False)
        except SeppError as exc:
            result["unshared"] = str(exc)
        result["first"] = pretrain(cfg(f"{tmp}/run", "train.stop_at_epoch=1"), progress=False)["status"]
        result["second"] = pretrain(cfg(f"{tmp}/run", "train.resume=true"), progress=False)["status"]
    else:
        result["second"] = pretrain(cfg(f"{tmp}/run"), progress=False)["status"]
    result["mine"] = mine(f"{tmp}/run/last.pt", overrides[0], f"{tmp}/mined")["num_images"]
    with open(f"{tmp}/rank{rank}.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
