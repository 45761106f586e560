"""Checkpoints that survive interrupts and load anywhere.

Writes go to a temporary file in the same directory, are flushed to disk and then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a crash or kill mid-write leaves the previous file intact.
Loading maps to CPU and strips the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import SeppError
from ..fileio import atomic_write

FORMAT = "sepp-checkpoint/1"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def clean_state_dict(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SeppError(f"checkpoint {path} does not exist; pass the last.pt (or epoch_*.pt) of a sepp run")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SeppError(f"checkpoint {path} cannot be read ({type(exc).__name__}); it is not a complete "
                        "torch file — use another checkpoint of the run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SeppError(f"{path} is not a sepp checkpoint (no '{FORMAT}' marker); `sepp export` output and "
                        "other frameworks' files cannot be resumed or evaluated with sepp")
    ckpt["model"] = clean_state_dict(ckpt["model"])
    return ckpt


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


RETIRED_KEYS = ("run.linear",)  # run.linear=false is now run.evals without "linear"


def config_from_checkpoint(ckpt: dict, overrides=()):
    """The run's config with machine-specific values reset (device, data root, workers), then overrides."""
    from omegaconf import OmegaConf

    from ..config import build_config, parse_overrides, resolve

    saved = OmegaConf.create(ckpt["config"])
    for key in RETIRED_KEYS:  # written by older versions; their meaning now lives elsewhere
        section, _, name = key.rpartition(".")
        node = OmegaConf.select(saved, section) if section else saved
        if node is not None and name in node:
            node.pop(name)
    saved.device = "auto"
    saved.data.root = None
    saved.data.workers = -1
    saved.train.amp = "auto"
    saved.train.resume = False
    return resolve(build_config(saved, parse_overrides(list(overrides))))


def load_trained(path, overrides=()):
    """(method in eval mode on cfg.device, resolved cfg, raw checkpoint) from a sepp checkpoint."""
    from ..methods import build_method

    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    method = build_method(cfg)
    method.load_state_dict(ckpt["model"])
    method.to(torch.device(cfg.device)).eval()
    return method, cfg, ckpt
