"""One exception type for every user-facing failure, one function for every user-facing warning.

The CLI prints ``error: <message>`` on one line and exits with status 2; library users catch it.
Messages say what was wrong and what to do about it.

Warnings go through :func:`warn_once`: a :class:`SeppWarning` (so ``warnings`` filters, ``-W`` and
``pytest.warns`` still apply) issued once per process and key, by the main process of a torchrun job only,
and printed as the single line ``warning: <message>`` without the file, line number and source line that
Python's default format adds.
"""
from __future__ import annotations

import os
import warnings


class SeppError(Exception):
    """A problem with the user's input, data or files, explained in one line."""


class SeppWarning(UserWarning):
    """A notice for the user (e.g. a modified dataset copy); printed as one clean line."""


_WARNED: set = set()


def warn_once(message: str, key=None) -> None:
    """Warn with ``message`` (one line) unless this process already warned with ``key`` (default: the
    message). Under torchrun only global rank 0 prints, so a job shows each notice once."""
    key = message if key is None else key
    if key in _WARNED:
        return
    _WARNED.add(key)
    if os.environ.get("RANK", "0") != "0":
        return
    warnings.warn(" ".join(str(message).split()), SeppWarning, stacklevel=2)


def reset_warnings() -> None:
    """Forget which warnings were issued (tests that check a warning each time)."""
    _WARNED.clear()


def _format(message, category, filename, lineno, line=None, _plain=warnings.formatwarning):
    if isinstance(category, type) and issubclass(category, SeppWarning):
        return f"warning: {message}\n"
    return _plain(message, category, filename, lineno, line)


def _format_any(message, category, filename, lineno, line=None):
    """Every warning as one line: ours as ``warning: <message>``, others' with their category and origin
    (``warning: UserWarning from torch/...py:12: <first line>``) but never the source line."""
    if isinstance(category, type) and issubclass(category, SeppWarning):
        return f"warning: {message}\n"
    text = " ".join(str(message).split())
    return f"warning: {getattr(category, '__name__', category)} from {filename}:{lineno}: {text}\n"


def one_line_warnings() -> None:
    """Print every warning of this process (also other libraries') as a single line without source code;
    the ``sepp`` command calls this once at start."""
    _format_any._sepp = True
    warnings.formatwarning = _format_any


if not getattr(warnings.formatwarning, "_sepp", False):  # once, also if this module is reloaded
    _format._sepp = True
    warnings.formatwarning = _format
