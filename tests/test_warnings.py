"""User-facing warnings are one clean line, once per process, without Python's file:line and source line."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest

from sepp import errors
from sepp.errors import SeppWarning, reset_warnings, warn_once

# the real code path: the shared CIFAR-10 copy is JPEG-degraded, so its md5s differ from the official ones
BUILD_SPLITS = (
    "import sys\n"
    "from sepp.data.datasets import build_dataset\n"
    "for split in ('train', 'test', 'train'):\n"
    "    build_dataset({'name': 'cifar10', 'root': sys.argv[1], 'split': split, 'subset': 100})\n"
    "print('built', flush=True)\n"
)


def _run(cifar_root):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK")}
    return subprocess.run([sys.executable, "-c", BUILD_SPLITS, str(cifar_root)], capture_output=True, text=True,
                          env=clean, timeout=300)


def test_modified_dataset_notice_is_one_clean_line_once(cifar_root):
    proc = _run(cifar_root)
    assert proc.returncode == 0 and proc.stdout.strip() == "built", proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith("warning: ") and "md5" in line and "loading anyway" in line, line
    for source_marker in ("UserWarning", "SeppWarning", ".py:", "warn_once(", "warnings.warn"):
        assert source_marker not in line, line


def test_only_rank_zero_prints(monkeypatch):
    reset_warnings()
    monkeypatch.setenv("RANK", "1")  # a torchrun process other than rank 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_once("shown by rank 0 only")
    assert caught == []


def test_warn_once_is_a_filterable_warning():
    reset_warnings()
    with pytest.warns(SeppWarning, match="spread over lines"):
        warn_once("spread\nover   lines", key="t")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_once("again", key="t")  # same key: not repeated
    assert caught == []
    # as a library (import sepp): only sepp's own warnings are reformatted
    text = errors._format(SeppWarning("x y"), SeppWarning, __file__, 1, "source line")
    assert text == "warning: x y\n"
    other = errors._format(UserWarning("z"), UserWarning, __file__, 1, "source line")
    assert "source line" in other  # other libraries' warnings keep Python's format
    # under the `sepp` command (one_line_warnings): every warning is one line without source
    assert errors._format_any(SeppWarning("x y"), SeppWarning, __file__, 1, "src") == "warning: x y\n"
    assert "src" not in errors._format_any(UserWarning("z"), UserWarning, __file__, 1, "src")


def test_the_cli_prints_other_libraries_warnings_as_one_line_too():
    script = ("import warnings, sys\n"
              "import sepp.cli as c\n"
              "def boom(args):\n"
              "    warnings.warn('a library notice\\nover two lines', UserWarning)\n"
              "c._augment_grid = boom\n"  # the subcommand's work replaced by a third-party warning
              "sys.exit(c.main(['augment-grid', '--config', 'demo']))\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=clean, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: UserWarning from "), proc.stderr
    assert lines[0].endswith("a library notice over two lines") and "warnings.warn(" not in proc.stderr


def test_a_demo_log_has_no_python_source_lines(cifar_root, tmp_path):
    """`sepp demo` at toy size, as a user runs it (a fresh process, every phase: pretraining, mining with its
    pictures, SePP training, evaluation, report): every line of its output is sepp's own, none is a
    warning's ``file.py:N: Category`` header or the source line Python prints under it."""
    from conftest import tiny_overrides

    # a fresh folder: a second run would resume the first one's finished phases without loading the data (and
    # so without the notice)
    args = ["demo", "--out", str(tmp_path / "demo"),
            *tiny_overrides(cifar_root, tmp_path / "demo", method="simclr", subset=64, batch=16),
            "run.baseline_epochs=1", "run.sepp_epochs=1", "mine.k=2", "eval.linear_epochs=2", "run.seeds=[]"]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RANK")}
    proc = subprocess.run([sys.executable, "-m", "sepp.cli", *args], capture_output=True, text=True, env=clean,
                          timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-2000:]
    assert "md5" in log  # the modified-CIFAR notice was printed (once) ...
    assert log.count("loading anyway") == 1
    for line in log.splitlines():  # ... and nothing Python-formatted came with it or anything else
        assert not re.search(r"\.py:\d+: \w*(Warning|Error)", line), line
        assert not re.match(r"\s+(warnings\.warn|warn_once|raise |return |import |from \w+ import )", line), line
        assert "Traceback" not in line, line
