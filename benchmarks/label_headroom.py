"""How much can labels give at a training budget? The DIAGNOSTIC supervised reference for the SePP study.

Semantic positive pairs are a weak form of label information. Before asking whether label-perfect pairs help
an SSL method at a budget, ask what *all* the labels give there: this trains the same backbone on the same
images with the same batched augmentation (two views per image, as SimCLR forwards) for the same number of
optimizer steps, with cross-entropy on the labels, and evaluates its backbone exactly as `sepp run` does
(weighted kNN and the fast linear probe on the test split). The gap between this and the SSL baseline is the
headroom that any pair source could at most close at that budget.

    python benchmarks/label_headroom.py --config demo --steps 248,744 --seeds 0,1,2 --out logs/headroom \
        [--init ENCODER.pt] [key=value ...]

Writes ``label_headroom.json`` and ``label_headroom.md`` under ``--out`` after every run; prints one line per run.
Optimizer: SGD, momentum 0.9, lr 0.1 per 256 images (linear scaling), weight decay 5e-4, the config's
warm-up epochs then cosine to 0 — the usual supervised CIFAR recipe, not the SSL method's LARS.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sepp.config import load_config
from sepp.data.datasets import build_dataset
from sepp.data.device_loader import DeviceLoader
from sepp.data.gpu_augment import BatchAugment
from sepp.engine.setup import resolve
from sepp.eval.data import eval_splits, features
from sepp.eval.knn import knn_eval
from sepp.eval.linear import linear_probe
from sepp.eval.stats import format_mean_std, summarize
from sepp.methods import method_view_specs
from sepp.methods.checkpoint import load_checkpoint
from sepp.methods.optim import scale_lr
from sepp.models.backbones import build_backbone


def init_backbone(backbone: torch.nn.Module, path: str) -> None:
    """Start from the backbone of a sepp checkpoint (the continuation setting: the same start as SePP)."""
    state = load_checkpoint(path)["model"]
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})


def train_supervised(cfg, steps: int, seed: int, device: torch.device, init: str | None = None) -> torch.nn.Sequential:
    """``Sequential(backbone, linear head)`` trained with cross-entropy on both augmented views of the
    training images for ``steps`` optimizer steps (the backbone from ``init``'s when given)."""
    torch.manual_seed(seed)
    train = build_dataset(cfg.data, split=cfg.data.split)
    labels = torch.as_tensor(train.labels, dtype=torch.int64, device=device)
    spec1, spec2 = method_view_specs(cfg)
    loader = DeviceLoader(train.uint8_images(), BatchAugment(spec1), BatchAugment(spec2),
                          batch_size=int(cfg.train.batch_size), seed=seed, device=device)
    backbone, dim = build_backbone(cfg.model.backbone, cfg.model.cifar_stem)
    if init:
        init_backbone(backbone, init)
    head = torch.nn.Linear(dim, len(train.classes))
    model = torch.nn.Sequential(backbone, head).to(device)
    base_lr = scale_lr(0.1, cfg.train.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9, weight_decay=5e-4)
    warmup = round(float(cfg.train.warmup_epochs) * len(loader))
    step, epoch = 0, 0
    model.train()
    while step < steps:
        loader.set_epoch(epoch)
        for x1, x2, ids1, ids2 in loader:
            if step >= steps:
                break
            lr = base_lr * (step + 1) / warmup if step < warmup else \
                base_lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
            for g in opt.param_groups:
                g["lr"] = lr
            loss = 0.5 * (F.cross_entropy(model(x1), labels[ids1]) + F.cross_entropy(model(x2), labels[ids2]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        epoch += 1
    return model


def evaluate(backbone, cfg, device: torch.device) -> dict:
    """kNN and linear probe of the frozen backbone, by the same entry points as `sepp run` (eval.* keys)."""
    train, test = eval_splits(cfg)
    lin = linear_probe(backbone, cfg, train, test, device, lambda b, ds: features(b, ds, cfg, device))
    return {"knn_top1": knn_eval(backbone, cfg, device), "linear_top1": lin["top1"]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--steps", default="248", help="comma-separated optimizer-step budgets")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/label_headroom")
    ap.add_argument("--init", default=None, help="sepp checkpoint whose backbone the supervised model starts from")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = resolve(load_config(args.config, args.overrides))
    device = torch.device(cfg.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for steps in (int(s) for s in args.steps.split(",")):
        runs = []
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.time()
            run_cfg = cfg.copy()
            run_cfg.seed = seed  # the linear probe's seed, as in `sepp run`
            res = evaluate(train_supervised(cfg, steps, seed, device, args.init)[0], run_cfg, device)
            runs.append({"seed": seed, **res, "seconds": time.time() - t0})
            print(f"DIAGNOSTIC supervised (labels) steps={steps} seed={seed} kNN {res['knn_top1']:.2f} "
                  f"linear {res['linear_top1']:.2f} ({runs[-1]['seconds']:.0f} s)", flush=True)
            rows[steps] = {"runs": runs, "knn": summarize([r["knn_top1"] for r in runs]),
                           "linear": summarize([r["linear_top1"] for r in runs])}
            result = write(out, args, rows)  # after every run, so a stopped run keeps what it measured
    print((out / "label_headroom.md").read_text(), end="")
    return result


def write(out: Path, args, rows: dict) -> dict:
    """``label_headroom.json`` and ``label_headroom.md`` for the runs so far."""
    result = {"diagnostic": "supervised cross-entropy on the labels: an upper reference, not SSL",
              "config": args.config, "overrides": args.overrides, "init": args.init, "steps": rows}
    (out / "label_headroom.json").write_text(json.dumps(result, indent=2))
    lines = ["DIAGNOSTIC: supervised cross-entropy on all labels (the headroom reference), "
             f"config {args.config} {' '.join(args.overrides)}", "",
             "| steps | kNN top-1 | linear top-1 |", "|---|---|---|"]
    lines += [f"| {s} | {format_mean_std(r['knn'])} | {format_mean_std(r['linear'])} |" for s, r in rows.items()]
    (out / "label_headroom.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
