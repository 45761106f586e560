"""`sepp run`: the whole SePP experiment in one resumable command.

Phases, each in its own sub-directory of ``out`` and skipped when its ``done.json`` exists (an interrupted
phase resumes from its ``last.pt``):

1. ``pretrain/`` — the baseline SSL pretraining that mines the pairs (or ``run.baseline_checkpoint``: any encoder
   file, see :mod:`sepp.models.layouts`);
2. ``mining/``   — semantic positive pairs over the whole training set from that encoder;
3. ``sepp/``     — the same method trained with the pairs as extra positives (from scratch, or from phase 1
   with ``run.init=baseline``);
4. ``baseline/`` — the comparison baseline trained for the same budget as phase 3: the same number of
   optimizer steps (``run.budget=steps``, default: an enlarged epoch has more steps) or epochs; phase 1 is
   reused when it already matches;
5. ``eval``      — ``run.evals`` of every model (kNN, linear probe, fine-tuning, transfer; ``embed.png``), then
   ``results.json``, ``report.md`` and pictures.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sepp import distributed as dist_utils
from sepp.data.sampling import steps_per_epoch
from sepp.errors import SeppError
from sepp.eval.embed_plot import embed_plot_checkpoints
from sepp.eval.finetune import finetune_checkpoint
from sepp.eval.pairs import pair_cosine
from sepp.eval.run import knn_from_method, linear_from_method
from sepp.eval.stats import SCORES, format_difference, format_mean_std, paired_difference, summarize
from sepp.eval.transfer import transfer_checkpoint
from sepp.eval.data import LABEL_EVALS, has_eval_labels, without_labels
from sepp.methods.checkpoint import file_hash, load_trained
from sepp.mining.encoder import encoder_init, mine_file
from sepp.report.curves import plot_curves
from sepp.report.markdown import write_report

from .setup import resolve
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
    # sepp.mask_negatives stays as configured for every arm: without pairs it only masks an anchor's own
    # image (MoCo's queue holds last epoch's key of almost every image), so the arms differ by the pairs alone
    # sepp.batch_positives without pairs would make an image's own older queue key (MoCo) a positive; the
    # arms without pairs mask it instead (the SePP arm counts it as a positive, next to its partners' views)
    for key, value in extra.items():
        OmegaConf.update(c, key, value, merge=False)
    if c.sepp.batch_positives and not c.sepp.pairs:
        c.sepp.batch_positives, c.sepp.mask_negatives = False, True
    return c


def _train(cfg: DictConfig, out: Path, progress: bool, init_state=None) -> dict:
    done = _done(out)
    if done is not None:
        return done
    t0 = time.time()
    summary = pretrain(cfg, progress=progress, init_state=init_state)
    summary["seconds"] = time.time() - t0  # of this invocation: a resumed phase counts what it ran now
    return _mark(out, summary)


def _init_state(path: str, cfg: DictConfig):
    """The arms' initial weights from phase 1's file: any encoder file (heads fresh unless it is a sepp
    checkpoint of the same method; see :func:`sepp.mining.encoder.encoder_init`)."""
    return encoder_init(path, cfg)[0]


def run_experiment(cfg: DictConfig, progress: bool = True) -> dict:
    """The five phases of the module docstring; returns the results (also in ``results.json``)."""
    cfg = without_labels(resolve(cfg), evals=True)
    out = Path(cfg.out)
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    seeds = [int(x) for x in cfg.run.seeds] or [int(cfg.seed)]
    seconds: dict = {}
    phase1, phase1_ckpt = _baseline_phase(cfg, out, progress, seconds)
    stats = _mining_phase(cfg, out, phase1_ckpt, seconds)

    # 3.-5. per seed: SePP, the step-matched baseline, the compute-matched control; evaluation
    arms: dict[str, list[dict]] = {}
    for seed in seeds:
        where = out if len(seeds) == 1 else out / f"seed_{seed}"
        for name, entry in _seed_arms(cfg, seed, where, out, phase1, phase1_ckpt, stats, progress).items():
            arms.setdefault(name, []).append(entry)
            seconds[name] = seconds.get(name, 0.0) + entry.pop("train_seconds")
    seconds["eval"] = sum(e["eval_seconds"] for runs in arms.values() for e in runs)
    results = _results(cfg, out, seeds, arms, stats, phase1_ckpt, seconds)
    if dist_utils.is_main():
        _write_outputs(cfg, out, results, arms, stats)
    dist_utils.barrier()
    return results


def _baseline_phase(cfg: DictConfig, out: Path, progress: bool, seconds: dict) -> tuple:
    """1. baseline pretraining (mines the pairs), with cfg.seed; ``(summary or None, its checkpoint)``."""
    if cfg.run.baseline_checkpoint:  # any encoder file; its backbone must fit cfg.model when arms start from it
        if cfg.run.init == "baseline":
            _init_state(str(cfg.run.baseline_checkpoint), cfg)
        return None, str(cfg.run.baseline_checkpoint)
    _log("phase 1/5: baseline pretraining")
    phase1 = _train(_phase_cfg(cfg, out / "pretrain", cfg.run.baseline_epochs or cfg.train.epochs),
                    out / "pretrain", progress)
    seconds["pretrain"] = phase1["seconds"]
    return phase1, str(out / "pretrain" / "last.pt")


def _mining_phase(cfg: DictConfig, out: Path, phase1_ckpt: str, seconds: dict) -> dict:
    """2. mining (once; every seed trains with the same pairs); returns the mining statistics."""
    _log("phase 2/5: mining semantic positive pairs" + (f" (DIAGNOSTIC: mine.oracle={cfg.mine.oracle})"
                                                        if cfg.mine.oracle != "none" else ""))
    mining = _done(out / "mining")
    if mining is None:
        t0 = time.time()
        stats = mine_file(phase1_ckpt, cfg, out / "mining")
        mining = _mark(out / "mining", {"stats": stats, "seconds": time.time() - t0})
    seconds["mining"] = mining["seconds"]
    return mining["stats"]


def _results(cfg: DictConfig, out: Path, seeds: list, arms: dict, stats: dict, phase1_ckpt: str,
             seconds: dict) -> dict:
    """``results.json``: every arm over its seeds, the mining summary and the paired SePP differences."""
    results = {
        **({"diagnostic": stats["diagnostic"]} if stats.get("diagnostic") else {}),
        "dataset": cfg.data.name, "method": cfg.method, "backbone": cfg.model.backbone,
        "num_images": arms["sepp"][0]["num_images"], "device": cfg.device,
        "world_size": dist_utils.get_world_size(), "seeds": seeds, "out": str(out),
        **{name: _aggregate(runs) for name, runs in arms.items()},
        "mining": {**{k: stats[k] for k in ("num_pairs", "coverage", "precision", "num_images") if k in stats},
                   "k": cfg.mine.k, "threshold": cfg.mine.threshold, "mutual": cfg.mine.mutual,
                   "rank_from": cfg.mine.rank_from, "features": cfg.mine.features, "oracle": cfg.mine.oracle,
                   "oracle_precision": cfg.mine.oracle_precision if cfg.mine.oracle == "random" else None,
                   "encoder": phase1_ckpt, "encoder_sha256": file_hash(phase1_ckpt, 64),
                   "pair_sim": stats.get("sim")},
        "budget": cfg.run.budget,
        "seconds": seconds,
    }
    results["sepp"].update(mode=cfg.sepp.mode, init=cfg.run.init, mask_negatives=bool(cfg.sepp.mask_negatives),
                           batch_positives=bool(cfg.sepp.batch_positives))
    scored = [m for m in SCORES if m in cfg.run.evals]
    results["evals"] = list(cfg.run.evals)
    if not has_eval_labels(cfg):  # no label-dependent number at all, not even a null one
        _drop_label_numbers(results)
    results["difference"] = {f"sepp-{other}": {m: paired_difference(results["sepp"][m]["values"],
                                                                      results[other][m]["values"])
                                                 for m in scored}
                             for other in ("baseline", "control") if other in results}
    return results


def _drop_label_numbers(results: dict) -> None:
    """Remove every label-dependent score (kNN, linear, fine-tuning) from each arm of ``results``."""
    label_scores = [name for name in SCORES if name in LABEL_EVALS]
    for name in ("sepp", "baseline", "control"):
        arm = results.get(name)
        for score in label_scores if arm else ():
            arm.pop(score)
            arm.pop(SCORES[score][0])
            for run in arm["runs"]:
                run.pop(SCORES[score][0])


def _write_outputs(cfg: DictConfig, out: Path, results: dict, arms: dict, stats: dict) -> None:
    """results.json, the mining pictures, curves.png, embed.png and report.md (main process)."""
    (out / "results.json").write_text(json.dumps(results, indent=2))
    for name in ("pairs_gallery.png", "similarity_hist.png", "pairs.html"):
        if (out / "mining" / name).exists():
            shutil.copyfile(out / "mining" / name, out / name)
    labels = {"sepp": "SePP", "baseline": "baseline", "control": "control (extra views)"}
    plot_curves({labels[n]: [Path(e["dir"]) / "metrics.csv" for e in runs] for n, runs in arms.items()},
                out / "curves.png")
    results["embed_plot"] = _embed_pictures(cfg, arms, out)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_report(out, results, stats, cfg)


def _seed_arms(cfg, seed: int, where: Path, out: Path, phase1, phase1_ckpt: str, stats: dict,
               progress: bool) -> dict:
    """Train and evaluate the compared arms of one seed: ``sepp``, ``baseline`` (same budget) and, when the
    SePP arm forwards more views per step, ``control`` (the baseline with as many views of the image)."""
    init = _init_state(phase1_ckpt, cfg) if cfg.run.init == "baseline" else None
    sepp_epochs = cfg.run.sepp_epochs or cfg.train.epochs
    _log(f"phase 3/5 (seed {seed}): SePP training with {stats['num_pairs']} pairs ({cfg.sepp.mode})")
    sepp_cfg = _phase_cfg(cfg, where / "sepp", sepp_epochs, seed=seed, **{
        "sepp.pairs": str(out / "mining" / "pairs.npz"), "sepp.remine_every": cfg.sepp.remine_every})
    sepp_run = _train(sepp_cfg, where / "sepp", progress, init)
    trained = {"sepp": (sepp_run, where / "sepp")}

    if cfg.run.budget == "steps":
        world = dist_utils.get_world_size()
        per_epoch = steps_per_epoch(sepp_run["num_images"], world, cfg.train.batch_size // world)
        b_epochs, b_steps = math.ceil(sepp_run["steps"] / per_epoch), sepp_run["steps"]
    else:
        b_epochs, b_steps = sepp_epochs, 0
    views = int(cfg.train.views)
    reuse = (phase1 is not None and cfg.run.init == "scratch" and seed == cfg.seed and views == 2
             and phase1["epochs"] == b_epochs and (b_steps == 0 or phase1["steps"] == b_steps))
    if reuse:
        _log("phase 4/5: the phase-1 baseline already has the SePP model's budget; reusing it")
        trained["baseline"] = ({**phase1, "seconds": 0.0}, out / "pretrain")
    else:
        _log(f"phase 4/5 (seed {seed}): baseline for the same budget ({b_epochs} epochs, {b_steps or 'all'} steps)")
        arm = _phase_cfg(cfg, where / "baseline", b_epochs, seed=seed, **{"train.max_steps": b_steps})
        trained["baseline"] = (_train(arm, where / "baseline", progress, init), where / "baseline")
    if b_steps and trained["baseline"][0]["steps"] != b_steps:
        raise SeppError(f"the baseline in {trained['baseline'][1]} has {trained['baseline'][0]['steps']} steps but "
                        f"the SePP arm {b_steps}; remove that directory so it is trained for the same budget")
    if cfg.run.control and sepp_run.get("views", 2) > views:
        _log(f"phase 4/5 (seed {seed}): control with {sepp_run['views']} views of the image itself "
             "(the SePP arm's compute per step)")
        arm = _phase_cfg(cfg, where / "control", b_epochs, seed=seed,
                         **{"train.max_steps": b_steps, "train.views": sepp_run["views"]})
        trained["control"] = (_train(arm, where / "control", progress, init), where / "control")

    _log(f"phase 5/5 (seed {seed}): evaluation ({', '.join(cfg.run.evals)})")
    arms = {}
    for name, (summary, d) in trained.items():
        ev = _evaluate(d / "last.pt", cfg, out / "mining" / "pairs.npz")
        arms[name] = {**{key: ev.get(key) for key, _ in SCORES.values()}, "pair_cosine": ev.get("pair_cosine"),
                      "epochs": summary["epochs"], "steps": summary["steps"],
                      "num_pairs": summary.get("num_pairs", 0), "num_images": summary["num_images"],
                      "views": summary.get("views", 2), "images_forwarded": summary.get("images_forwarded"),
                      "dir": str(d), "seed": seed, "train_seconds": summary["seconds"],
                      "eval_seconds": ev["seconds"]}
    return arms


def _aggregate(runs: list[dict]) -> dict:
    """One arm over its seeds: ``knn_top1``/``linear_top1`` are the means (what the table prints), ``knn`` and
    ``linear`` their statistics, ``runs`` each seed's entry."""
    stats = {name: summarize([r[key] for r in runs]) for name, (key, _) in SCORES.items()}
    first = runs[0]
    return {**{key: stats[name]["mean"] for name, (key, _) in SCORES.items()}, **stats,
            "epochs": first["epochs"], "steps": first["steps"], "num_pairs": first["num_pairs"],
            "views": first["views"], "images_forwarded": first["images_forwarded"],
            "dir": first["dir"],
            "pair_cosine": summarize([(r.get("pair_cosine") or {}).get("pairs") for r in runs])["mean"],
            "random_pair_cosine": summarize([(r.get("pair_cosine") or {}).get("random") for r in runs])["mean"],
            "runs": [{k: r.get(k) for k in ("seed", *(key for key, _ in SCORES.values()), "pair_cosine", "dir")}
                     for r in runs]}


def _evaluate(ckpt: Path, cfg: DictConfig, pairs_path: Path | None = None) -> dict:
    """The run's evaluations (``run.evals`` but embed_plot) of one trained arm, cached in ``eval.json``."""
    path = ckpt.parent / "eval.json"
    wanted = [e for e in cfg.run.evals if e in SCORES]
    if path.exists():
        cached = json.loads(path.read_text())
        if all(cached.get(SCORES[e][0]) is not None for e in wanted):  # a later run may want more evals
            return cached
    result = {SCORES[e][0]: None for e in SCORES}
    result.update(pair_cosine=None, seconds=0.0)
    if dist_utils.is_main():
        t0 = time.time()
        overrides = [f"device={cfg.device}", f"data.root={cfg.data.root}", f"data.workers={cfg.data.workers}"]
        method, ecfg, _ = load_trained(ckpt, overrides)
        memo: dict = {}  # this arm's features, extracted once for kNN, the linear probe and the pair cosine
        if "knn" in wanted:
            result["knn_top1"] = knn_from_method(method, ecfg, memo)
        if "linear" in wanted:
            result["linear_top1"] = linear_from_method(method, ecfg, memo)["top1"]
        if "finetune" in wanted:
            result["finetune_top1"] = finetune_checkpoint(str(ckpt), overrides,
                                                          out=str(ckpt.parent / "finetune.json"))["finetune_top1"]
        if "transfer" in wanted:
            result["transfer_score"] = transfer_checkpoint(str(ckpt), overrides,
                                                           out=str(ckpt.parent / "transfer.json"))["transfer_score"]
        if pairs_path is not None and pairs_path.exists():
            result["pair_cosine"] = pair_cosine(method.backbone, ecfg, pairs_path, memo=memo)
        result["seconds"] = time.time() - t0
        path.write_text(json.dumps(result, indent=2))
    return dist_utils.broadcast_object(result)


def _embed_pictures(cfg: DictConfig, arms: dict, out: Path) -> str | None:
    """``embed.png``: 2-D embeddings of the evaluation split, the first seed's arms side by side."""
    if "embed_plot" not in cfg.run.evals or not dist_utils.is_main():
        return None
    labels = {"baseline": "baseline", "control": "control", "sepp": "SePP"}
    ckpts = {labels[n]: str(Path(runs[0]["dir"]) / "last.pt") for n, runs in arms.items()}
    embed_plot_checkpoints(ckpts, [f"device={cfg.device}", f"data.root={cfg.data.root}"], out=str(out / "embed.png"))
    return "embed.png"


def comparison_table(results: dict) -> str:
    """The terminal table of `sepp run`: each arm's kNN and linear top-1 (mean ± std over seeds), and the
    SePP − other differences with their 95 % intervals."""
    method = results["method"]
    names = [("baseline", f"{method} baseline"), ("control", f"{method} control (same views as SePP)"),
             ("sepp", f"{method} + SePP")]
    scored = [m for m in SCORES if m in results.get("evals", ["knn", "linear"])]
    rows = [("model", "epochs", "steps", "images fwd", *(SCORES[m][1] for m in scored))]
    for name, label in names:
        if name in results:
            r = results[name]
            rows.append((label, str(r["epochs"]), str(r["steps"]), str(r.get("images_forwarded", "—")),
                         *(format_mean_std(r[m]) for m in scored)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if results.get("diagnostic"):
        lines.insert(0, results["diagnostic"])
    for key, d in [(k, d) for k, d in results.get("difference", {}).items() if d]:
        n = next(iter(d.values()))["n"]
        lines.append(f"{key.replace('sepp-', 'SePP - ')}: " + ", ".join(
            f"{SCORES[m][1].split(' ')[0]} {format_difference(v)}" for m, v in d.items()) + f" ({n} seed(s), paired)")
    m = results["mining"]
    prec = "" if m.get("precision") is None else f", label precision {100 * m['precision']:.1f} %"
    lines.append(f"pairs: {m['num_pairs']} (coverage {100 * m['coverage']:.1f} %{prec})")
    return "\n".join(lines)


def _log(msg: str) -> None:
    if dist_utils.is_main():
        print(f"== {msg}", flush=True)
