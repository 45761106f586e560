"""Mining with a model: the encoder of a method being trained (re-mining, ``sepp.remine_every``) or of a sepp
checkpoint (``sepp mine --checkpoint``, phase 2 of ``sepp run``), with ``cfg.mine``'s settings."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sepp import distributed as D
from sepp.data.datasets import build_dataset
from sepp.data.pairs import Pairs
from sepp.data.transforms import eval_transform
from sepp.methods.checkpoint import file_hash, load_trained
from sepp.mining.run import SELECTION, MineSettings, mine_pairs


def encoder_for(method, features: str) -> nn.Module:
    """What ``mine.features`` embeds with: the backbone, or the backbone followed by the projector."""
    if features == "projector":
        return nn.Sequential(method.backbone, method.projector)
    return method.backbone


def training_images(cfg):
    """``cfg.data``'s training split with the evaluation transform (what mining embeds)."""
    return build_dataset(cfg.data, split=cfg.data.split, transform=eval_transform(cfg.data.image_size, cfg.data.name))


def remine_settings(cfg, previous: Pairs | None) -> tuple[MineSettings, str]:
    """Re-mining's settings: the selection (k, threshold, mutual, rank_from, features) recorded in the pair
    file being replaced, except a ``mine.*`` key given on the command line (``cfg.command_line``), which wins;
    ``cfg.mine`` for the rest. Also returns the line that says which value came from where."""
    explicit = tuple(key for key in SELECTION
                     if any(o.split("=", 1)[0].strip() == f"mine.{key}" for o in cfg.command_line))
    settings = MineSettings.from_config(cfg, plots=False, oracle="none")
    source = {key: "config" for key in SELECTION}
    if previous is not None:
        settings, source = settings.with_meta(previous.meta, keep=explicit)
    source.update({key: "command line" for key in explicit})
    said = ", ".join(f"{key}={getattr(settings, key)} ({source[key]})" for key in SELECTION)
    return settings, said


def remine(method, cfg, dataset, device, epoch: int, previous: Pairs | None = None) -> tuple[Pairs, dict]:
    """Refresh the semantic pairs from the model being trained (beyond the paper: ``sepp.remine_every``) with
    :func:`remine_settings`; returns the new pairs (meta ``mined_at_epoch`` set) and the mining statistics."""
    settings, said = remine_settings(cfg, previous)
    if D.is_main():
        print(f"re-mining at epoch {epoch} with {said}", flush=True)
    was_training = method.training
    method.eval()
    pairs, stats = mine_pairs(encoder_for(method, settings.features),
                              dataset.with_transform(eval_transform(cfg.data.image_size, cfg.data.name)), settings,
                              device=device, out_dir=Path(cfg.out) / "remine" / f"epoch_{epoch:04d}",
                              meta={"encoder": f"{cfg.out}@epoch{epoch}", "mined_at_epoch": epoch})
    method.train(was_training)
    if D.is_main():
        prec = stats.get("precision")
        print(f"re-mined at epoch {epoch}: {stats['num_pairs']} pairs, coverage {stats['coverage']:.3f}"
              + (f", precision {prec:.3f}" if prec is not None else ""), flush=True)
    return pairs, stats


def mine_checkpoint(checkpoint: str, cfg, out_dir: Path) -> tuple[Pairs, dict]:
    """Mine pairs from a checkpoint's encoder with ``cfg.mine`` settings over ``cfg.data``'s training set;
    returns ``(pairs, statistics)``. Every process takes part: embedding and search are sharded under
    torchrun, rank 0 writes the files."""
    method, _, ckpt = load_trained(checkpoint, [f"device={cfg.device}", f"data.root={cfg.data.root}"])
    meta = {"encoder_checkpoint": str(checkpoint), "encoder_sha256": file_hash(checkpoint),
            "encoder_method": ckpt["config"]["method"], "encoder_epoch": ckpt["epoch"]}
    return mine_pairs(encoder_for(method, cfg.mine.features), training_images(cfg), MineSettings.from_config(cfg),
                      device=torch.device(cfg.device), out_dir=out_dir, meta=meta)
