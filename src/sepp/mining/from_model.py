"""Mining with a model: the encoder of a method being trained (re-mining, ``sepp.remine_every``) or of a sepp
checkpoint (``sepp mine --checkpoint``, phase 2 of ``sepp run``), with ``cfg.mine``'s settings."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sepp import distributed as D
from sepp.data.datasets import build_dataset
from sepp.data.pairs import Pairs, load_pairs
from sepp.data.transforms import eval_transform
from sepp.methods.checkpoint import file_hash, load_trained
from sepp.mining.run import mine_pairs


def encoder_for(method, features: str) -> nn.Module:
    """What ``mine.features`` embeds with: the backbone, or the backbone followed by the projector."""
    if features == "projector":
        return nn.Sequential(method.backbone, method.projector)
    return method.backbone


def mine_settings(cfg, device) -> dict:
    """:func:`sepp.mining.run.mine_pairs`'s keyword arguments from ``cfg.mine`` (``precision="auto"`` is
    resolved there, by :func:`sepp.mining.search.resolve_precision`)."""
    m = cfg.mine
    return dict(k=m.k, threshold=m.threshold, mutual=m.mutual, backend=m.backend, chunk_size=m.chunk_size,
                precision=m.precision, batch_size=m.batch_size, device=device, save_embeddings=m.save_embeddings,
                rank_from=m.rank_from)


def training_images(cfg):
    """``cfg.data``'s training split with the evaluation transform (what mining embeds)."""
    return build_dataset(cfg.data, split=cfg.data.split, transform=eval_transform(cfg.data.image_size, cfg.data.name))


def remine(method, cfg, dataset, device, epoch: int) -> tuple[Pairs, dict]:
    """Refresh the semantic pairs from the model being trained (beyond the paper: ``sepp.remine_every``);
    returns the new pairs (meta ``mined_at_epoch`` set) and the mining statistics."""
    out_dir = Path(cfg.out) / "remine" / f"epoch_{epoch:04d}"
    was_training = method.training
    method.eval()
    stats = mine_pairs(encoder_for(method, cfg.mine.features),
                       dataset.with_transform(eval_transform(cfg.data.image_size, cfg.data.name)),
                       **mine_settings(cfg, device), out_dir=out_dir,
                       meta={"encoder": f"{cfg.out}@epoch{epoch}", "features": cfg.mine.features}, plots=False)
    method.train(was_training)
    pairs = load_pairs(out_dir / "pairs.npz")
    pairs.meta["mined_at_epoch"] = epoch
    if D.is_main():
        prec = stats.get("precision")
        print(f"re-mined at epoch {epoch}: {stats['num_pairs']} pairs, coverage {stats['coverage']:.3f}"
              + (f", precision {prec:.3f}" if prec is not None else ""), flush=True)
    return pairs, stats


def mine_checkpoint(checkpoint: str, cfg, out_dir: Path) -> dict:
    """Mine pairs from a checkpoint's encoder with ``cfg.mine`` settings over ``cfg.data``'s training set.
    Every process takes part: embedding and search are sharded under torchrun, rank 0 writes the files."""
    method, _, ckpt = load_trained(checkpoint, [f"device={cfg.device}", f"data.root={cfg.data.root}"])
    meta = {"encoder_checkpoint": str(checkpoint), "encoder_sha256": file_hash(checkpoint),
            "encoder_method": ckpt["config"]["method"], "encoder_epoch": ckpt["epoch"],
            "features": cfg.mine.features}
    oracle = dict(oracle=cfg.mine.oracle, oracle_precision=cfg.mine.oracle_precision,
                  oracle_candidates=cfg.mine.oracle_candidates, seed=cfg.seed)
    return mine_pairs(encoder_for(method, cfg.mine.features), training_images(cfg),
                      **mine_settings(cfg, torch.device(cfg.device)), out_dir=out_dir, meta=meta, **oracle)
