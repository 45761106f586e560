"""Continue SSL training from one encoder with several pair files against the step-matched baseline.

The setting of issue 15: every arm starts from the same encoder (a sepp checkpoint), trains for ``--steps``
optimizer steps with the same seed list, and is evaluated by kNN and the linear probe on the test split and
by kNN on the held-out *choice* images of the training split (the same fixed 10 % as
``benchmarks/pair_rules.py``; memory bank = the other 90 %): settings are chosen on that choice score, the
test score is reported. Arms:

- ``baseline``: no pairs (negatives of the anchor's own image masked when the pair arms mask theirs);
- ``control``: the baseline with 3 views per step (only when some arm uses ``sepp.mode=multi``);
- ``NAME=PAIRS.npz[,key=value...]``: an arm trained with that pair file and extra config keys.

    python benchmarks/continuation.py --encoder logs/enc1_50k_s0.pt --steps 390 --seeds 0,1,2 \
        --arm mined=logs/pairs/e1_nn30.npz,sepp.mode=enlarge --out logs/cont_e1 [key=value ...]

Each arm's folder holds ``args.json`` (what it was trained with; a different one stops with an error
instead of mixing results) and ``eval.json``; finished arms are reused. Writes ``continuation.json`` and
``continuation.md`` (mean ± std per arm, paired differences to the baseline with 95 % t intervals).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sepp.config import load_config
from sepp.data.pairs import load_pairs
from sepp.engine.trainer import pretrain
from sepp.errors import SeppError
from sepp.eval.data import eval_data, features
from sepp.eval.knn import knn_top1
from sepp.eval.run import knn_from_method, linear_from_method
from sepp.eval.stats import format_difference, format_mean_std, paired_difference, summarize
from sepp.methods.checkpoint import file_hash, load_checkpoint, load_trained

CHOICE_SEED, CHOICE_FRACTION = 12345, 0.1  # as benchmarks/pair_rules.py
SCORES = ("knn_top1", "linear_top1", "choice_knn_top1")


def arm_overrides(args, name: str, spec: str | None, seed: int, out: Path) -> list[str]:
    common = [f"seed={seed}", f"out={out}", "train.resume=true", f"train.max_steps={args.steps}",
              "train.epochs=1000", f"train.warmup_epochs={args.warmup_epochs}", "train.save_every=0",
              "train.knn_every=-1", "run.seeds=[]", *args.overrides]
    if spec is None:
        views = 3 if name == "control" else 2
        return common + ["sepp.pairs=null", "sepp.batch_positives=false", f"train.views={views}"]
    path, *extra = spec.split(",")
    return common + [f"sepp.pairs={path}", *extra]


def choice_knn(method, cfg, memo: dict) -> float:
    """kNN top-1 on the held-out choice images of the training split (memory: the other training images)."""
    train = eval_data(cfg, cfg.data.split, cfg.data.subset)
    feats = features(method.backbone, train, cfg, torch.device(cfg.device), memo)
    labels = torch.as_tensor(train.labels)
    choice = torch.as_tensor(np.random.default_rng(CHOICE_SEED).random(len(train)) < CHOICE_FRACTION)
    return knn_top1(feats[~choice], labels[~choice], feats[choice], labels[choice], len(train.classes),
                    cfg.eval.knn_k, cfg.eval.knn_t)


def train_and_eval(args, name: str, spec: str | None, seed: int, root: Path, init_state: dict) -> dict:
    out = root / f"seed_{seed}" / name
    overrides = arm_overrides(args, name, spec, seed, out)
    record = {"encoder": args.encoder, "encoder_sha256": args.encoder_sha, "overrides": overrides}
    if (out / "args.json").exists() and json.loads((out / "args.json").read_text()) != record:
        raise SeppError(f"{out} was trained with other settings (see its args.json); remove it or use another --out")
    if (out / "eval.json").exists():
        return json.loads((out / "eval.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(record, indent=1))
    t0 = time.time()
    summary = pretrain(load_config(args.config, overrides), progress=False, init_state=init_state)
    method, ecfg, _ = load_trained(out / "last.pt", ["device=cpu"])
    memo: dict = {}
    result = {"arm": name, "seed": seed, "steps": summary["steps"], "views": summary.get("views", 2),
              "num_pairs": summary.get("num_pairs", 0), "train_seconds": time.time() - t0,
              "knn_top1": knn_from_method(method, ecfg, memo),
              "linear_top1": linear_from_method(method, ecfg, memo)["top1"],
              "choice_knn_top1": choice_knn(method, ecfg, memo)}
    if spec is not None:
        result["pairs_meta"] = load_pairs(spec.split(",")[0]).meta
    (out / "eval.json").write_text(json.dumps(result, indent=1))
    print(f"{name} seed {seed}: kNN {result['knn_top1']:.2f} linear {result['linear_top1']:.2f} "
          f"choice kNN {result['choice_knn_top1']:.2f} ({time.time() - t0:.0f} s)", flush=True)
    return result


def summarise(runs: dict) -> dict:
    table = {}
    for name, rs in runs.items():
        table[name] = {s: summarize([r[s] for r in rs]) for s in SCORES}
        if name != "baseline":
            table[name]["minus_baseline"] = {s: paired_difference([r[s] for r in rs], [b[s] for b in runs["baseline"]])
                                             for s in SCORES}
    return table


def markdown(table: dict, args) -> str:
    lines = [f"encoder `{args.encoder}` (sha256 {args.encoder_sha[:16]}), {args.steps} steps, seeds {args.seeds}", "",
             "| arm | kNN | linear | choice kNN | − baseline kNN | − baseline linear | − baseline choice kNN |",
             "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        cells = [format_mean_std(t[s]) for s in SCORES]
        diff = t.get("minus_baseline")
        cells += [format_difference(diff[s]) for s in SCORES] if diff else ["", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", required=True)
    p.add_argument("--config", default="demo")
    p.add_argument("--steps", type=int, default=390)
    p.add_argument("--warmup-epochs", type=float, default=0.1)
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    p.add_argument("--arm", action="append", default=[], help="NAME=PAIRS.npz[,key=value...]")
    p.add_argument("--control", action="store_true", help="also the 3-view control")
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    args.encoder_sha = file_hash(args.encoder, 64)
    arms = [("baseline", None)] + ([("control", None)] if args.control else [])
    arms += [tuple(a.split("=", 1)) for a in args.arm]
    init_state = load_checkpoint(args.encoder)["model"]
    root = Path(args.out)
    runs: dict = {}
    for seed in args.seeds:
        for name, spec in arms:
            runs.setdefault(name, []).append(train_and_eval(args, name, spec, seed, root, init_state))
        table = summarise(runs)  # after every seed, so a long run shows its numbers as they come
        (root / "continuation.json").write_text(json.dumps({"runs": runs, "table": table}, indent=1))
        (root / "continuation.md").write_text(markdown(table, args))
    print(markdown(summarise(runs), args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
