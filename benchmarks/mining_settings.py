"""Pair quality of the mining options on a labelled dataset: for a checkpoint's encoder, the precision
(same-label fraction, labels used only for this report) and coverage of the pairs kept by every combination
of features, k, mutual filter and threshold (thresholds at the 50/75/90 % quantiles of each image's nearest
similarity, since raw cosine values differ between feature types).

    python benchmarks/mining_settings.py --checkpoint runs/demo/pretrain/last.pt
"""
from __future__ import annotations

import argparse
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--ks", default="1,5,20")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=...")
    args = ap.parse_args()

    from sepp.data.datasets import build_dataset
    from sepp.data.transforms import eval_transform
    from sepp.methods.checkpoint import load_trained
    from sepp.mining.from_model import encoder_for
    from sepp.mining.embed import embed
    from sepp.mining.pairs import select_pairs
    from sepp.mining.search import topk_exact

    method, cfg, _ = load_trained(args.checkpoint, args.overrides)
    ds = build_dataset(cfg.data, split=cfg.data.split,
                       transform=eval_transform(cfg.data.image_size, cfg.data.name))
    labels = ds.labels
    ks = [int(k) for k in args.ks.split(",")]
    rows = []
    print(f"{'features':<10}{'k':>3} {'mutual':<7}{'threshold':>10}{'pairs':>8}{'precision':>10}{'coverage':>9}")
    for features in ("backbone", "projector"):
        emb = embed(encoder_for(method, features), ds, cfg.device)
        idx, sim = topk_exact(emb, max(ks), 4096, cfg.device, "fp32")
        thresholds = [-1.0] + [float(t) for t in np.quantile(sim[:, 0], [0.5, 0.75, 0.9])]
        for k in ks:
            for mutual in (False, True):
                for th in thresholds:
                    i, j, _ = select_pairs(idx, sim, k, th, mutual)
                    prec = float((labels[i] == labels[j]).mean()) if len(i) else float("nan")
                    cov = len(set(i.tolist()) | set(j.tolist())) / len(ds)
                    rows.append(dict(features=features, k=k, mutual=mutual, threshold=th, pairs=len(i),
                                     precision=prec, coverage=cov))
                    print(f"{features:<10}{k:>3} {str(mutual):<7}{th:>10.3f}{len(i):>8}{prec:>10.3f}{cov:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
