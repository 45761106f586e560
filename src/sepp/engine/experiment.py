"""`sepp run`: the whole SePP experiment in one resumable command.

Phases, each in its own sub-directory of ``out`` and skipped when its ``done.json`` exists (an interrupted
phase resumes from its ``last.pt``):

1. ``pretrain/`` — the baseline SSL pretraining that mines the pairs (or ``run.baseline_checkpoint``);
2. ``mining/``   — semantic positive pairs over the whole training set from that encoder;
3. ``sepp/``     — the same method trained with the pairs as extra positives (from scratch, or from phase 1
   with ``run.init=baseline``);
4. ``baseline/`` — the comparison baseline trained for the same budget as phase 3: the same number of
   optimizer steps (``run.budget=steps``, default: an enlarged epoch has more steps) or epochs; phase 1 is
   reused when it already matches;
5. ``eval``      — kNN and linear probe of both models, then ``results.json``, ``report.md`` and pictures.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import resolve
from . import distributed as dist_utils
from .trainer import pretrain


def _done(path: Path):
    f = path / "done.json"
    return json.loads(f.read_text()) if f.exists() else None


def _mark(path: Path, info: dict) -> dict:
    if dist_utils.is_main():
        path.mkdir(parents=True, exist_ok=True)
        (path / "done.json").write_text(json.dumps(info, indent=2))
    dist_utils.barrier()
    return info


def _phase_cfg(cfg: DictConfig, out: Path, epochs: int, **extra) -> DictConfig:
    c = cfg.copy()
    c.out = str(out)
    c.train.epochs = epochs
    c.train.resume = True
    c.train.max_steps = 0
    c.train.stop_at_epoch = 0  # a phase runs to its end (interrupts stay resumable) before it is marked done
    c.sepp.pairs = None
    c.sepp.remine_every = 0
    c.sepp.mask_negatives = False
    for key, value in extra.items():
        OmegaConf.update(c, key, value, merge=False)
    return c


def _train(cfg: DictConfig, out: Path, progress: bool, init_state=None) -> dict:
    done = _done(out)
    if done is not None:
        return done
    t0 = time.time()
    summary = pretrain(cfg, progress=progress, init_state=init_state)
    summary["seconds"] = time.time() - t0  # of this invocation: a resumed phase counts what it ran now
    return _mark(out, summary)


def _init_state(path: str):
    from .checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def run_experiment(cfg: DictConfig, progress: bool = True) -> dict:
    cfg = resolve(cfg)
    out = Path(cfg.out)
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    base_epochs = cfg.run.baseline_epochs or cfg.train.epochs
    sepp_epochs = cfg.run.sepp_epochs or cfg.train.epochs
    seconds = {}

    # 1. baseline pretraining (mines the pairs)
    if cfg.run.baseline_checkpoint:
        phase1_ckpt, phase1 = str(cfg.run.baseline_checkpoint), None
    else:
        _log("phase 1/5: baseline pretraining")
        phase1 = _train(_phase_cfg(cfg, out / "pretrain", base_epochs), out / "pretrain", progress)
        phase1_ckpt = str(out / "pretrain" / "last.pt")
        seconds["pretrain"] = phase1["seconds"]

    # 2. mining
    _log("phase 2/5: mining semantic positive pairs")
    mining = _done(out / "mining")
    if mining is None:
        t0 = time.time()
        stats = mine_checkpoint(phase1_ckpt, cfg, out / "mining")
        mining = _mark(out / "mining", {"stats": stats, "seconds": time.time() - t0})
    seconds["mining"] = mining["seconds"]
    stats = mining["stats"]

    # 3. SePP training
    _log(f"phase 3/5: SePP training with {stats['num_pairs']} pairs ({cfg.sepp.mode})")
    init = _init_state(phase1_ckpt) if cfg.run.init == "baseline" else None
    sepp_cfg = _phase_cfg(cfg, out / "sepp", sepp_epochs, **{
        "sepp.pairs": str(out / "mining" / "pairs.npz"), "sepp.mask_negatives": cfg.sepp.mask_negatives,
        "sepp.remine_every": cfg.sepp.remine_every})
    sepp_run = _train(sepp_cfg, out / "sepp", progress, init)
    seconds["sepp"] = sepp_run["seconds"]

    # 4. comparison baseline, same budget
    if cfg.run.budget == "steps":
        from ..data.sampling import steps_per_epoch

        per_epoch = steps_per_epoch(sepp_run["num_images"], dist_utils.get_world_size(), cfg.train.batch_size
                                    // dist_utils.get_world_size())
        b_epochs, b_steps = math.ceil(sepp_run["steps"] / per_epoch), sepp_run["steps"]
    else:
        b_epochs, b_steps = sepp_epochs, 0
    reuse = (phase1 is not None and cfg.run.init == "scratch" and phase1["epochs"] == b_epochs
             and (b_steps == 0 or phase1["steps"] == b_steps))
    if reuse:
        _log("phase 4/5: the phase-1 baseline already has the SePP model's budget; reusing it")
        baseline_dir, baseline = out / "pretrain", phase1
        seconds["baseline"] = 0.0
    else:
        _log(f"phase 4/5: baseline for the same budget ({b_epochs} epochs, {sepp_run['steps']} steps)")
        baseline_dir = out / "baseline"
        init = _init_state(phase1_ckpt) if cfg.run.init == "baseline" else None
        baseline = _train(_phase_cfg(cfg, baseline_dir, b_epochs, **{"train.max_steps": b_steps}),
                          baseline_dir, progress, init)
        seconds["baseline"] = baseline["seconds"]

    # 5. evaluation and report
    _log("phase 5/5: kNN and linear evaluation")
    t0 = time.time()
    evals = {name: _evaluate(path / "last.pt", cfg) for name, path in
             (("baseline", baseline_dir), ("sepp", out / "sepp"))}
    seconds["eval"] = sum(e["seconds"] for e in evals.values()) if evals else time.time() - t0
    results = {
        "dataset": cfg.data.name, "method": cfg.method, "backbone": cfg.model.backbone,
        "num_images": sepp_run["num_images"], "device": cfg.device, "world_size": dist_utils.get_world_size(),
        "baseline": {**_model_entry(baseline, evals["baseline"]), "dir": str(baseline_dir)},
        "sepp": {**_model_entry(sepp_run, evals["sepp"]), "dir": str(out / "sepp"), "mode": cfg.sepp.mode,
                 "init": cfg.run.init},
        "mining": {**{k: stats.get(k) for k in ("num_pairs", "coverage", "precision", "num_images")},
                   "k": cfg.mine.k, "threshold": cfg.mine.threshold, "mutual": cfg.mine.mutual,
                   "features": cfg.mine.features, "encoder": phase1_ckpt},
        "budget": cfg.run.budget,
        "seconds": seconds,
    }
    if dist_utils.is_main():
        (out / "results.json").write_text(json.dumps(results, indent=2))
        for name in ("pairs_gallery.png", "similarity_hist.png"):
            if (out / "mining" / name).exists():
                shutil.copyfile(out / "mining" / name, out / name)
        from ..report.curves import plot_curves
        from ..report.markdown import write_report

        plot_curves({"SePP": out / "sepp" / "metrics.csv", "baseline": baseline_dir / "metrics.csv"},
                    out / "curves.png")
        write_report(out, results, stats, cfg)
    dist_utils.barrier()
    return results


def _model_entry(summary: dict, ev: dict) -> dict:
    return {"knn_top1": ev["knn_top1"], "linear_top1": ev.get("linear_top1"), "epochs": summary["epochs"],
            "steps": summary["steps"], "num_pairs": summary.get("num_pairs", 0)}


def _evaluate(ckpt: Path, cfg: DictConfig) -> dict:
    path = ckpt.parent / "eval.json"
    if path.exists():
        return json.loads(path.read_text())
    result = {"knn_top1": None, "linear_top1": None, "seconds": 0.0}
    if dist_utils.is_main():
        from ..eval.run import knn_from_method, linear_from_method
        from .checkpoint import load_trained

        t0 = time.time()
        method, ecfg, _ = load_trained(ckpt, [f"device={cfg.device}", f"data.root={cfg.data.root}",
                                              f"data.workers={cfg.data.workers}"])
        result["knn_top1"] = knn_from_method(method, ecfg)
        if cfg.run.linear:
            result["linear_top1"] = linear_from_method(method, ecfg)["top1"]
        result["seconds"] = time.time() - t0
        path.write_text(json.dumps(result, indent=2))
    return dist_utils.broadcast_object(result)


def mine_checkpoint(checkpoint: str, cfg: DictConfig, out_dir: Path) -> dict:
    """Mine pairs from a checkpoint's encoder with ``cfg.mine`` settings over ``cfg.data``'s training set."""
    from ..data.datasets import build_dataset
    from ..data.transforms import eval_transform
    from ..mining.run import mine_pairs
    from .checkpoint import file_hash, load_trained
    from .trainer import encoder_for, mine_kwargs

    # every process takes part: embedding and search are sharded under torchrun, rank 0 writes the files
    method, _, ckpt = load_trained(checkpoint, [f"device={cfg.device}", f"data.root={cfg.data.root}"])
    dataset = build_dataset(cfg.data, split=cfg.data.split,
                            transform=eval_transform(cfg.data.image_size, cfg.data.name))
    meta = {"encoder_checkpoint": str(checkpoint), "encoder_sha256": file_hash(checkpoint),
            "encoder_method": ckpt["config"]["method"], "encoder_epoch": ckpt["epoch"],
            "features": cfg.mine.features}
    return mine_pairs(encoder_for(method, cfg.mine.features), dataset,
                      **mine_kwargs(cfg, torch.device(cfg.device)), out_dir=out_dir, meta=meta)


def comparison_table(results: dict) -> str:
    def fmt(v):
        return "—" if v is None else f"{v:.2f}"

    rows = [("model", "epochs", "steps", "kNN top-1", "linear top-1")]
    for name, label in (("baseline", f"{results['method']} baseline"), ("sepp", f"{results['method']} + SePP")):
        r = results[name]
        rows.append((label, str(r["epochs"]), str(r["steps"]), fmt(r["knn_top1"]), fmt(r["linear_top1"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = results["mining"]
    prec = "n/a (no labels)" if m.get("precision") is None else f"{100 * m['precision']:.1f} %"
    lines.append(f"pairs: {m['num_pairs']} (coverage {100 * m['coverage']:.1f} %, label precision {prec})")
    return "\n".join(lines)


def _log(msg: str) -> None:
    if dist_utils.is_main():
        print(f"== {msg}", flush=True)
