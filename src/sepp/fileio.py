"""Crash-safe file writes shared by checkpoints and pair files, and the check that a run directory is
shared by every process of a multi-node job."""
from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Callable


from . import distributed as D
from .errors import SeppError


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write through ``write(file)`` into a temporary file beside ``path``, flush it to disk, then rename it
    over ``path`` (atomic on POSIX and Windows): a crash or kill mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# Seconds a process waits for rank 0's probe file to appear (network filesystems may show a new file late).
SHARED_DIR_WAIT_S = float(os.environ.get("SEPP_SHARED_DIR_WAIT_S", "20"))


def require_shared_dir(path: str | os.PathLike, what: str) -> None:
    """Under torch.distributed with several processes, fail on every rank (one line) unless all of them see
    the files rank 0 writes in ``path``: rank 0 writes checkpoints and pair files that the others read, and
    mining's embedding memmap is written by every rank into one file. A no-op in one process."""
    if D.get_world_size() == 1:
        return
    rank = D.get_rank()
    token = D.broadcast_object(secrets.token_hex(8) if rank == 0 else None)
    path = Path(path)
    probe = path / f".sepp_shared_{token}"
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    D.barrier()
    deadline = time.monotonic() + SHARED_DIR_WAIT_S
    while not (seen := probe.name in _listdir(path)) and time.monotonic() < deadline:
        time.sleep(0.2)  # listing the folder revalidates a network filesystem's cache
    flags = D.all_gather_object(seen)
    if rank == 0:
        probe.unlink()
    blind = [r for r, ok in enumerate(flags) if not ok]
    if blind:
        raise SeppError(f"{what} {path} is not on a filesystem shared by all processes: rank(s) "
                        f"{', '.join(map(str, blind))} cannot see files rank 0 writes there; for a multi-node run "
                        "put it on a shared filesystem (NFS, Lustre, ...)")


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
