"""`sepp eval knn|linear` on a checkpoint: features of the frozen backbone, a JSON result, one printed line."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import SeppError
from ..methods.checkpoint import load_trained
from .data import eval_splits, eval_train_split, features
from .knn import knn_eval
from .linear import linear_probe


def knn_from_method(method, cfg, memo: dict | None = None) -> float:
    """kNN top-1 of a trained method's backbone (``memo``: see :func:`sepp.eval.data.features`)."""
    return knn_eval(method.backbone, cfg, torch.device(cfg.device), memo=memo)


def linear_from_method(method, cfg, memo: dict | None = None) -> dict:
    """The linear probe of ``eval.linear_protocol`` (standard | fast; see sepp.eval.linear)."""
    device = torch.device(cfg.device)
    train, test = eval_splits(cfg)
    return linear_probe(method.backbone, cfg, train, test, device,
                        lambda backbone, ds: features(backbone, ds, cfg, device, memo))


def evaluate_checkpoint(kind: str, checkpoint: str, overrides=(), out: str | None = None) -> dict:
    method, cfg, ckpt = load_trained(checkpoint, overrides)
    t0 = time.time()
    result = {"checkpoint": str(checkpoint), "epoch": ckpt["epoch"], "method": cfg.method,
              "dataset": cfg.data.name, "train_split": eval_train_split(cfg), "test_split": cfg.data.eval_split}
    if kind == "knn":
        result.update(knn_top1=knn_from_method(method, cfg), k=cfg.eval.knn_k, t=cfg.eval.knn_t)
    elif kind == "linear":
        res = linear_from_method(method, cfg)
        result.update(linear_top1=res["top1"], linear_top5=res.get("top5"),
                      protocol=res["protocol"], precomputed=bool(cfg.eval.linear_precomputed),
                      epochs=res["epochs"])
    else:
        raise SeppError(f"unknown evaluation {kind!r}; choose knn or linear")
    result["seconds"] = time.time() - t0
    path = Path(out) if out else Path(checkpoint).with_name(f"{Path(checkpoint).stem}_{kind}.json")
    path.write_text(json.dumps(result, indent=2))
    result["json"] = str(path)
    return result
