"""`sepp run`: the whole SePP experiment in one resumable command.

Phases, each in its own sub-directory of ``out``, keyed by a fingerprint of the settings and inputs that
determine it (:mod:`sepp.engine.phases`): a finished phase with the same fingerprint is reused, an interrupted
one resumes from its ``last.pt``, one whose settings or inputs changed runs again (its old outputs moved to
``out/stale/``), and so does everything downstream of it:

1. ``pretrain/`` — the baseline SSL pretraining that mines the pairs (or ``run.baseline_checkpoint``: any encoder
   file, see :mod:`sepp.models.layouts`);
2. ``mining/``   — semantic positive pairs over the whole training set from that encoder;
3. ``sepp/``     — the same method trained with the pairs as extra positives (from scratch, or from phase 1
   with ``run.init=baseline``);
4. ``baseline/`` — the comparison baseline trained for the same budget as phase 3: the same number of
   optimizer steps (``run.budget=steps``, default: an enlarged epoch has more steps) or epochs; phase 1 is
   reused when it already matches;
5. ``eval``      — ``run.evals`` of every model (kNN, linear probe, fine-tuning, transfer; ``embed.png``), cached
   in each arm's ``eval.json`` under the checkpoint's hash and the evaluation settings; then ``results.json``,
   ``report.md`` and pictures, whose descriptions come from the artifacts used (the checkpoints' configs, the
   pair file's meta), never from the current config.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sepp import distributed as D
from sepp.config import write_config
from sepp.data.pairs import Pairs, load_pairs
from sepp.data.sampling import steps_per_epoch
from sepp.errors import SeppError
from sepp.eval.embed_plot import embed_plot_checkpoints
from sepp.eval.finetune import finetune_checkpoint
from sepp.eval.pairs import pair_cosine
from sepp.eval.run import knn_from_method, linear_from_method
from sepp.eval.stats import SCORES, paired_difference
from sepp.eval.transfer import transfer_checkpoint
from sepp.eval.data import LABEL_EVALS, has_eval_labels, without_labels
from sepp.methods import METHODS
from sepp.methods.checkpoint import file_hash, load_trained
from sepp.mining.encoder import encoder_init, mine_file
from sepp.mining.oracle import diagnostic_line
from sepp.report.curves import plot_curves
from sepp.report.markdown import write_report
from sepp.report.results import ARM, ArmResult, ExperimentResults, comparison_table  # noqa: F401 (cli's import)

from .phases import PHASE_FORMAT, Phase, differences, enter, mark_done, read_json, settings_of, write_json
from .phases import log as _log
from .setup import resolve
from .trainer import pretrain

# what only the evaluation reads (a training phase's kNN monitor uses it too, but is not redone for it)
EVAL_KEYS = ("eval", "transfer", "data.eval_split", "data.eval_subset", "data.eval_train_split")


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


@lru_cache(maxsize=32)
def _hash(path: str, mtime_ns: int, size: int) -> str:
    return file_hash(path)


def _file_hash(path) -> str:
    """SHA-256 (16 hex digits) of a file, computed once per version of it (path, time and size)."""
    st = Path(path).stat()
    return _hash(str(path), st.st_mtime_ns, st.st_size)


def _train_fingerprint(c: DictConfig, init: str | None, pairs: Pairs | None) -> dict:
    """What a training phase reads: its config without the evaluation, mining (unless it re-mines), run and
    other methods' keys, the pair file's digest instead of its path, and the initial weights' hash."""
    drop = ["run", "sepp.pairs", *EVAL_KEYS, *(m for m in METHODS if m != c.method)]
    if not c.sepp.remine_every:
        drop.append("mine")
    if pairs is None:
        drop += ["sepp.mode", "sepp.p"]  # read only with pairs
    fp = settings_of(c, drop=tuple(drop))
    if c.sepp.remine_every:  # a mine.* key on the command line wins over the pair file's when re-mining
        fp["mine keys on the command line"] = sorted(o.split("=", 1)[0] for o in c.command_line
                                                      if o.startswith("mine."))
    return {**fp, "pair file": pairs.digest() if pairs is not None else None,
            "initial weights": _file_hash(init) if init else "scratch", "format": PHASE_FORMAT}


def _train(c: DictConfig, title: str, progress: bool, out: Path, init: str | None = None,
           pairs: Pairs | None = None) -> dict:
    """Train one phase (``c.out``) unless its fingerprint says it is done; ``init``: the checkpoint whose
    weights it starts from."""
    path = Path(c.out)
    done = enter(Phase(path, title, _train_fingerprint(c, init, pairs)), out, c.run.reuse)
    if done is not None:
        return done
    t0 = time.time()
    summary = pretrain(c, progress=progress, init_state=_init_state(init, c) if init else None)
    summary["seconds"] = time.time() - t0  # of this invocation: a resumed phase counts what it ran now
    return mark_done(path, summary)


def _init_state(path: str, cfg: DictConfig):
    """The arms' initial weights from phase 1's file: any encoder file (heads fresh unless it is a sepp
    checkpoint of the same method; see :func:`sepp.mining.encoder.encoder_init`)."""
    return encoder_init(path, cfg)[0]


def run_experiment(cfg: DictConfig, progress: bool = True) -> dict:
    """The five phases of the module docstring; returns the results (also in ``results.json``)."""
    cfg = without_labels(resolve(cfg), evals=True)
    out = Path(cfg.out)
    write_config(cfg, out)
    seeds = [int(x) for x in cfg.run.seeds] or [int(cfg.seed)]
    seconds: dict = {}
    phase1, phase1_ckpt = _baseline_phase(cfg, out, progress, seconds)
    pairs, stats = _mining_phase(cfg, out, phase1_ckpt, seconds)

    # 3.-5. per seed: SePP, the step-matched baseline, the compute-matched control; evaluation
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        where = out if len(seeds) == 1 else out / f"seed_{seed}"
        for name, entry in _seed_arms(cfg, seed, where, out, phase1, phase1_ckpt, pairs, progress).items():
            runs.setdefault(name, []).append(entry)
            seconds[name] = seconds.get(name, 0.0) + entry.pop("train_seconds")
    seconds["eval"] = sum(e["eval_seconds"] for entries in runs.values() for e in entries)
    results = _results(cfg, out, seeds, runs, pairs, stats, seconds)
    if D.is_main():
        _write_outputs(cfg, out, results, runs, stats)
    D.barrier()
    return _as_json(cfg, results)


def _baseline_phase(cfg: DictConfig, out: Path, progress: bool, seconds: dict) -> tuple:
    """1. baseline pretraining (mines the pairs), with cfg.seed; ``(summary or None, its checkpoint)``."""
    if cfg.run.baseline_checkpoint:  # any encoder file; its backbone must fit cfg.model when arms start from it
        if cfg.run.init == "baseline":
            _init_state(str(cfg.run.baseline_checkpoint), cfg)
        return None, str(cfg.run.baseline_checkpoint)
    c = _phase_cfg(cfg, out / "pretrain", cfg.run.baseline_epochs or cfg.train.epochs)
    phase1 = _train(c, "phase 1/5 (baseline pretraining)", progress, out)
    seconds["pretrain"] = phase1["seconds"]
    return phase1, str(out / "pretrain" / "last.pt")


def _mining_phase(cfg: DictConfig, out: Path, encoder: str, seconds: dict) -> tuple[Pairs, dict]:
    """2. mining (once; every seed trains with the same pairs); returns the pairs and their statistics."""
    path = out / "mining"
    title = "phase 2/5 (mining)" + (f", DIAGNOSTIC: mine.oracle={cfg.mine.oracle}" if cfg.mine.oracle != "none"
                                    else "")
    fp = {**settings_of(cfg, keep=("mine", "data", "seed", "device"), drop=EVAL_KEYS),
          "encoder": _file_hash(encoder), "format": PHASE_FORMAT}
    done = enter(Phase(path, title, fp), out, cfg.run.reuse)
    if done is None:
        t0 = time.time()
        pairs, stats = mine_file(encoder, cfg, path)
        done = mark_done(path, {"stats": stats, "seconds": time.time() - t0})
    else:
        pairs = load_pairs(path / "pairs.npz")
    seconds["mining"] = done["seconds"]
    return pairs, done["stats"]


def _seed_arms(cfg, seed: int, where: Path, out: Path, phase1, phase1_ckpt: str, pairs: Pairs,
               progress: bool) -> dict:
    """Train and evaluate the compared arms of one seed: ``sepp``, ``baseline`` (same budget) and, when the
    SePP arm forwards more views per step, ``control`` (the baseline with as many views of the image)."""
    init = phase1_ckpt if cfg.run.init == "baseline" else None
    sepp_cfg = _phase_cfg(cfg, where / "sepp", cfg.run.sepp_epochs or cfg.train.epochs, seed=seed, **{
        "sepp.pairs": str(out / "mining" / "pairs.npz"), "sepp.remine_every": cfg.sepp.remine_every})
    sepp_run = _train(sepp_cfg, f"phase 3/5 (seed {seed}): SePP training with {len(pairs)} pairs ({cfg.sepp.mode})",
                      progress, out, init, pairs)
    trained = {"sepp": (sepp_run, where / "sepp"), **_matched_arms(cfg, seed, where, out, phase1, sepp_run, init,
                                                                   progress)}
    _log(f"phase 5/5 (seed {seed}): evaluation ({', '.join(cfg.run.evals)})")
    arms = {}
    for name, (summary, d) in trained.items():
        ev = _evaluate(d / "last.pt", cfg, pairs, out / "mining" / "pairs.npz", f"{d.relative_to(out)}")
        arms[name] = {**{key: ev.get(key) for key, _ in SCORES.values()}, "pair_cosine": ev["pair_cosine"],
                      "model": ev["model"], "epochs": summary["epochs"], "steps": summary["steps"],
                      "num_pairs": summary.get("num_pairs", 0), "num_images": summary["num_images"],
                      "views": summary.get("views", 2), "images_forwarded": summary.get("images_forwarded"),
                      "dir": str(d), "seed": seed, "train_seconds": summary["seconds"],
                      "eval_seconds": ev["seconds"]}
    return arms


def _matched_arms(cfg, seed: int, where: Path, out: Path, phase1, sepp_run: dict, init, progress: bool) -> dict:
    """4. the baseline for the SePP arm's budget (phase 1 when it already has it) and the control."""
    if cfg.run.budget == "steps":
        world = D.get_world_size()
        per_epoch = steps_per_epoch(sepp_run["num_images"], world, cfg.train.batch_size // world)
        b_epochs, b_steps = math.ceil(sepp_run["steps"] / per_epoch), sepp_run["steps"]
    else:
        b_epochs, b_steps = cfg.run.sepp_epochs or cfg.train.epochs, 0
    views = int(cfg.train.views)
    if (phase1 is not None and cfg.run.init == "scratch" and seed == cfg.seed and views == 2
            and phase1["epochs"] == b_epochs and (b_steps == 0 or phase1["steps"] == b_steps)):
        _log("phase 4/5: the phase-1 baseline already has the SePP model's budget; reusing it")
        trained = {"baseline": ({**phase1, "seconds": 0.0}, out / "pretrain")}
    else:
        c = _phase_cfg(cfg, where / "baseline", b_epochs, seed=seed, **{"train.max_steps": b_steps})
        title = f"phase 4/5 (seed {seed}): baseline for the same budget ({b_epochs} epochs, {b_steps or 'all'} steps)"
        trained = {"baseline": (_train(c, title, progress, out, init), where / "baseline")}
    if b_steps and trained["baseline"][0]["steps"] != b_steps:
        raise SeppError(f"the baseline in {trained['baseline'][1]} has {trained['baseline'][0]['steps']} steps but "
                        f"the SePP arm {b_steps}; remove that directory so it is trained for the same budget")
    if cfg.run.control and sepp_run.get("views", 2) > views:
        c = _phase_cfg(cfg, where / "control", b_epochs, seed=seed,
                       **{"train.max_steps": b_steps, "train.views": sepp_run["views"]})
        title = (f"phase 4/5 (seed {seed}): control with {sepp_run['views']} views of the image itself "
                 "(the SePP arm's compute per step)")
        trained["control"] = (_train(c, title, progress, out, init), where / "control")
    return trained


def _eval_settings(cfg: DictConfig) -> dict:
    """The settings the evaluation reads: they override the checkpoint's own (which are those it was trained
    with), so changing them re-evaluates without retraining."""
    keep = EVAL_KEYS if "transfer" in cfg.run.evals else tuple(k for k in EVAL_KEYS if k != "transfer")
    return {"device": cfg.device, **settings_of(cfg, keep=keep)}


def _evaluate(ckpt: Path, cfg: DictConfig, pairs: Pairs, pairs_path: Path, title: str) -> dict:
    """The run's evaluations (``run.evals`` but embed_plot) of one trained arm, cached in ``eval.json`` under
    the checkpoint's hash and the evaluation settings (the pair cosine per pair file); returns the scores,
    the pair cosine of ``pairs``, the checkpoint's description and the seconds spent now."""
    path = ckpt.parent / "eval.json"
    fp = {**_eval_settings(cfg), "checkpoint": _file_hash(ckpt), "format": PHASE_FORMAT}
    cached = read_json(path) or {}
    if cached.get("fingerprint") != fp:
        if cached:
            why = differences(cached["fingerprint"], fp) if cached.get("fingerprint") else "no fingerprint"
            _log(f"evaluation of {title}: {why}: evaluating again")
        cached = {"fingerprint": fp, "pair_cosine": {}}
    todo = [e for e in cfg.run.evals if e in SCORES and cached.get(SCORES[e][0]) is None]
    digest = pairs.digest()
    t0 = time.time()
    if D.is_main() and (todo or digest not in cached["pair_cosine"] or "model" not in cached):
        cached.update(_compute(ckpt, cfg, todo, pairs_path if digest not in cached["pair_cosine"] else None))
        if "new_pair_cosine" in cached:
            cached["pair_cosine"][digest] = {**cached.pop("new_pair_cosine"), **_diagnostic(pairs.meta)}
        write_json(path, cached)
    cached = D.broadcast_object(cached)
    return {**cached, "pair_cosine": cached["pair_cosine"].get(digest), "seconds": time.time() - t0}


def _compute(ckpt: Path, cfg: DictConfig, todo: list[str], pairs_path: Path | None) -> dict:
    """The evaluations ``todo`` of a checkpoint, the pair cosine over ``pairs_path`` (when given) and the
    checkpoint's description (main process)."""
    settings = _eval_settings(cfg)
    overrides = [f"data.root={cfg.data.root}", f"data.workers={cfg.data.workers}",
                 *(f"{key}={json.dumps(value)}" for key, value in settings.items())]
    method, ecfg, raw = load_trained(ckpt, overrides)
    memo: dict = {}  # this arm's features, extracted once for kNN, the linear probe and the pair cosine
    trained_with = raw.get("pairs")
    result = {"model": describe_checkpoint(raw), **_diagnostic(trained_with.meta if trained_with is not None else {})}
    if "knn" in todo:
        result["knn_top1"] = knn_from_method(method, ecfg, memo)
    if "linear" in todo:
        result["linear_top1"] = linear_from_method(method, ecfg, memo)["top1"]
    if "finetune" in todo:
        result["finetune_top1"] = finetune_checkpoint(str(ckpt), overrides,
                                                      out=str(ckpt.parent / "finetune.json"))["finetune_top1"]
    if "transfer" in todo:
        result["transfer_score"] = transfer_checkpoint(str(ckpt), overrides,
                                                       out=str(ckpt.parent / "transfer.json"))["transfer_score"]
    if pairs_path is not None:
        result["new_pair_cosine"] = pair_cosine(method.backbone, ecfg, pairs_path, memo=memo)
    return result


def _diagnostic(meta: dict) -> dict:
    """``{"diagnostic": line}`` when pairs with this meta came from the labels (``mine.oracle``), else ``{}``."""
    oracle = meta.get("oracle", "none")
    return {} if oracle == "none" else {"diagnostic": diagnostic_line(oracle, meta.get("oracle_precision"))}


def describe_checkpoint(ckpt: dict) -> dict:
    """What a trained arm is, read from its checkpoint: method, backbone, data, budget and, when it trained
    with pairs, how they were used and made (the pairs' meta)."""
    c, pairs = ckpt["config"], ckpt.get("pairs")
    out = {"method": c["method"], "backbone": c["model"]["backbone"], "dataset": c["data"]["name"],
           "device": c["device"], "seed": c["seed"], "lr": c["train"]["lr"], "views": c["train"]["views"],
           "epoch": ckpt["epoch"], "step": ckpt["step"]}
    if pairs is not None:
        out.update(mode=c["sepp"]["mode"], mask_negatives=bool(c["sepp"]["mask_negatives"]),
                   batch_positives=bool(c["sepp"]["batch_positives"]), num_pairs=len(pairs),
                   pairs={k: pairs.meta.get(k) for k in ("k", "threshold", "mutual", "rank_from", "features",
                                                         "oracle", "oracle_precision", "mined_at_epoch")})
    return out


def _results(cfg: DictConfig, out: Path, seeds: list, runs: dict, pairs: Pairs, stats: dict,
             seconds: dict) -> ExperimentResults:
    """``results.json``: every arm over its seeds, the mining summary and the paired SePP differences, each
    described by the artifacts it came from."""
    model = runs["sepp"][0]["model"]
    fp = read_json(Path(runs["sepp"][0]["dir"]) / "fingerprint.json") or {}
    setting = {"mode": model.get("mode"), "init": "scratch" if fp.get("initial weights") == "scratch" else "baseline",
               "mask_negatives": model.get("mask_negatives"), "batch_positives": model.get("batch_positives")}
    arms = {name: ArmResult.from_runs(entries, setting if name == "sepp" else None) for name, entries in runs.items()}
    scored = [m for m in SCORES if m in cfg.run.evals]
    difference = {f"sepp-{other}": {m: paired_difference(arms["sepp"].scores[m]["values"],
                                                         arms[other].scores[m]["values"]) for m in scored}
                  for other in ("baseline", "control") if other in arms}
    return ExperimentResults(
        dataset=model["dataset"], method=model["method"], backbone=model["backbone"],
        num_images=runs["sepp"][0]["num_images"], device=model["device"], world_size=D.get_world_size(),
        seeds=seeds, out=str(out), arms=arms, mining=_mining_summary(pairs, stats), budget=cfg.run.budget,
        seconds=seconds, evals=list(cfg.run.evals), difference=difference,
        diagnostic=_diagnostic(pairs.meta).get("diagnostic"))


def _mining_summary(pairs: Pairs, stats: dict) -> dict:
    """``results.json``'s ``mining``: the pair file's settings (its meta) and statistics (its mining.json;
    without labels no precision at all)."""
    m = pairs.meta
    oracle, encoder = m.get("oracle", "none"), m.get("encoder_checkpoint")
    return {**{k: stats[k] for k in ("num_pairs", "coverage", "precision", "num_images") if k in stats},
            **{k: m.get(k) for k in ("k", "threshold", "mutual", "rank_from", "features")}, "oracle": oracle,
            "oracle_precision": m.get("oracle_precision") if oracle == "random" else None,
            "encoder": encoder, "encoder_sha256": file_hash(encoder, 64) if encoder and Path(encoder).is_file()
            else None, "pair_sim": stats.get("sim")}


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


def _write_outputs(cfg: DictConfig, out: Path, results: ExperimentResults, runs: dict, stats: dict) -> None:
    """results.json, the mining pictures, curves.png, embed.png and report.md (main process); a picture of an
    earlier run that this one does not make is removed."""
    for name in ("pairs_gallery.png", "similarity_hist.png", "pairs.html"):
        if (out / "mining" / name).exists():
            shutil.copyfile(out / "mining" / name, out / name)
        else:
            (out / name).unlink(missing_ok=True)
    plot_curves({ARM[n].label: [Path(e["dir"]) / "metrics.csv" for e in entries] for n, entries in runs.items()},
                out / "curves.png")
    results.embed_plot = _embed_pictures(cfg, runs, out)
    if results.embed_plot is None:
        (out / "embed.png").unlink(missing_ok=True)
    data = _as_json(cfg, results)
    (out / "results.json").write_text(json.dumps(data, indent=2))
    write_report(out, data, stats)


def _as_json(cfg: DictConfig, results: ExperimentResults) -> dict:
    """The results.json layout; without evaluation labels no label-dependent number at all, not even null."""
    data = results.to_dict()
    if not has_eval_labels(cfg):
        _drop_label_numbers(data)
    return data


def _embed_pictures(cfg: DictConfig, runs: dict, out: Path) -> str | None:
    """``embed.png``: 2-D embeddings of the evaluation split, the first seed's arms side by side."""
    if "embed_plot" not in cfg.run.evals or not D.is_main():
        return None
    ckpts = {ARM[n].label: str(Path(entries[0]["dir"]) / "last.pt") for n, entries in runs.items()}
    embed_plot_checkpoints(ckpts, [f"device={cfg.device}", f"data.root={cfg.data.root}"], out=str(out / "embed.png"))
    return "embed.png"
