"""Figures of mined pairs: a gallery of anchors with their partners, and the similarity histogram.

Drawn on Agg canvases of standalone ``Figure`` objects, so no pyplot state or display is involved.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

WRONG = "tab:red"


def _save(fig: Figure, path: str | os.PathLike) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def _name(labels, classes, k: int) -> str:
    if labels is None or labels[k] < 0:
        return ""
    c = int(labels[k])
    return classes[c] if classes is not None and c < len(classes) else str(c)


def pairs_gallery(get_image: Callable[[int], np.ndarray], i, j, sim, path: str | os.PathLike,
                  labels=None, classes: Sequence[str] | None = None, anchors: int = 8, partners: int = 6,
                  seed: int = 0) -> None:
    """Randomly chosen anchors (``seed``), each followed by its first ``partners`` partners titled with their
    similarity. With labels, class names are shown and wrong-class partners get a red frame and a red "x".
    When anchors have few partners (small k), several anchor groups share a row so the figure stays
    compact and shows more anchors (up to ``anchors`` rows). ``get_image(k)`` returns image k as HxWx3 uint8."""
    i, j, sim = np.asarray(i), np.asarray(j), np.asarray(sim)
    labels = None if labels is None else np.asarray(labels)
    uniq = np.unique(i)
    if not len(uniq):
        fig = Figure(figsize=(4, 1.5))
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no pairs (threshold too high?)", ha="center", va="center")
        _save(fig, path)
        return
    counts = np.bincount(i, minlength=int(uniq.max()) + 1)
    width = 1 + max(1, min(partners, int(counts[uniq].max())))  # anchor + partner columns per group
    groups = max(1, 7 // width)  # anchor groups side by side in one row
    rng = np.random.default_rng(seed)
    chosen = rng.choice(uniq, size=min(anchors * groups, len(uniq)), replace=False)
    rows = -(-len(chosen) // groups)
    fig = Figure(figsize=(1.6 * width * groups, 1.8 * rows))
    axes = fig.subplots(rows, width * groups, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for n, a in enumerate(chosen):
        r, c0 = divmod(n, groups)
        c0 *= width
        ax = axes[r, c0]
        ax.axis("on")
        ax.imshow(get_image(int(a)))
        ax.set_title(f"anchor {int(a)}\n{_name(labels, classes, a)}", fontsize=7, fontweight="bold")
        for c, p in enumerate(np.flatnonzero(i == a)[: width - 1], start=1):
            b = int(j[p])
            ax = axes[r, c0 + c]
            ax.axis("on")
            ax.imshow(get_image(b))
            wrong = (labels is not None and labels[a] >= 0 and labels[b] >= 0 and labels[a] != labels[b])
            ax.set_title(f"{'x ' if wrong else ''}{sim[p]:.3f}\n{_name(labels, classes, b)}", fontsize=7,
                         color=WRONG if wrong else "black")
            if wrong:
                for spine in ax.spines.values():
                    spine.set_edgecolor(WRONG)
                    spine.set_linewidth(3)
    fig.tight_layout()
    _save(fig, path)


def similarity_hist(sim, path: str | os.PathLike, correct=None, bins: int = 50) -> None:
    """Histogram of pair similarities; with ``correct`` (bool per pair) same-class and wrong-class pairs
    are overlaid."""
    sim = np.asarray(sim, np.float64)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = (float(sim.min()), float(sim.max())) if len(sim) else (0.0, 1.0)
    edges = np.linspace(lo, hi if hi > lo else lo + 1e-3, bins + 1)
    if correct is None:
        ax.hist(sim, bins=edges, color="tab:blue", label=f"all pairs ({len(sim)})")
    else:
        correct = np.asarray(correct, bool)
        ax.hist(sim[correct], bins=edges, alpha=0.6, color="tab:green",
                label=f"same class ({int(correct.sum())})")
        ax.hist(sim[~correct], bins=edges, alpha=0.6, color=WRONG,
                label=f"different class ({int((~correct).sum())})")
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("pairs")
    ax.set_title("similarity of mined pairs")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
