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


def _mean_band(curves: list[tuple[list[float], list[float]]]):
    """Mean and std over runs at the x values every run has (one run: its own values, std 0)."""
    import numpy as np

    common = sorted(set.intersection(*(set(xs) for xs, _ in curves)))
    ys = np.array([[dict(zip(xs, yv))[x] for x in common] for xs, yv in curves])
    return common, ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))


def plot_curves(runs: dict, path: str | Path, metric: str = "knn_top1", title: str | None = None,
                x: str = "step") -> Path:
    """Plot ``metric`` (left) and ``loss`` (right) against ``x`` (optimizer steps by default: an enlarged
    SePP epoch has more steps than a baseline epoch, so per-epoch curves mislead) for each named run.
    A run is one metrics.csv or a list of them (seeds): then the mean is drawn with a ±1 std band at the
    x values all seeds share. Writes ``path`` (PNG, or the format its suffix names) and returns it."""
    if not runs:
        raise SeppError("no runs to plot; pass at least one name -> metrics.csv")
    data = {name: [read_metrics(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
            for name, paths in runs.items()}
    fig = Figure(figsize=(11, 4))
    ax_m, ax_l = fig.subplots(1, 2)
    for ax, column in ((ax_m, metric), (ax_l, "loss")):
        drawn = False
        for name, seeds in data.items():
            curves = [series(rows, column, x) for rows in seeds]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            xs, mean, std = _mean_band(curves)
            if not xs:
                continue
            label = name if len(curves) == 1 else f"{name} (mean ± std, {len(curves)} seeds)"
            line, = ax.plot(xs, mean, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
            if len(curves) > 1:
                ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            drawn = True
        ax.set_xlabel("optimizer step" if x == "step" else x)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {column} values", ha="center", va="center", transform=ax.transAxes)
    ax_m.set_title(f"{metric} vs {x}")
    ax_l.set_title(f"training loss vs {x}")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
