"""The `sepp` command line.

    sepp pretrain --config FILE [key=value ...]
    sepp eval {knn,linear,finetune,transfer,embed-plot} --checkpoint FILE [key=value ...]
    sepp export --checkpoint FILE --out FILE [--format torchvision|detectron2]
    sepp mine (--checkpoint FILE | --encoder FILE [--arch A] [--cifar-stem] [--key-prefix P]) [key=value ...]
    sepp run --config FILE [key=value ...]
    sepp demo [--out DIR] [key=value ...]
    sepp augment-grid --config FILE [--out PNG] [key=value ...]

Bad input ends with one ``error: ...`` line and exit status 2; an interrupt leaves a resumable checkpoint
(exit status 130). The CLI is the top layer: each subcommand imports what it runs when it runs (so `sepp --help`
starts at once); configs are resolved through :func:`sepp.engine.setup.resolve`, which checks every registry.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import SeppError, one_line_warnings


def _print_config(args) -> bool:
    """``--print-config``: print the resolved configuration (what config.yaml would hold) and stop."""
    if not getattr(args, "print_config", False):
        return False
    from .config import load_config, to_yaml
    from .engine.setup import resolve

    print(to_yaml(resolve(load_config(args.config, args.overrides))), end="")
    return True


def _pretrain(args):
    from .config import load_config
    from .engine.trainer import pretrain

    if _print_config(args):
        return
    summary = pretrain(load_config(args.config, args.overrides))
    knn = summary["knn_top1"]
    if summary["status"] == "paused":
        print(f"paused after epoch {summary['epochs']} (train.stop_at_epoch); continue with train.resume=true")
        return
    print(f"done: {summary['epochs']} epochs, {summary['steps']} steps in {summary['seconds']:.0f} s; "
          f"checkpoint {Path(summary['out']) / 'last.pt'}" + (f"; knn_top1={knn:.2f}" if knn is not None else ""))


def _eval(args):
    if args.kind in ("finetune", "transfer", "embed-plot"):
        return _eval_more(args)
    from .eval.run import evaluate_checkpoint

    result = evaluate_checkpoint(args.kind, args.checkpoint, args.overrides, out=args.out)
    key = "knn_top1" if args.kind == "knn" else "linear_top1"
    print(f"{key}={result[key]:.2f}  ({result['json']})")


def _eval_more(args):
    """`sepp eval finetune | transfer | embed-plot`."""
    if args.kind == "finetune":
        from .eval.finetune import finetune_checkpoint

        r = finetune_checkpoint(args.checkpoint, args.overrides, out=args.out)
        print(f"finetune_top1={r['finetune_top1']:.2f}  ({r['num_labels']} labels, {r['steps']} steps; {r['json']})")
    elif args.kind == "transfer":
        from .eval.transfer import transfer_checkpoint

        r = transfer_checkpoint(args.checkpoint, args.overrides, out=args.out)
        print(f"transfer_{r['metric']}={r['score']:.2f}  ({r['dataset']}, C={r['C']:.3g}; {r['json']})")
    else:
        from .eval.embed_plot import embed_plot_checkpoints

        checkpoints = {"baseline": args.baseline} if args.baseline else {}
        name = Path(args.checkpoint).parent.name or "model"  # e.g. runs/x/sepp/last.pt -> "sepp"
        checkpoints[name if name not in checkpoints else f"{name}/{Path(args.checkpoint).name}"] = args.checkpoint
        r = embed_plot_checkpoints(checkpoints, args.overrides, out=args.out)
        print(f"wrote {r['path']} ({r['algorithm']}, {len(r['indices'])} images)")


def _export(args):
    from .methods.export import export_backbone

    info = export_backbone(args.checkpoint, args.out, format=args.format)
    print(f"wrote {args.out} ({info['arch']}, cifar_stem={info['cifar_stem']}, {args.format}) and {args.out}.json")


def _mine_encoder(args):
    """`sepp mine --encoder FILE`: a sepp checkpoint, a `sepp export` output or a torchvision state_dict."""
    from .engine.setup import resolve
    from .mining.encoder import encoder_config, mine_with_encoder

    cfg = resolve(encoder_config(args.encoder, args.config, args.overrides))
    out = _mining_out(cfg, args.encoder)
    return mine_with_encoder(args.encoder, cfg, out, arch=args.arch, cifar_stem=args.cifar_stem,
                             key_prefix=args.key_prefix)[1], out


def _mine_checkpoint(args):
    """`sepp mine --checkpoint FILE`: mine with a sepp run's encoder and configuration."""
    from .engine.setup import resolve
    from .methods.checkpoint import config_from_checkpoint, load_checkpoint
    from .mining.from_model import mine_checkpoint

    cfg = resolve(config_from_checkpoint(load_checkpoint(args.checkpoint), args.overrides))
    out = _mining_out(cfg, args.checkpoint)
    return mine_checkpoint(args.checkpoint, cfg, out)[1], out


def _mining_out(cfg, source: str) -> Path:
    """``mine.out``, by default ``mining/`` beside the encoder file."""
    return Path(cfg.mine.out) if cfg.mine.out else Path(source).parent / "mining"


def _mine(args):
    if (args.checkpoint is None) == (args.encoder is None):
        raise SeppError("sepp mine needs exactly one of --checkpoint FILE (a sepp run) or --encoder FILE "
                        "(a sepp checkpoint, `sepp export` output or torchvision ResNet state_dict)")
    stats, out = _mine_encoder(args) if args.encoder is not None else _mine_checkpoint(args)
    prec = stats.get("precision")
    print(f"pairs={stats['num_pairs']} coverage={stats['coverage']:.3f}"
          + (f" precision={prec:.3f}" if prec is not None else "") + f"  ({out / 'pairs.npz'})")


def _run(args, config=None):
    from .config import load_config
    from .engine.experiment import comparison_table, run_experiment

    overrides = list(args.overrides)
    if getattr(args, "out", None):
        overrides.append(f"out={args.out}")
    results = run_experiment(load_config(config or args.config, overrides))
    print()
    print(comparison_table(results))
    print(f"\nreport: {Path(results['out']) / 'report.md'}")


def _augment_grid(args):
    import torch

    from .config import load_config
    from .data.datasets import build_dataset
    from .engine.setup import resolve
    from .methods import method_view_specs
    from .report.augment_grid import save_augment_grid

    cfg = resolve(load_config(args.config, args.overrides))
    ds = build_dataset(cfg.data, split=cfg.data.split)
    images = ds.uint8_images()
    if images is None:
        from torchvision.transforms.v2 import functional as F

        images = torch.stack([F.center_crop(F.resize(F.pil_to_tensor(ds.load_image(i)), cfg.data.image_size),
                                            cfg.data.image_size) for i in range(args.images)])
    spec1, spec2 = method_view_specs(cfg)
    save_augment_grid(images[: args.images], spec1, spec2, args.out, seed=cfg.seed)
    print(f"wrote {args.out}")


def _encoder_options(sp) -> None:
    """`sepp mine --encoder FILE` and how to read it."""
    sp.add_argument("--encoder", help="any encoder file: sepp checkpoint, `sepp export` output, ResNet SSL checkpoint")
    sp.add_argument("--arch", help="--encoder's architecture (default: its JSON sidecar, else read off the keys)")
    sp.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=None,
                    help="--encoder has the 3x3 CIFAR stem (default: sidecar, else the conv1 kernel)")
    sp.add_argument("--config", help="--encoder without a sepp config: YAML or shipped name for data/mine keys")
    sp.add_argument("--key-prefix", help="--encoder: where the backbone's keys begin, e.g. "
                    "state_dict.module.encoder_q. (default: model.key_prefix, else recognised from the known layouts)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sepp", description="Self-supervised learning with semantic positive pairs.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_overrides(sp):
        sp.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.epochs=10")
        return sp

    sp = with_overrides(sub.add_parser("pretrain", help="self-supervised pretraining"))
    sp.add_argument("--config", required=True, help="YAML file or shipped config name (e.g. cifar10_mocov2)")
    sp.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    sp.set_defaults(func=_pretrain)

    sp = with_overrides(sub.add_parser("eval", help="kNN, linear, fine-tuning, transfer or embedding picture"))
    sp.add_argument("kind", choices=["knn", "linear", "finetune", "transfer", "embed-plot"])
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", help="result JSON or PNG (default: next to the checkpoint)")
    sp.add_argument("--baseline", help="embed-plot: a second checkpoint, drawn in a panel before --checkpoint's")
    sp.set_defaults(func=_eval)

    sp = sub.add_parser("export", help="write the backbone as a torchvision ResNet state_dict")
    sp.add_argument("--checkpoint", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--format", choices=["torchvision", "detectron2"], default="torchvision",
                    help="detectron2: the MoCo detection code's pickle (see README)")
    sp.set_defaults(func=_export)

    sp = with_overrides(sub.add_parser("mine", help="mine semantic positive pairs with a checkpoint's encoder"))
    sp.add_argument("--checkpoint", help="a sepp run's checkpoint")
    _encoder_options(sp)
    sp.set_defaults(func=_mine)

    sp = with_overrides(sub.add_parser("run", help="baseline, mining, SePP training, matched baseline, evaluation"))
    sp.add_argument("--config", required=True)
    sp.set_defaults(func=_run)

    sp = with_overrides(sub.add_parser("demo", help="`sepp run` at CPU scale on real CIFAR-10 (<= 10 minutes)"))
    sp.add_argument("--out", help="output folder (default: the demo config's out)")
    sp.set_defaults(func=lambda a: _run(a, config="demo"))

    sp = with_overrides(sub.add_parser("augment-grid", help="picture of augmented views (torchvision vs batched)"))
    sp.add_argument("--config", required=True)
    sp.add_argument("--out", default="augment_grid.png")
    sp.add_argument("--images", type=int, default=6)
    sp.set_defaults(func=_augment_grid)
    return p


def main(argv=None) -> int:
    one_line_warnings()  # user-facing output: no Python source lines under warnings, from us or libraries
    parser = build_parser()
    # overrides may come before or after options (`eval knn --checkpoint C key=value`)
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from . import distributed as D
    from .engine.trainer import Interrupted

    try:
        D.init_distributed()  # no-op unless launched by torchrun; makes only rank 0 print
        if not D.is_main():
            sys.stdout = open(os.devnull, "w")
        args.func(args)
    except SeppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(str(exc), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("aborted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
