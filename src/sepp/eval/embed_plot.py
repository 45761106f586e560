"""2-D pictures of feature spaces (`sepp eval embed-plot`): UMAP (umap-learn) or t-SNE (scikit-learn) of the
evaluation split's backbone features, one panel per model, points coloured by class.

Features are L2-normalised (the cosine geometry kNN and mining use), centred and reduced to 50 dimensions by
PCA before the 2-D embedding (the usual t-SNE preprocessing); every panel draws the same class-balanced
sample of images, so panels can be compared point for point. Both packages are optional:
``pip install scikit-learn`` (t-SNE) or ``pip install umap-learn``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from sepp.errors import SeppError
from sepp.eval.data import eval_data, eval_input
from sepp.methods.checkpoint import load_trained
from sepp.models.features import extract_features

ALGORITHMS = ("auto", "umap", "tsne")


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def resolve_algorithm(algorithm: str = "auto") -> str:
    """``umap`` or ``tsne``; ``auto`` takes UMAP when umap-learn is installed, else t-SNE. A missing package
    raises one line saying what to install."""
    if algorithm not in ALGORITHMS:
        raise SeppError(f"unknown embedding {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "auto":
        algorithm = "umap" if _available("umap") else "tsne"
    if algorithm == "umap" and not _available("umap"):
        raise SeppError("UMAP pictures need umap-learn, which is not installed; pip install umap-learn "
                        "(or use eval.embed_algorithm=tsne with scikit-learn)")
    if algorithm == "tsne" and not _available("sklearn"):
        raise SeppError("embedding pictures need scikit-learn (t-SNE) or umap-learn, neither is installed; "
                        "pip install scikit-learn  (or: pip install 'sepp[embed]')")
    return algorithm


def balanced_sample(labels: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, as equal per class as the classes allow."""
    labels = np.asarray(labels)
    if max_points <= 0 or max_points >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [rows[r] for r in range(max(map(len, per_class))) for rows in per_class if r < len(rows)]
    return np.sort(np.asarray(order[:max_points], dtype=np.int64))


def embed_2d(features, algorithm: str = "auto", seed: int = 0) -> np.ndarray:
    """``[N, 2]`` float32 coordinates of ``features`` ``[N, D]`` (normalised, PCA to <= 50 dims, then UMAP or
    t-SNE as ``resolve_algorithm`` picks)."""
    algorithm = resolve_algorithm(algorithm)
    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 5:
        raise SeppError(f"an embedding picture needs at least 5 feature rows [N, D], got {list(x.shape)}")
    x = torch.nn.functional.normalize(x, dim=1)
    x = x - x.mean(0)
    k = min(50, x.shape[1], x.shape[0])
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    x = (x @ v[:k].T).numpy()
    if algorithm == "umap":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), min_dist=0.1, random_state=seed)
    else:
        from sklearn.manifold import TSNE

        reducer = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), init="pca", random_state=seed)
    return reducer.fit_transform(x).astype(np.float32)


def _features_of(model, data, device, normalize, batch_size: int) -> np.ndarray:
    if isinstance(model, nn.Module):
        backbone = getattr(model, "backbone", model)
        return extract_features(backbone, data, device, batch_size, normalize=normalize).numpy()
    return np.asarray(model.detach().cpu() if isinstance(model, torch.Tensor) else model, dtype=np.float32)


def embed_plot(models: dict, labels, classes, out_png, *, data=None, normalize=None, device="cpu",
               algorithm: str = "auto", max_points: int = 5000, seed: int = 0, batch_size: int = 512) -> dict:
    """Draw one panel per entry of ``models`` (e.g. ``{"baseline": m1, "SePP": m2}``) side by side in
    ``out_png``. A value is a method or backbone (``nn.Module``; its ``.backbone`` is used when it has one),
    evaluated on ``data`` (an eval-transformed dataset, or a uint8 ``[N, 3, H, W]`` tensor with
    ``normalize``), or a precomputed ``[N, D]`` feature array. ``labels`` ``[N]`` and ``classes`` (names)
    colour the points; the same class-balanced sample of at most ``max_points`` rows is drawn in every
    panel. Returns ``{"path", "algorithm", "indices", "coords": {name: [n, 2] array}}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not models:
        raise SeppError("embed_plot needs at least one model or feature array")
    algorithm = resolve_algorithm(algorithm)
    labels = np.asarray(labels)
    idx = balanced_sample(labels, max_points, seed)
    if any(isinstance(m, nn.Module) for m in models.values()):
        if data is None:
            raise SeppError("embed_plot got a model but no data to embed; pass data= (dataset or uint8 tensor)")
        data = data[torch.as_tensor(idx)] if isinstance(data, torch.Tensor) else Subset(data, idx.tolist())
    coords = {}
    for name, model in models.items():
        feats = _features_of(model, data, device, normalize, batch_size)
        feats = feats if isinstance(model, nn.Module) else feats[idx]
        coords[name] = embed_2d(feats, algorithm, seed)
    y = labels[idx]
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(coords), figsize=(5.5 * len(coords), 5.5), squeeze=False)
    size = min(20.0, max(2.0, 8000.0 / len(y)))  # 4 pt^2 at 2000 points, larger for small samples
    for ax, (name, xy) in zip(axes[0], coords.items()):
        for c, cname in enumerate(classes):
            m = y == c
            ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(c % cmap.N), label=str(cname), alpha=0.8,
                       linewidths=0)
        ax.set_title(f"{name} ({'UMAP' if algorithm == 'umap' else 't-SNE'}, {len(y)} images)")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(10, len(names)), markerscale=6 / size ** 0.5,
               frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return {"path": str(out_png), "algorithm": algorithm, "indices": idx, "coords": coords}


def embed_plot_checkpoints(checkpoints: dict[str, str], overrides=(), out: str | None = None) -> dict:
    """`sepp eval embed-plot`: panels for ``{name: checkpoint}`` on the first checkpoint's evaluation split
    (``data.eval_split``, ``eval.embed_points`` images, ``eval.embed_algorithm``)."""
    methods, cfg = {}, None
    for name, path in checkpoints.items():
        method, c, _ = load_trained(path, overrides)
        methods[name], cfg = method, cfg or c
    test = eval_data(cfg, cfg.data.eval_split, cfg.data.eval_subset)
    if test.labels is None or (test.labels < 0).any():
        raise SeppError(f"embedding pictures are coloured by class; split {test.split!r} has no labels")
    data, normalize = eval_input(test, cfg.data.image_size, cfg.data.name)
    data = data[0] if isinstance(data, tuple) else data
    first = next(iter(checkpoints.values()))
    out = out or str(Path(first).with_name(f"{Path(first).stem}_embed.png"))
    return embed_plot(methods, test.labels, test.classes, out, data=data, normalize=normalize, device=cfg.device,
                      algorithm=cfg.eval.embed_algorithm, max_points=cfg.eval.embed_points, seed=cfg.seed,
                      batch_size=cfg.eval.batch_size)
