"""One training loop for every method, one process or many (torchrun).

``pretrain`` reads top to bottom: set up the run, restore it (or start it), then per epoch re-mine the pairs
(when asked), train one epoch and close it (metrics, kNN monitor, checkpoints). The loop never reads a value
back from the device inside an epoch except every ``train.log_every`` steps; the epoch loss is summed on the
device and checked for NaN/inf before anything is saved, so a diverged run stops with the last good checkpoint
untouched. SIGINT/SIGTERM finish the current step, write a mid-epoch checkpoint and exit;
``train.resume=true`` continues from it (epoch boundaries resume bit-exactly on CPU).
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from sepp import distributed as D
from sepp.config import write_config
from sepp.data.datasets import build_dataset
from sepp.data.pairs import Pairs
from sepp.errors import SeppError
from sepp.eval.knn import knn_eval
from sepp.fileio import require_shared_dir
from sepp.eval.data import without_labels
from sepp.methods.checkpoint import initial_state, load_checkpoint, save_checkpoint
from sepp.methods.optim import build_optimizer, lr_at, set_lr
from sepp.mining.encoder import encoder_init
from sepp.mining.from_model import remine

from .metrics import MetricsLog
from .setup import (autocast, build_model, build_train_loader, choose_pipeline, load_pairs_for, resolve,
                    run_schedule, scaled_lr, set_epoch, setup_processes, wrap_ddp)


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once the resumable checkpoint is on disk."""


@dataclass
class Run:
    """What one training run holds between its phases."""
    cfg: DictConfig
    rank: int
    world: int
    local_rank: int
    device: torch.device
    out: Path
    dataset: Any
    images: Optional[torch.Tensor]
    method: torch.nn.Module
    optimizer: torch.optim.Optimizer
    pairs: Optional[Pairs]
    model: torch.nn.Module = None  # the method, wrapped for DDP / torch.compile
    loader: Any = None
    total_steps: int = 0
    warmup_steps: int = 0
    log: Optional[MetricsLog] = None
    start_epoch: int = 0
    start_batch: int = 0
    step: int = 0
    mined_epoch: Optional[int] = None
    last_knn: Optional[float] = None
    knn_cache: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> Path:
        return self.out / "last.pt"


@dataclass
class Epoch:
    """The outcome of one (possibly partial) epoch."""
    loss: float
    lr: float
    seen: int
    seconds: float
    batch_idx: int  # batches of the epoch done (a mid-epoch resume starts above 0)
    n_batches: int


def pretrain(cfg: DictConfig, progress: bool = True, init_state: Optional[dict] = None) -> dict:
    """Train ``cfg.method`` as configured; returns a summary (epochs, steps, final kNN, seconds, out)."""
    run = setup(without_labels(resolve(cfg)))
    restore(run, init_state)
    start(run)
    status, t_start, completed = "finished", time.time(), run.start_epoch
    with _StopFlag() as stop:
        for epoch in range(run.start_epoch, run.cfg.train.epochs):
            if run.cfg.train.max_steps and run.step >= run.cfg.train.max_steps:
                break
            mine_stats = remine_if_due(run, epoch)
            result = one_epoch(run, epoch, stop, progress)
            if stop.signum is not None and result.batch_idx < result.n_batches:
                save_interrupted(run, epoch, result.batch_idx)
                status = "interrupted"
                break
            completed, status = end_of_epoch(run, epoch, result, mine_stats)
            if status != "running":
                break
    run.log.close()
    if status == "interrupted":
        raise Interrupted(f"interrupted; resumable checkpoint at {run.last}")
    return summary(run, "finished" if status == "running" else status, completed, time.time() - t_start)


# --------------------------------------------------------------------------------------------- phases

def setup(cfg: DictConfig) -> Run:
    """Processes, device, run directory, dataset and pairs, model and optimizer."""
    rank, world, local_rank, device = setup_processes(cfg)
    out = Path(cfg.out)
    require_shared_dir(out, "the run directory (out)")  # rank 0 writes the checkpoints all ranks resume from
    if (out / "last.pt").exists() and not cfg.train.resume:
        raise SeppError(f"{out} already holds a run (last.pt); pass train.resume=true to continue it or "
                        "choose another out=DIR")
    write_config(cfg, out)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dataset = build_dataset(cfg.data, split=cfg.data.split)
    pairs = load_pairs_for(cfg, dataset) if cfg.sepp.pairs else None
    images = dataset.uint8_images() if choose_pipeline(cfg, dataset) == "device" else None
    if images is not None and device.type == "cuda":
        images = images.to(device)
    method = build_model(cfg, device, world)
    method.set_labels(dataset.labels)  # for label-based monitors only (NNCLR's neighbour agreement)
    optimizer = build_optimizer(method, cfg.train, scaled_lr(cfg))
    return Run(cfg, rank, world, local_rank, device, out, dataset, images, method, optimizer, pairs)


def restore(run: Run, init_state: Optional[dict]) -> None:
    """Continue from ``last.pt`` (weights, optimizer, position, the pairs in use), or start from
    ``init_state`` weights (a whole model, or ``backbone.*`` keys) or ``train.init_backbone``'s when given."""
    if not run.last.exists():
        if init_state is None and run.cfg.train.init_backbone:
            init_state, info = encoder_init(run.cfg.train.init_backbone, run.cfg)
            if run.main:
                print(f"initial weights ({info['loaded']}, {info['layout']}) from {info['file']} "
                      f"(sha256 {info['sha256']})", flush=True)
        if init_state is not None:
            run.method.load_state_dict(initial_state(run.method, init_state))
        return
    ckpt = load_checkpoint(run.last)
    run.method.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.start_epoch, run.start_batch, run.step = ckpt["epoch"], ckpt.get("batch_in_epoch", 0), ckpt["step"]
    if ckpt.get("pairs") is not None:  # the pairs in use (re-mined ones included) live in the checkpoint
        run.pairs = ckpt["pairs"]
        run.mined_epoch = run.pairs.meta.get("mined_at_epoch")
    if run.main:
        where = f"epoch {run.start_epoch}" + (f", batch {run.start_batch}" if run.start_batch else "")
        print(f"resuming {run.out} from {where} (step {run.step})", flush=True)


def start(run: Run) -> None:
    """Known positives, the DDP / compiled model, the loader, the schedule and the metrics log."""
    set_known_positives(run)
    run.model = run.method
    if run.world > 1:
        run.model = wrap_ddp(run.method, run.device, run.local_rank)
    if run.cfg.train.compile:
        run.model = torch.compile(run.model)
    run.loader = build_train_loader(run.cfg, run.dataset, run.device, run.rank, run.world, run.pairs, run.images)
    run.total_steps, run.warmup_steps = run_schedule(run.cfg, len(run.dataset), len(run.loader), run.world)
    run.log = MetricsLog(run.out, run.start_epoch, run.main, run.method.metric_columns)


def remine_if_due(run: Run, epoch: int) -> Optional[dict]:
    """Every ``sepp.remine_every`` epochs: new pairs from the model being trained (with the selection settings
    of the pairs they replace, :func:`sepp.mining.from_model.remine_settings`), and a new loader."""
    every = run.cfg.sepp.remine_every
    if not (every and epoch > 0 and epoch % every == 0 and run.mined_epoch != epoch):
        return None
    run.pairs, stats = remine(run.method, run.cfg, run.dataset, run.device, epoch, run.pairs)
    run.mined_epoch = epoch
    set_known_positives(run)
    run.loader = build_train_loader(run.cfg, run.dataset, run.device, run.rank, run.world, run.pairs, run.images)
    return stats


def one_epoch(run: Run, epoch: int, stop: "_StopFlag", progress: bool) -> Epoch:
    """Train until the epoch ends, ``train.max_steps`` is reached or a signal asks to stop."""
    cfg = run.cfg
    set_epoch(run.loader, epoch, cfg.seed, run.start_batch)
    n_batches = len(run.loader)  # of the whole epoch, also when resuming inside it
    if n_batches == 0:
        raise SeppError(f"train.batch_size={cfg.train.batch_size} is larger than one epoch of "
                        f"{len(run.dataset)} images; lower train.batch_size or raise data.subset")
    run.model.train()
    base_lr = scaled_lr(cfg)
    loss_sum, seen, t0 = torch.zeros((), device=run.device), 0, time.time()
    lr = lr_at(run.step, run.total_steps, run.warmup_steps, base_lr, cfg.train.min_lr)
    bar = _progress(run.loader, n_batches, run.start_batch, epoch, cfg.train.epochs, progress and run.main)
    batch_idx = run.start_batch
    for batch in bar:
        # the schedule is a function of the optimizer step alone, evaluated after the step
        lr = lr_at(run.step + 1, run.total_steps, run.warmup_steps, base_lr, cfg.train.min_lr)
        loss = train_step(run.model, run.method, run.optimizer, batch, run.device, cfg, lr, base_lr,
                          min(1.0, (run.step + 1) / run.total_steps))
        loss_sum += loss.float()
        seen += batch[0].shape[0]
        run.step += 1
        batch_idx += 1
        if run.step % cfg.train.log_every == 0:
            value = loss.item()
            _check_finite(value, epoch, run.out)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}")
        if stop.signum is not None or (cfg.train.max_steps and run.step >= cfg.train.max_steps):
            break
    # one read-back per epoch; averaged over processes so every rank takes the same decision
    epoch_loss = D.all_reduce_mean(loss_sum / max(1, batch_idx - run.start_batch)).item()
    _check_finite(epoch_loss, epoch, run.out)
    return Epoch(epoch_loss, lr, seen, time.time() - t0, batch_idx, n_batches)


def end_of_epoch(run: Run, epoch: int, result: Epoch, mine_stats: Optional[dict]) -> tuple[int, str]:
    """Metrics row, kNN monitor, checkpoints and the printed line; returns ``(epochs done, status)`` with
    status ``running``, ``finished`` (``train.max_steps`` reached) or ``paused`` (``train.stop_at_epoch``)."""
    cfg, done = run.cfg, epoch + 1
    run.start_batch = 0
    reached_max = bool(cfg.train.max_steps) and run.step >= cfg.train.max_steps
    final = done == cfg.train.epochs or reached_max
    row = {"epoch": done, "step": run.step, "loss": result.loss, "lr": result.lr,
           "samples_per_s": result.seen * run.world / max(result.seconds, 1e-9), "epoch_seconds": result.seconds}
    row.update(run.method.epoch_metrics())  # every process calls it (it may all-reduce)
    if mine_stats is not None:
        row.update(pairs=mine_stats["num_pairs"], pair_precision=mine_stats.get("precision", ""),
                   pair_coverage=mine_stats["coverage"])
    knn_every = cfg.train.knn_every
    if knn_every >= 0 and (final or (knn_every > 0 and done % knn_every == 0)):
        if run.main:
            row["knn_top1"] = run.last_knn = knn_eval(run.method.backbone, cfg, run.device, run.knn_cache)
        D.barrier()
    run.log.write(row)
    if run.main:
        save_checkpoint(run.last, run.method, run.optimizer, cfg, done, run.step, run.pairs)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and not final:
            save_checkpoint(run.out / f"epoch_{done:04d}.pt", run.method, run.optimizer, cfg, done, run.step,
                            run.pairs)
        knn_txt = f" knn_top1 {run.last_knn:.2f}" if "knn_top1" in row else ""
        print(f"epoch {done}/{cfg.train.epochs} step {run.step} loss {result.loss:.4f} lr {result.lr:.4g} "
              f"{row['samples_per_s']:.0f} samples/s{knn_txt}", flush=True)
    D.barrier()
    if reached_max:
        return done, "finished"
    if cfg.train.stop_at_epoch and cfg.train.stop_at_epoch <= done < cfg.train.epochs:
        return done, "paused"
    return done, "running"


def save_interrupted(run: Run, epoch: int, batch_idx: int) -> None:
    """The mid-epoch checkpoint a signal asks for."""
    if run.main:
        save_checkpoint(run.last, run.method, run.optimizer, run.cfg, epoch, run.step, run.pairs,
                        batch_in_epoch=batch_idx)
        print(f"saved {run.last} at epoch {epoch}, batch {batch_idx}; resume with train.resume=true", flush=True)


def summary(run: Run, status: str, completed: int, seconds: float) -> dict:
    cfg = run.cfg
    return {"out": str(run.out), "status": status, "epochs": completed, "steps": run.step,
            "knn_top1": run.last_knn, "seconds": seconds, "num_images": len(run.dataset),
            "num_pairs": 0 if run.pairs is None else len(run.pairs), "views": int(cfg.train.views),
            "images_forwarded": int(run.step * cfg.train.batch_size * cfg.train.views)}


# --------------------------------------------------------------------------------------------- pieces

def set_known_positives(run: Run) -> None:
    """Hand the pairs in use to a method that masks or counts known positives (without pairs: an anchor's
    own image only)."""
    cfg = run.cfg
    if cfg.sepp.mask_negatives or cfg.sepp.batch_positives:
        pairs = run.pairs or Pairs(np.zeros(0, np.int64), np.zeros(0, np.int64))
        run.method.set_known_positives(torch.as_tensor(pairs.i), torch.as_tensor(pairs.j), len(run.dataset),
                                       positives=bool(cfg.sepp.batch_positives))


def train_step(model, method, optimizer, batch, device, cfg, lr: float, base_lr: float, progress_after: float):
    """One optimizer step on a ``(x1, x2, ids1, ids2[, x3, ids3])`` batch; returns the loss without reading it
    back."""
    batch = [t.to(device, non_blocking=True) for t in batch]  # (x1, x2, ids1, ids2[, x3, ids3])
    if cfg.train.channels_last:
        for v in (0, 1, 4)[: 2 + (len(batch) > 4)]:
            batch[v] = batch[v].contiguous(memory_format=torch.channels_last)
    set_lr(optimizer, lr, base_lr)
    with autocast(cfg, device):
        loss = model(*batch)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.after_step(progress_after)
    return loss.detach()


class _StopFlag:
    """SIGINT/SIGTERM set ``signum`` (the loop finishes its step); a second one aborts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nsignal {signum}: finishing this step and saving a resumable checkpoint "
              "(press again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _progress(loader, total, start_batch, epoch, epochs, enabled):
    if not enabled:
        return loader
    from tqdm import tqdm  # only for interactive runs

    return tqdm(loader, total=total, initial=start_batch, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                dynamic_ncols=True, disable=None)


def _check_finite(value: float, epoch: int, out: Path) -> None:
    if not math.isfinite(value):
        raise SeppError(f"loss became {value} in epoch {epoch + 1}; stopped without saving — the last good "
                        f"checkpoint is {out / 'last.pt'} (if any); lower train.lr, add train.warmup_epochs "
                        "or use train.amp=fp32")
