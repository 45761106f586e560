"""Checkpoints that survive interrupts, load anywhere and never run code when opened.

Writes go to a temporary file in the same directory, are flushed to disk and then renamed over the target
(``os.replace`` is atomic on POSIX and Windows), so a crash or kill mid-write leaves the previous file intact.

A checkpoint (``FORMAT`` = ``sepp-checkpoint/2``) holds only tensors and plain values (str, int, float,
bool, None, lists, dicts): the config as YAML text, the semantic pairs as tensors with their meta as JSON
text. It is opened with ``torch.load(..., weights_only=True)``, which refuses any other pickled object
instead of constructing it, so a shared checkpoint cannot execute code. Loading maps to CPU, strips the
``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes and returns the config as a plain dict and the
pairs as a :class:`sepp.data.pairs.Pairs`. ``sepp-checkpoint/1`` files (config as a dict, pairs as a :class:`sepp.data.pairs.Pairs`) open as well
when they hold only tensors and plain values (runs without semantic pairs); those with numpy pairs are
refused with one line.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ..config import build_config, parse_overrides, to_yaml
from ..data.pairs import Pairs
from ..errors import SeppError, warn_once
from ..fileio import atomic_write
from . import build_method, resolve

FORMAT = "sepp-checkpoint/2"
OLD_FORMATS = ("sepp-checkpoint/1",)  # config as a dict; read when no numpy pair arrays are inside
# torch's own str subclass (``torch.__version__``), which sepp-checkpoint/1 files carry; it runs no code
_ALLOWED = [torch.torch_version.TorchVersion]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def clean_state_dict(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.replace(prefix, "")
        out[key] = value
    return out


def save_checkpoint(path, method, optimizer, cfg, epoch: int, step: int, pairs=None, batch_in_epoch: int = 0):
    """Write a resumable checkpoint of ``method`` and ``optimizer`` (tensors and plain values only)."""
    payload = {
        "format": FORMAT,
        "model": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "step": int(step),
        "batch_in_epoch": int(batch_in_epoch),
        "config": to_yaml(cfg),
        "pairs": None if pairs is None else pairs.to_state(),
        "torch": str(torch.__version__),  # a plain str (torch.__version__ is a TorchVersion object)
    }
    _check_plain(payload, "checkpoint")  # fail now, not when the run is resumed
    atomic_save(payload, path)


_PLAIN = (str, int, float, bool, type(None))  # exactly these types: subclasses may not load


def _check_plain(obj, where: str) -> None:
    """Raise ``TypeError`` naming the first value that ``weights_only=True`` loading would refuse."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, f"{where} key")
            _check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for n, value in enumerate(obj):
            _check_plain(value, f"{where}[{n}]")
    elif type(obj) not in _PLAIN and not isinstance(obj, torch.Tensor):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold only "
                        "tensors and plain values (str, int, float, bool, None, list, tuple, dict)")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The checkpoint at ``path``, opened with ``weights_only=True``; ``config`` comes back as a plain dict and
    ``pairs`` (when present) as numpy ``i``, ``j``, ``sim`` and a ``meta`` dict. Raises a one-line
    :class:`SeppError` for a missing, truncated, unsafe or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise SeppError(f"checkpoint {path} does not exist; pass the last.pt (or epoch_*.pt) of a sepp run")
    try:
        with torch.serialization.safe_globals(_ALLOWED):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # refused objects, or bytes that are no pickle at all
        unsafe = _unsafe_globals(path)
        if unsafe or "unsupported global" in str(exc).lower():
            raise SeppError(_unsafe_message(path, unsafe)) from None
        raise SeppError(f"checkpoint {path} cannot be read (UnpicklingError); it is not a complete torch "
                        "file — use another checkpoint of the run") from None
    except Exception as exc:
        raise SeppError(f"checkpoint {path} cannot be read ({type(exc).__name__}); it is not a complete "
                        "torch file — use another checkpoint of the run") from None
    marker = ckpt.get("format") if isinstance(ckpt, dict) else None
    if marker not in (FORMAT, *OLD_FORMATS):
        raise SeppError(f"{path} is not a sepp checkpoint (no '{FORMAT}' marker); `sepp export` output and "
                        "other frameworks' files cannot be resumed or evaluated with sepp")
    try:
        ckpt["model"] = clean_state_dict(ckpt["model"])
        config = ckpt["config"]
        if isinstance(config, str):
            config = OmegaConf.to_container(OmegaConf.create(config))
        if not isinstance(config, dict):
            raise TypeError("config")
        ckpt["config"] = config
        if ckpt.get("pairs") is not None:
            ckpt["pairs"] = Pairs.from_state(ckpt["pairs"])
    except Exception as exc:
        raise SeppError(f"{path} is marked {marker} but its contents are damaged ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'missing entry'}); use another "
                        "checkpoint of the run") from None
    return ckpt


def _unsafe_globals(path: Path) -> list[str]:
    """The objects a file pickles beyond tensors and plain values, read from the pickle's opcodes (nothing
    is constructed); empty when the file cannot be parsed."""
    try:
        allowed = {f"{c.__module__}.{c.__qualname__}" for c in _ALLOWED}
        return [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except Exception:
        return []


def _unsafe_message(path: Path, names: list[str]) -> str:
    """One line for a file that ``weights_only=True`` refuses, naming the refused objects."""
    if names and all(n.split(".")[0] == "numpy" for n in names):
        return (f"{path} holds numpy arrays, as sepp-checkpoint/1 files of runs trained with semantic pairs do; "
                f"sepp opens checkpoints safely (tensors and plain values only, {FORMAT}) — retrain that run "
                "with this version of sepp")
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "unknown objects"
    return (f"{path} holds pickled Python objects ({shown}) that could run code when opened, so sepp refuses "
            f"it; sepp's own checkpoints ({FORMAT}) hold only tensors and plain values — use one of those")


def file_hash(path: str | os.PathLike, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


RETIRED_KEYS = ("run.linear",)  # run.linear=false is now run.evals without "linear"


def config_from_checkpoint(ckpt: dict, overrides=()):
    """The run's config with machine-specific values reset (device, data root, workers), then overrides."""
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
    ckpt = load_checkpoint(path)
    cfg = config_from_checkpoint(ckpt, overrides)
    method = build_method(cfg)
    method.load_state_dict(ckpt["model"])
    method.to(torch.device(cfg.device)).eval()
    return method, cfg, ckpt


def initial_state(method, init: dict) -> dict:
    """The state to start ``method`` from: ``init`` (a whole model's state, or ``backbone.*`` keys only) over
    the method's own fresh state. Backbone-only weights also go to every ``*_backbone`` child (the momentum /
    target copies start equal to the backbone, as at construction). A whole state that does not fit (other
    head sizes) gives way to its backbone, with a notice."""
    state = method.state_dict()
    misfit = [k for k, v in init.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)]
    if misfit and any(not k.startswith("backbone.") for k in init):
        warn_once(f"the initial weights' heads do not fit this {type(method).__name__} ({misfit[0]!r}); only "
                  "the backbone is taken from them, the heads start fresh", key=("init-heads", misfit[0]))
        return initial_state(method, {k: v for k, v in init.items() if k.startswith("backbone.")})
    if misfit:
        raise SeppError(f"the initial backbone does not fit the model: {misfit[0]!r}; check model.backbone "
                        "and model.cifar_stem against the encoder file")
    out = {**state, **init}
    if all(k.startswith("backbone.") for k in init):
        copies = [name for name, _ in method.named_children() if name.endswith("_backbone")]
        out.update({f"{c}.{k[len('backbone.'):]}": v for c in copies for k, v in init.items()})
    return out
