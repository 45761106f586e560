"""Training curves of several runs from their metrics.csv files."""
from __future__ import annotations

import csv
from pathlib import Path

# Figure without pyplot: renders with Agg and leaves the caller's matplotlib backend alone.
from matplotlib.figure import Figure

from sepp.errors import SeppError


def read_metrics(path: str | Path) -> list[dict[str, str]]:
    """Rows of a metrics.csv as dicts of raw strings (empty string = not measured)."""
    path = Path(path)
    if not path.is_file():
        raise SeppError(f"metrics file {path} not found; pass the metrics.csv of a training run")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], column: str, x: str = "epoch") -> tuple[list[float], list[float]]:
    """(x, y) of the rows where both columns hold a value."""
    xs, ys = [], []
    for row in rows:
        xv, yv = (row.get(x) or "").strip(), (row.get(column) or "").strip()
        if xv and yv:
            try:
                xs.append(float(xv))
                ys.append(float(yv))
            except ValueError:
                raise SeppError(f"non-numeric {x}/{column} value {xv!r}/{yv!r} in metrics; "
                                "fix or regenerate the metrics.csv") from None
    return xs, ys


def plot_curves(runs: dict[str, str | Path], path: str | Path, metric: str = "knn_top1",
                title: str | None = None) -> Path:
    """Plot ``metric`` (left) and ``loss`` (right) against epoch for each named run; writes ``path`` (PNG,
    or whatever format its suffix names) and returns it. Rows with an empty cell are skipped."""
    if not runs:
        raise SeppError("no runs to plot; pass at least one name -> metrics.csv")
    data = {name: read_metrics(p) for name, p in runs.items()}
    fig = Figure(figsize=(11, 4))
    ax_m, ax_l = fig.subplots(1, 2)
    for ax, column in ((ax_m, metric), (ax_l, "loss")):
        drawn = False
        for name, rows in data.items():
            xs, ys = series(rows, column)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name)
                drawn = True
        ax.set_xlabel("epoch")
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {column} values", ha="center", va="center", transform=ax.transAxes)
    ax_m.set_title(f"{metric} vs epoch")
    ax_l.set_title("training loss vs epoch")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
