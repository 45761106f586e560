"""Training throughput in samples/s, measured in one run on the current device:

  (a) the training step alone on pre-made tensors already on the device (the ceiling);
  (b) sepp's full pipeline: the same step fed by the trainer's own loader (device-resident uint8 data and
      batched per-sample augmentation for CIFAR/STL-10, see ``data.pipeline``);
  (c) the usual pipeline: torchvision transforms on PIL images in DataLoader workers over all cores.

Prints a table with the ratios b/a and b/c; ``--json PATH`` writes the numbers. The step, model, optimizer
and loaders are the ones ``sepp pretrain`` uses (``sepp.engine.trainer``), so the table measures what a
training run gets.

    python benchmarks/train_throughput.py --device cuda --batch 512          # the issue's GPU setting
    python benchmarks/train_throughput.py --device cpu --batch 128 --backbone resnet18_narrow
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step_fn, batches, device, warmup: int, steps: int) -> float:
    it = iter(batches)
    for _ in range(warmup):
        step_fn(next(it))
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for _ in range(steps):
        batch = next(it)
        step_fn(batch)
        n += batch[0].shape[0]
    _sync(device)
    return n / (time.perf_counter() - t0)


def forever(loader):
    epoch = 0
    while True:
        from sepp.engine.setup import set_epoch

        set_epoch(loader, epoch, 0)
        yield from loader
        epoch += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="cifar10_mocov2")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--subset", type=int, default=0, help="training images (0 = all)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers for (c)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    from sepp.config import load_config
    from sepp.data.datasets import build_dataset
    from sepp.methods.optim import build_optimizer
    from sepp.engine.setup import build_model, build_train_loader, resolve, scaled_lr
    from sepp.engine.trainer import train_step

    cfg = resolve(load_config(args.config, [f"device={args.device}", f"model.backbone={args.backbone}",
                                            f"train.batch_size={args.batch}", f"data.subset={args.subset}",
                                            f"data.workers={args.workers}", f"train.compile={args.compile}",
                                            *args.overrides]))
    device = torch.device(cfg.device)
    dataset = build_dataset(cfg.data, split=cfg.data.split)
    method = build_model(cfg, device, 1)
    optimizer = build_optimizer(method, cfg.train, scaled_lr(cfg))
    model = torch.compile(method) if cfg.train.compile else method
    lr = scaled_lr(cfg)

    def step(batch):
        train_step(model, method, optimizer, batch, device, cfg, lr, lr, 0.5)

    results = {}
    # (b) sepp's pipeline, as the trainer builds it
    sepp_loader = build_train_loader(cfg, dataset, device, 0, 1, None)
    pipeline = type(sepp_loader).__name__
    # (a) the step alone: the first augmented batches of (b), kept on the device and cycled
    fixed = [tuple(t.to(device) for t in b) for _, b in zip(range(4), forever(sepp_loader))]
    results["a_step_only"] = measure(step, (fixed[i % 4] for i in range(10 ** 9)), device, args.warmup, args.steps)
    results["b_sepp_pipeline"] = measure(step, forever(sepp_loader), device, args.warmup, args.steps)
    # (c) torchvision PIL transforms in DataLoader workers over all cores
    cfg.data.pipeline = "loader"
    pil_loader = build_train_loader(cfg, dataset, device, 0, 1, None)
    results["c_torchvision_workers"] = measure(step, forever(pil_loader), device, args.warmup, args.steps)

    a, b, c = results["a_step_only"], results["b_sepp_pipeline"], results["c_torchvision_workers"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    info = {"device": name, "cores": os.cpu_count(), "torch": torch.__version__, "method": cfg.method,
            "backbone": cfg.model.backbone, "batch": cfg.train.batch_size, "amp": cfg.train.amp,
            "channels_last": cfg.train.channels_last, "compile": cfg.train.compile, "sepp_loader": pipeline,
            "workers_c": cfg.data.workers, "samples_per_s": results, "b_over_a": b / a, "b_over_c": b / c,
            "date": time.strftime("%Y-%m-%d")}
    print(f"device {name} ({device.type}), {cfg.method} {cfg.model.backbone}, batch {cfg.train.batch_size}, "
          f"amp {cfg.train.amp}, channels_last {cfg.train.channels_last}, compile {cfg.train.compile}")
    print(f"{'pipeline':<42}{'samples/s':>12}")
    print(f"{'(a) step on pre-made device tensors':<42}{a:>12.0f}")
    print(f"{'(b) sepp pipeline (' + pipeline + ')':<42}{b:>12.0f}")
    print(f"{'(c) torchvision PIL, ' + str(cfg.data.workers) + ' workers':<42}{c:>12.0f}")
    print(f"b/a = {b / a:.2f}   b/c = {b / c:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)


if __name__ == "__main__":
    main()
