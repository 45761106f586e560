"""Everything a training run is built from: the resolved config, the processes and device, the model (SyncBN,
DDP), the training loader, the learning-rate schedule and the pairs."""
from __future__ import annotations

import inspect
from contextlib import nullcontext

import torch

from sepp import distributed as D
from sepp import eval as sepp_eval
from sepp import mining
from sepp.config import check_choices
from sepp.data.device_loader import DeviceLoader
from sepp.data.gpu_augment import BatchAugment
from sepp.data.loader import build_loader
from sepp.data.pairs import Pairs, check_pairs_match, load_pairs
from sepp.data.sampling import steps_per_epoch as plain_steps_per_epoch
from sepp.data.transforms import view_transform
from sepp.errors import SeppError
from sepp.methods import build_method, method_view_specs
from sepp.methods import resolve as resolve_method
from sepp.methods.optim import lr_at, scale_lr, schedule_steps


def resolve(cfg):
    """The config of a run with every automatic value filled in (:func:`sepp.methods.resolve`) and every
    registry-owned value checked, mining's and evaluation's included, before anything is trained."""
    cfg = resolve_method(cfg)
    check_choices(cfg, {**mining.CONFIG_CHOICES, **sepp_eval.CONFIG_CHOICES})
    return cfg


def setup_processes(cfg) -> tuple[int, int, int, torch.device]:
    """``(rank, world, local_rank, device)``: joins the torchrun process group (if any) and picks the device."""
    rank, world, local_rank = D.init_distributed()
    device = torch.device("cuda", local_rank) if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.batch_size % world:
        raise SeppError(f"train.batch_size={cfg.train.batch_size} must be divisible by the {world} processes")
    return rank, world, local_rank, device


def autocast(cfg, device: torch.device):
    if cfg.train.amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def choose_pipeline(cfg, dataset) -> str:
    in_memory = dataset.in_memory
    if cfg.data.pipeline == "device" and not in_memory:
        raise SeppError(f"data.pipeline=device needs an in-memory dataset (CIFAR, STL-10); "
                        f"{cfg.data.name} is read from files — use data.pipeline=loader or auto")
    if cfg.data.pipeline == "auto":
        return "device" if in_memory else "loader"
    return cfg.data.pipeline


def build_train_loader(cfg, dataset, device, rank, world, pairs: Pairs | None, images=None):
    """The device-resident path for in-memory datasets, the DataLoader path otherwise."""
    spec1, spec2 = method_view_specs(cfg)
    per_rank = cfg.train.batch_size // world
    common = dict(seed=cfg.seed, rank=rank, world=world, pairs=pairs,
                  mode=cfg.sepp.mode, p=cfg.sepp.p, views=cfg.train.views)
    if choose_pipeline(cfg, dataset) == "device":
        if images is None:
            images = dataset.uint8_images()
        return DeviceLoader(images, BatchAugment(spec1), BatchAugment(spec2), batch_size=per_rank,
                            device=device, **common)
    return build_loader(dataset, view_transform(spec1), view_transform(spec2), batch_size=per_rank,
                        workers=cfg.data.workers, **common)


def set_epoch(loader, epoch: int, seed: int, start_batch: int = 0) -> None:
    """Select the epoch's plan (from ``start_batch`` on, for a mid-epoch resume); DataLoader workers get seeds
    that depend only on (seed, rank, epoch), so a run resumed at an epoch boundary draws the same
    augmentations as an uninterrupted one."""
    epoch_seed = (seed * 1_000_003 + D.get_rank() * 7919 + epoch) % 2**63
    torch.manual_seed(epoch_seed)  # transforms run in this process when data.workers=0
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch, start_batch)
        return
    loader.sampler.set_epoch(epoch, start_batch)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)


def build_model(cfg, device, world):
    """The method of ``cfg`` on ``device``: SyncBatchNorm under DDP when ``model.sync_bn`` or the method's own
    settings ask for it, channels_last when ``train.channels_last``."""
    method = build_method(cfg)
    if world > 1 and (cfg.model.sync_bn or method.requires_sync_bn):
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method = method.to(device)
    if cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
    return method


def wrap_ddp(method, device, local_rank):
    """DDP without per-step buffer broadcasts: the MoCo queue and BN statistics are kept consistent by the
    methods themselves (gathered keys), and re-sending a 65536-key queue every step would cost bandwidth.
    Buffers are still synchronised once at construction (all ranks also seed identically)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    flag = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else "broadcast_buffers")  # renamed in torch 2.14; 2.11 knows only broadcast_buffers
    return ddp(method, device_ids=[local_rank] if device.type == "cuda" else None, **{flag: False})


def load_pairs_for(cfg, dataset) -> Pairs:
    """``sepp.pairs``'s pair file, checked against the dataset it will be sampled from."""
    pairs = load_pairs(cfg.sepp.pairs)
    check_pairs_match(pairs, name=dataset.name, split=dataset.split, num_images=len(dataset),
                      fingerprint=dataset.fingerprint())
    return pairs


def scaled_lr(cfg) -> float:
    """The peak learning rate of a run: ``train.lr`` scaled to ``train.batch_size`` (``train.lr_scaling``)."""
    return scale_lr(cfg.train.lr, cfg.train.batch_size) if cfg.train.lr_scaling == "linear" else cfg.train.lr


def run_schedule(cfg, num_images: int, steps_per_epoch: int, world: int) -> tuple[int, int]:
    """``(total_steps, warmup_steps)`` of a run whose epochs have ``steps_per_epoch`` steps (enlarged ones
    included): warm-up is counted in plain epochs of ``num_images`` images, so arms with the same total steps
    share the learning rate at every step whatever their epoch length."""
    plain = plain_steps_per_epoch(num_images, world, cfg.train.batch_size // world)
    return schedule_steps(cfg.train.epochs, steps_per_epoch, cfg.train.max_steps, cfg.train.warmup_epochs, plain)


def lr_schedule(cfg, num_images: int, steps_per_epoch: int, world: int = 1) -> list[float]:
    """The learning rate of every optimizer step of a run (what ``pretrain`` sets), for tests and plots."""
    total, warmup = run_schedule(cfg, num_images, steps_per_epoch, world)
    return [lr_at(s, total, warmup, scaled_lr(cfg), cfg.train.min_lr) for s in range(1, total + 1)]
