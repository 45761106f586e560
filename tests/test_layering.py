"""Imports point down the layers of docs/ARCHITECTURE.md, and nowhere else.

Every ``import`` / ``from ... import`` of every module under ``src/sepp`` is read with ``ast``, at module level
and inside functions alike. A module may import its own package and any package on a lower row; never a
package on its own row or above. There is no list of exceptions.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sepp"
ARCHITECTURE = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"

# Bottom row first. A name is a top-level module or package of sepp.
LAYERS = [
    ("errors", "distributed", "fileio", "config"),
    ("data", "models"),
    ("methods",),
    ("mining", "eval"),
    ("report",),
    ("engine",),
    ("cli",),
]
ROW = {name: row for row, names in enumerate(LAYERS) for name in names}
# Inside the ground row the modules form their own order (each may import those before it).
GROUND_ORDER = ["errors", "distributed", "fileio", "config"]


def _unit(module: str) -> str | None:
    """``sepp.x.y`` -> ``x`` (the layer unit); ``sepp`` itself -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "sepp" and len(parts) > 1 else None


def _module_name(path: Path, root: Path = SRC) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sepp_imports(path: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """``(line, imported sepp module)`` for every import statement of ``path``, wherever it stands."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if node.module is None or target == "sepp":  # `from . import x` / `from sepp import x`
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "sepp" or name.startswith("sepp.")]


def _allowed(src_unit: str, dst_unit: str) -> bool:
    if src_unit == dst_unit:
        return True
    if ROW[src_unit] == ROW[dst_unit] == 0:
        return GROUND_ORDER.index(dst_unit) < GROUND_ORDER.index(src_unit)
    return ROW[dst_unit] < ROW[src_unit]


MODULES = sorted(SRC.rglob("*.py"))


def test_every_module_has_a_layer():
    units = {_unit(_module_name(p)) for p in MODULES} - {None}
    assert units <= set(ROW), f"give these a row in LAYERS and in docs/ARCHITECTURE.md: {units - set(ROW)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    src_unit = _unit(_module_name(path))
    bad = []
    for line, name in sepp_imports(path):
        dst_unit = _unit(name)
        if src_unit is None:  # sepp/__init__.py: imports nothing of sepp, so `import sepp.x` stays light
            bad.append(f"line {line}: {name}")
        elif dst_unit is None or not _allowed(src_unit, dst_unit):
            bad.append(f"line {line}: {name}")
    assert not bad, f"{path.relative_to(SRC)} ({src_unit}, row {ROW.get(src_unit)}) imports upward or sideways: " \
                    + "; ".join(bad)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "sepp" / "data"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("from ..config import a\n\ndef f():\n    from ..engine import trainer\n"
                              "    import sepp.eval.knn\n    from . import y\n")
    names = [n for _, n in sepp_imports(pkg / "x.py", tmp_path / "sepp")]
    assert names == ["sepp.config", "sepp.engine", "sepp.eval.knn", "sepp.data.y"]
    assert not _allowed("data", "engine") and not _allowed("mining", "eval") and _allowed("mining", "methods")
    assert not _allowed("config", "methods") and _allowed("config", "errors") and not _allowed("errors", "config")


def test_architecture_table_matches():
    """The layer table of docs/ARCHITECTURE.md lists the same rows, in the same order."""
    text = ARCHITECTURE.read_text()
    table = text.split("<!-- layers -->")[1]
    rows = [line for line in table.strip().splitlines() if line.startswith("|") and not line.startswith("|--")]
    documented = [tuple(re.findall(r"`sepp\.(\w+)`", row.split("|")[2])) for row in rows[1:]]
    assert [tuple(sorted(r)) for r in documented] == [tuple(sorted(r)) for r in LAYERS]


# ---- function length ----------------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 50


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``name (lines)`` of every function or method of ``path`` longer than ``limit`` lines, from its ``def``
    line to its last line (docstring and nested functions included)."""
    return [f"{node.name} ({node.end_lineno - node.lineno + 1})"
            for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


@pytest.mark.parametrize("path", MODULES,
                         ids=lambda p: str(p.relative_to(SRC)))
def test_functions_are_at_most_50_lines(path):
    assert not long_functions(path), f"{path.relative_to(SRC)}: split {', '.join(long_functions(path))}"


def test_the_length_check_counts_from_def_to_the_last_line(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(49))
    (tmp_path / "m.py").write_text(f"def ok():\n{body}\n\n\ndef long():\n{body}\n    return 1\n")
    assert long_functions(tmp_path / "m.py") == ["long (51)"]
