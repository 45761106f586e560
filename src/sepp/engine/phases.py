"""The phases of `sepp run` keyed by what produced them.

A phase folder holds ``fingerprint.json`` (written before the phase starts) and ``done.json`` (written when it
ends). A fingerprint is a flat ``{name: value}`` dict: the resolved config keys the phase reads (dotted), the
hashes of its inputs (checkpoint, pair file) and ``PHASE_FORMAT``, the version of what the code writes. On a
re-run (:func:`enter`) a finished phase with the same fingerprint is reused and an unfinished one resumed (from
its ``last.pt``); a phase whose fingerprint differs, or that has none, is moved aside to ``<out>/stale/`` and
runs again, so stale outputs are never mixed into new results. Downstream phases follow by their inputs: a
re-mined pair file has a new digest, so the SePP arms that read it train again. ``run.reuse=never`` moves
every existing phase aside. Each decision is one printed line that says why.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from sepp import distributed as D
from sepp.fileio import atomic_write

PHASE_FORMAT = 1  # raise when a phase's outputs change meaning: every older phase then runs again

# where and how a phase runs, or what it records, but not what it computes: never part of a fingerprint
NOT_SETTINGS = ("out", "command_line", "data.root", "data.workers", "data.download", "train.resume",
                "train.log_every", "train.save_every", "train.stop_at_epoch", "mine.out", "mine.save_embeddings")


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def settings_of(cfg, keep: tuple[str, ...] = (), drop: tuple[str, ...] = ()) -> dict:
    """The resolved config as a flat ``{dotted key: value}`` dict: only keys under ``keep`` (all when empty),
    without those under ``drop`` or ``NOT_SETTINGS``."""
    flat: dict = {}

    def walk(node: dict, prefix: str) -> None:
        for name, value in node.items():
            key = prefix + str(name)
            if _under(key, NOT_SETTINGS) or _under(key, drop):
                continue
            if isinstance(value, dict):
                walk(value, key + ".")
            elif not keep or _under(key, keep):
                flat[key] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return flat


def differences(old: dict, new: dict, most: int = 6) -> str:
    """``"mine.k 5 -> 400, mine.oracle none -> random"``: what changed between two fingerprints."""
    changed = [f"{key} {old.get(key, '(none)')} -> {new.get(key, '(none)')}"
               for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)]
    more = f", and {len(changed) - most} more" if len(changed) > most else ""
    return ", ".join(changed[:most]) + more


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


@dataclass
class Phase:
    """One phase folder of a run: ``title`` starts its printed lines, ``fingerprint`` keys it."""
    path: Path
    title: str
    fingerprint: dict


def enter(phase: Phase, out: Path, reuse: str = "auto"):
    """Reuse, resume or (re)start ``phase``: returns its ``done.json`` when it can be reused; otherwise
    ``None`` once its folder is ready (stale outputs moved aside, the fingerprint written)."""
    old = read_json(phase.path / "fingerprint.json")
    if reuse != "never" and old == phase.fingerprint:
        done = read_json(phase.path / "done.json")
        log(f"{phase.title}: settings and inputs unchanged: " + ("reusing it" if done else "resuming it"))
        return done
    if os.path.lexists(phase.path):
        why = ("run.reuse=never" if reuse == "never" else differences(old, phase.fingerprint) if old
               else "no fingerprint (made by an older sepp)")
        where = move_aside(phase.path, out)
        log(f"{phase.title}: {why}: running it again (previous outputs moved to {where})")
    else:
        log(phase.title)
    if D.is_main():
        phase.path.mkdir(parents=True, exist_ok=True)
        write_json(phase.path / "fingerprint.json", phase.fingerprint)
    D.barrier()
    return None


def move_aside(path: Path, out: Path) -> Path:
    """Move a stale phase folder (or the link to a shared one) to ``out/stale/`` under a free name."""
    rel = os.path.relpath(path, out).replace(os.sep, "_").replace("..", "up")
    dest, n = out / "stale" / rel, 1
    while os.path.lexists(dest):
        n += 1
        dest = out / "stale" / f"{rel}.{n}"
    if D.is_main():
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, dest)
    D.barrier()
    return dest


def mark_done(path: Path, info: dict) -> dict:
    """Write ``done.json``: the phase finished (its fingerprint was written when it started)."""
    if D.is_main():
        write_json(path / "done.json", info)
    D.barrier()
    return info


def log(msg: str) -> None:
    if D.is_main():
        print(f"== {msg}", flush=True)
