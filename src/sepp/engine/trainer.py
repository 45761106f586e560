"""One training loop for every method, one process or many (torchrun).

The loop never reads a value back from the device inside an epoch except every ``train.log_every`` steps;
the epoch loss is summed on the device and checked for NaN/inf before anything is saved, so a diverged run
stops with the last good checkpoint untouched. SIGINT/SIGTERM finish the current step, write a mid-epoch
checkpoint and exit; ``train.resume=true`` continues from it (epoch boundaries resume bit-exactly on CPU).
"""
from __future__ import annotations

import csv
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ..config import resolve, to_yaml
from ..errors import SeppError
from ..fileio import require_shared_dir
from sepp import distributed as dist_utils
from .checkpoint import load_checkpoint, save_checkpoint
from sepp.methods.optim import build_optimizer, lr_at, schedule_steps, set_lr

METRIC_COLUMNS = ["epoch", "step", "loss", "lr", "samples_per_s", "epoch_seconds", "knn_top1",
                  "pairs", "pair_precision", "pair_coverage", "nn_agreement"]


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once the resumable checkpoint is on disk."""


class _StopFlag:
    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        import threading

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


# --------------------------------------------------------------------------------------------- building

def autocast(cfg: DictConfig, device: torch.device):
    if cfg.train.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def build_train_loader(cfg, dataset, device, rank, world, pairs, images=None):
    """The device-resident path for in-memory datasets, the DataLoader path otherwise."""
    from ..data.recipes import view_specs

    spec1, spec2 = view_specs(cfg.method, cfg.data.image_size, cfg.data.name)
    per_rank = cfg.train.batch_size // world
    common = dict(seed=cfg.seed, rank=rank, world=world, pairs=pairs, mode=cfg.sepp.mode, p=cfg.sepp.p,
                  views=cfg.train.views)
    if choose_pipeline(cfg, dataset) == "device":
        from ..data.device_loader import DeviceLoader
        from ..data.gpu_augment import BatchAugment

        if images is None:
            images = dataset.uint8_images()
        return DeviceLoader(images, BatchAugment(spec1), BatchAugment(spec2), batch_size=per_rank,
                            device=device, **common)
    from ..data.loader import build_loader
    from ..data.transforms import view_transform

    return build_loader(dataset, view_transform(spec1), view_transform(spec2), batch_size=per_rank,
                        workers=cfg.data.workers, **common)


def set_epoch(loader, epoch: int, seed: int, start_batch: int = 0) -> None:
    """Select the epoch's plan (from ``start_batch`` on, for a mid-epoch resume); DataLoader workers get seeds
    that depend only on (seed, rank, epoch), so a run resumed at an epoch boundary draws the same
    augmentations as an uninterrupted one."""
    rank = dist_utils.get_rank()
    epoch_seed = (seed * 1_000_003 + rank * 7919 + epoch) % 2**63
    torch.manual_seed(epoch_seed)  # transforms run in this process when data.workers=0
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, start_batch)
        return
    loader.sampler.set_epoch(epoch, start_batch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)


def choose_pipeline(cfg, dataset) -> str:
    in_memory = dataset.in_memory
    if cfg.data.pipeline == "device" and not in_memory:
        raise SeppError(f"data.pipeline=device needs an in-memory dataset (CIFAR, STL-10); "
                        f"{cfg.data.name} is read from files — use data.pipeline=loader or auto")
    if cfg.data.pipeline == "auto":
        return "device" if in_memory else "loader"
    return cfg.data.pipeline


def build_model(cfg, device, world):
    from ..methods import build_method

    method = build_method(cfg)
    if world > 1 and (cfg.model.sync_bn or (cfg.method == "mocov2" and cfg.mocov2.bn == "sync")):
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method = method.to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def load_pairs_for(cfg, dataset):
    from ..data.pairs import check_pairs_match, load_pairs

    pairs = load_pairs(cfg.sepp.pairs)
    check_pairs_match(pairs, name=dataset.name, split=dataset.split, num_images=len(dataset),
                      fingerprint=dataset.fingerprint())
    return pairs


def wrap_ddp(method, device, local_rank):
    """DDP without per-step buffer broadcasts: the MoCo queue and BN statistics are kept consistent by the
    methods themselves (gathered keys), and re-sending a 65536-key queue every step would cost bandwidth.
    Buffers are still synchronised once at construction (all ranks also seed identically)."""
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers")  # renamed in torch 2.14; 2.11 knows only broadcast_buffers
    return ddp(method, device_ids=[local_rank] if device.type == "cuda" else None, **{flag: False})


def scaled_lr(cfg) -> float:
    return cfg.train.lr * (cfg.train.batch_size / 256 if cfg.train.lr_scaling == "linear" else 1.0)


# --------------------------------------------------------------------------------------------- evaluation

def eval_data(cfg, split: str, subset: int):
    """A dataset split with the evaluation transform, and the fast uint8 form when it is in memory."""
    from ..data.datasets import build_dataset
    from ..data.transforms import eval_transform

    data_cfg = OmegaConf.merge(cfg.data, {"subset": subset})
    ds = build_dataset(data_cfg, split=split, transform=eval_transform(cfg.data.image_size, cfg.data.name))
    return ds


def features(backbone, ds, cfg, device, images=None):
    """Backbone features of an evaluation split; ``images``: its uint8 tensor (fast path, no decoding)."""
    from ..data.recipes import mean_std
    from ..eval.features import extract_features

    if images is None and ds.in_memory:
        images = ds.uint8_images()
    if images is not None and images.shape[-1] == cfg.data.image_size:
        mean, std = mean_std(cfg.data.name)
        m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=device).view(1, 3, 1, 1)
        return extract_features(backbone, images, device, batch_size=cfg.eval.batch_size,
                                normalize=lambda x: (x - m) / s)
    return extract_features(backbone, ds, device, batch_size=cfg.eval.batch_size)


def eval_train_split(cfg) -> str:
    """The labelled split that serves as kNN memory bank and linear-probe training set."""
    return cfg.data.eval_train_split or cfg.data.split


def knn_eval(backbone, cfg, device, cache: dict) -> float:
    """Weighted kNN top-1 of ``backbone``; ``cache`` keeps the datasets (and their uint8 tensors, on the
    device) between the monitor's calls."""
    from ..eval.knn import knn_top1

    if "train" not in cache:
        for key, split, subset in (("train", eval_train_split(cfg), cfg.data.subset),
                                   ("test", cfg.data.eval_split, cfg.data.eval_subset)):
            ds = eval_data(cfg, split, subset)
            cache[key] = (ds, ds.uint8_images().to(device) if ds.in_memory else None)
    (train, train_images), (test, test_images) = cache["train"], cache["test"]
    if train.labels is None or test.labels is None or (train.labels < 0).all():
        raise SeppError(f"kNN evaluation needs labels; split {train.split!r} of {cfg.data.name} has none "
                        "— set data.eval_train_split to a labelled split (e.g. train)")
    ftr = features(backbone, train, cfg, device, train_images)
    fte = features(backbone, test, cfg, device, test_images)
    keep = torch.as_tensor(train.labels >= 0)
    return knn_top1(ftr[keep], torch.as_tensor(train.labels)[keep], fte, torch.as_tensor(test.labels),
                    num_classes=len(train.classes), k=cfg.eval.knn_k, t=cfg.eval.knn_t, device=device)


# --------------------------------------------------------------------------------------------- metrics

class MetricsLog:
    """metrics.csv (one row per epoch) and TensorBoard events, on the main process only."""

    def __init__(self, out: Path, resume_epoch: int, enabled: bool):
        self.enabled = enabled
        self.path = out / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if self.path.exists() and resume_epoch > 0:
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"), purge_step=resume_epoch + 1 if resume_epoch else None)
        except Exception:  # tensorboard missing or broken: the CSV is the record
            self.tb = None

    def write(self, row: dict):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=METRIC_COLUMNS).writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and v != "":
                    self.tb.add_scalar(f"train/{k}", v, row["epoch"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


# --------------------------------------------------------------------------------------------- the loop

def pretrain(cfg: DictConfig, progress: bool = True, init_state: Optional[dict] = None) -> dict:
    """Train ``cfg.method`` as configured; returns a summary (epochs, steps, final kNN, seconds, out)."""
    cfg = resolve(cfg)
    rank, world, local_rank = dist_utils.init_distributed()
    main = rank == 0
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.batch_size % world:
        raise SeppError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {world} processes")
    out = Path(cfg.out)
    require_shared_dir(out, "the run directory (out)")  # rank 0 writes the checkpoints all ranks resume from
    last = out / "last.pt"
    ckpt = None
    if last.exists():
        if not cfg.train.resume:
            raise SeppError(f"{out} already holds a run (last.pt); pass train.resume=true to continue it or "
                            "choose another out=DIR")
        ckpt = load_checkpoint(last)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))

    from ..data.datasets import build_dataset

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dataset = build_dataset(cfg.data, split=cfg.data.split)
    pairs_obj = load_pairs_for(cfg, dataset) if cfg.sepp.pairs else None
    images = dataset.uint8_images() if choose_pipeline(cfg, dataset) == "device" else None
    if images is not None and device.type == "cuda":
        images = images.to(device)
    method = build_model(cfg, device, world)
    if hasattr(method, "set_labels"):  # NNCLR: neighbour label agreement per epoch (reporting only)
        method.set_labels(dataset.labels)
    optimizer = build_optimizer(method, cfg.train, scaled_lr(cfg))
    start_epoch, start_batch, step, mined_epoch = 0, 0, 0, None
    if ckpt is not None:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, start_batch, step = ckpt["epoch"], ckpt.get("batch_in_epoch", 0), ckpt["step"]
        if ckpt.get("pairs") is not None:  # the pairs in use (re-mined ones included) live in the checkpoint
            pairs_obj = ckpt["pairs"]
            mined_epoch = pairs_obj.meta.get("mined_at_epoch")
        if main:
            where = f"epoch {start_epoch}" + (f", batch {start_batch}" if start_batch else "")
            print(f"resuming {out} from {where} (step {step})", flush=True)
    elif init_state is not None:
        method.load_state_dict(init_state)
    pairs = None if pairs_obj is None else (np.asarray(pairs_obj.i), np.asarray(pairs_obj.j))
    if cfg.sepp.mask_negatives or cfg.sepp.batch_positives:  # without pairs: only an anchor's own image
        known = pairs or (np.zeros(0, np.int64), np.zeros(0, np.int64))
        method.set_known_positives(torch.as_tensor(known[0]), torch.as_tensor(known[1]), len(dataset),
                                   positives=bool(cfg.sepp.batch_positives))

    model = method
    if world > 1:
        model = wrap_ddp(method, device, local_rank)
    if cfg.train.compile:
        model = torch.compile(model)

    loader = build_train_loader(cfg, dataset, device, rank, world, pairs, images)
    base_lr = scaled_lr(cfg)
    epochs = cfg.train.epochs
    total_steps, warmup_steps = run_schedule(cfg, len(dataset), len(loader), world)
    log = MetricsLog(out, start_epoch, main)
    knn_cache: dict = {}
    last_knn = None
    t_start = time.time()
    status = "finished"
    completed = start_epoch
    with _StopFlag() as stop:
        for epoch in range(start_epoch, epochs):
            if cfg.train.max_steps and step >= cfg.train.max_steps:
                break
            if (cfg.sepp.remine_every and epoch > 0 and epoch % cfg.sepp.remine_every == 0
                    and mined_epoch != epoch):
                pairs_obj, mine_stats = remine(method, cfg, dataset, device, epoch)
                pairs_obj.meta["mined_at_epoch"] = mined_epoch = epoch
                pairs = (np.asarray(pairs_obj.i), np.asarray(pairs_obj.j))
                if cfg.sepp.mask_negatives or cfg.sepp.batch_positives:
                    method.set_known_positives(torch.as_tensor(pairs[0]), torch.as_tensor(pairs[1]),
                                               len(dataset), positives=bool(cfg.sepp.batch_positives))
                loader = build_train_loader(cfg, dataset, device, rank, world, pairs, images)
            else:
                mine_stats = None
            set_epoch(loader, epoch, cfg.seed, start_batch)
            n_batches = len(loader)  # of the whole epoch, also when resuming inside it
            if n_batches == 0:
                raise SeppError(f"train.batch_size={cfg.train.batch_size} is larger than one epoch of "
                                f"{len(dataset)} images; lower train.batch_size or raise data.subset")
            model.train()
            loss_sum = torch.zeros((), device=device)
            seen = 0
            t0 = time.time()
            bar = _progress(loader, n_batches, start_batch, epoch, epochs, progress and main)
            batch_idx = start_batch
            for batch in bar:
                # the schedule is a function of the optimizer step alone, evaluated after the step
                lr = lr_at(step + 1, total_steps, warmup_steps, base_lr, cfg.train.min_lr)
                loss = train_step(model, method, optimizer, batch, device, cfg, lr, base_lr,
                                  min(1.0, (step + 1) / total_steps))
                loss_sum += loss.float()
                seen += batch[0].shape[0]
                step += 1
                batch_idx += 1
                if step % cfg.train.log_every == 0:
                    value = loss.item()
                    if not math.isfinite(value):
                        _diverged(value, epoch, out)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}")
                if stop.signum is not None or (cfg.train.max_steps and step >= cfg.train.max_steps):
                    break
            # one read-back per epoch; averaged over processes so every rank takes the same decision
            epoch_loss = dist_utils.all_reduce_mean(loss_sum / max(1, batch_idx - start_batch)).item()
            if not math.isfinite(epoch_loss):
                _diverged(epoch_loss, epoch, out)
            if stop.signum is not None and batch_idx < n_batches:
                if main:
                    save_checkpoint(last, method, optimizer, cfg, epoch, step, pairs_obj, batch_in_epoch=batch_idx)
                    print(f"saved {last} at epoch {epoch}, batch {batch_idx}; resume with train.resume=true",
                          flush=True)
                status = "interrupted"
                break
            reached_max = bool(cfg.train.max_steps) and step >= cfg.train.max_steps
            start_batch = 0
            seconds = time.time() - t0
            done = epoch + 1
            row = {"epoch": done, "step": step, "loss": epoch_loss, "lr": lr,
                   "samples_per_s": seen * world / max(seconds, 1e-9), "epoch_seconds": seconds}
            if hasattr(method, "epoch_metrics"):  # every process calls it (an all-reduce)
                row.update(method.epoch_metrics())
            if mine_stats is not None:
                row.update(pairs=mine_stats["num_pairs"], pair_precision=mine_stats.get("precision", ""),
                           pair_coverage=mine_stats["coverage"])
            knn_every = cfg.train.knn_every
            final = done == epochs or reached_max
            if knn_every >= 0 and (final or (knn_every > 0 and done % knn_every == 0)):
                if main:
                    last_knn = knn_eval(method.backbone, cfg, device, knn_cache)
                    row["knn_top1"] = last_knn
                dist_utils.barrier()
            log.write(row)
            if main:
                save_checkpoint(last, method, optimizer, cfg, done, step, pairs_obj)
                if cfg.train.save_every and done % cfg.train.save_every == 0 and not final:
                    save_checkpoint(out / f"epoch_{done:04d}.pt", method, optimizer, cfg, done, step, pairs_obj)
                knn_txt = f" knn_top1 {last_knn:.2f}" if "knn_top1" in row else ""
                print(f"epoch {done}/{epochs} step {step} loss {epoch_loss:.4f} lr {lr:.4g} "
                      f"{row['samples_per_s']:.0f} samples/s{knn_txt}", flush=True)
            completed = done
            dist_utils.barrier()
            if reached_max:
                break
            if cfg.train.stop_at_epoch and done >= cfg.train.stop_at_epoch and done < epochs:
                status = "paused"
                break
    log.close()
    summary = {"out": str(out), "status": status, "epochs": completed,
               "steps": step, "knn_top1": last_knn, "seconds": time.time() - t_start,
               "num_images": len(dataset), "num_pairs": 0 if pairs is None else int(len(pairs[0])),
               "views": int(cfg.train.views), "images_forwarded": int(step * cfg.train.batch_size * cfg.train.views)}
    if status == "interrupted":
        raise Interrupted(f"interrupted; resumable checkpoint at {last}")
    return summary


def run_schedule(cfg, num_images: int, steps_per_epoch: int, world: int) -> tuple[int, int]:
    """``(total_steps, warmup_steps)`` of a run whose epochs have ``steps_per_epoch`` steps (enlarged ones
    included): warm-up is counted in plain epochs of ``num_images`` images, so arms with the same total steps
    share the learning rate at every step whatever their epoch length."""
    from ..data.sampling import steps_per_epoch as plain_steps

    plain = plain_steps(num_images, world, cfg.train.batch_size // world)
    return schedule_steps(cfg.train.epochs, steps_per_epoch, cfg.train.max_steps, cfg.train.warmup_epochs, plain)


def lr_schedule(cfg, num_images: int, steps_per_epoch: int, world: int = 1) -> list[float]:
    """The learning rate of every optimizer step of a run (what :func:`pretrain` sets), for tests and plots."""
    total, warmup = run_schedule(cfg, num_images, steps_per_epoch, world)
    return [lr_at(s, total, warmup, scaled_lr(cfg), cfg.train.min_lr) for s in range(1, total + 1)]


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


def _progress(loader, total, start_batch, epoch, epochs, enabled):
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, total=total, initial=start_batch, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                dynamic_ncols=True, disable=None)


def _diverged(value, epoch, out):
    raise SeppError(f"loss became {value} in epoch {epoch + 1}; stopped without saving — the last good "
                    f"checkpoint is {out / 'last.pt'} (if any); lower train.lr, add train.warmup_epochs "
                    "or use train.amp=fp32")


# --------------------------------------------------------------------------------------------- re-mining

def encoder_for(method, features: str):
    if features == "projector":
        return torch.nn.Sequential(method.backbone, method.projector)
    return method.backbone


def remine(method, cfg, dataset, device, epoch):
    """Refresh the semantic pairs from the model being trained (beyond the paper: ``sepp.remine_every``)."""
    from ..data.transforms import eval_transform
    from ..data.pairs import load_pairs
    from ..mining.run import mine_pairs

    out_dir = Path(cfg.out) / "remine" / f"epoch_{epoch:04d}"
    encoder = encoder_for(method, cfg.mine.features)
    was_training = method.training
    method.eval()
    stats = mine_pairs(encoder, dataset.with_transform(eval_transform(cfg.data.image_size, cfg.data.name)),
                       **mine_kwargs(cfg, device), out_dir=out_dir,
                       meta={"encoder": f"{cfg.out}@epoch{epoch}", "features": cfg.mine.features}, plots=False)
    method.train(was_training)
    pairs = load_pairs(out_dir / "pairs.npz")
    if dist_utils.is_main():
        prec = stats.get("precision")
        print(f"re-mined at epoch {epoch}: {stats['num_pairs']} pairs, coverage {stats['coverage']:.3f}"
              + (f", precision {prec:.3f}" if prec is not None else ""), flush=True)
    return pairs, stats


def mine_kwargs(cfg, device) -> dict:
    precision = cfg.mine.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return dict(k=cfg.mine.k, threshold=cfg.mine.threshold, mutual=cfg.mine.mutual, backend=cfg.mine.backend,
                chunk_size=cfg.mine.chunk_size, precision=precision, batch_size=cfg.mine.batch_size,
                device=device, save_embeddings=cfg.mine.save_embeddings, rank_from=cfg.mine.rank_from)
