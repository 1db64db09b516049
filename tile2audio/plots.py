"""Every figure of the toolkit, drawn on matplotlib's Agg backend and saved atomically.

:func:`pyplot` (the Agg-backed ``matplotlib.pyplot``) and :func:`save_png` are the one
setup and save path; :func:`plot_confusion`, :func:`plot_embedding_map` (UMAP when
installed, else t-SNE) and :func:`plot_curves` (k-means inertia and silhouette against
k) are used by :mod:`tile2audio.report` and :mod:`tile2audio.clusters`, which both
import this module and not each other's drawing code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import atomic
from .errors import Tile2AudioError
from .probes import SMALL_PROBLEM

__all__ = ["pyplot", "save_png", "plot_confusion", "project_2d", "plot_embedding_map", "plot_curves"]


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Save a figure atomically as PNG and close it."""
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return Path(path)


def plot_confusion(confusion: list, labels: list[str], path: str | Path, title: str) -> Path:
    """Confusion matrix: colour is the fraction of the true class, text the count.

    Parameters
    ----------
    confusion : (L, L) counts, rows true labels, columns predicted
    labels : the L label names
    path : output .png
    title : figure title

    Returns
    -------
    Path
    """
    plt = pyplot()
    cm = np.asarray(confusion, dtype=float)
    frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(5.0, 0.55 * len(labels) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_title(title)
    path = Path(path)
    save_png(fig, path)
    return path


def project_2d(X: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """2-D coordinates of standardised rows: UMAP when installed, else t-SNE.

    Parameters
    ----------
    X : np.ndarray, shape (n, D), finite
    seed : projection seed

    Raises
    ------
    Tile2AudioError
        When every row is the same (a collapsed encoder): there is nothing to project.

    Returns
    -------
    (np.ndarray of shape (n, 2), str)
        The coordinates and the method (``UMAP`` or ``t-SNE``).
    """
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if len(X) and not np.ptp(X, axis=0).any():  # t-SNE of identical rows divides by zero (and has crashed)
        raise Tile2AudioError(f"all {len(X)} clips have the same embedding (a collapsed encoder?): nothing to map")
    X = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    with threadpool_limits(1 if X.size < SMALL_PROBLEM else None):
        return _project(X, seed)


def _project(X: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """PCA to 50 dimensions when wider, then UMAP or t-SNE to 2."""
    from sklearn.decomposition import PCA

    if X.shape[1] > 50 and X.shape[0] > 50:
        X = PCA(n_components=50, random_state=seed).fit_transform(X)
    try:
        import umap  # optional dependency

        return umap.UMAP(n_components=2, random_state=seed).fit_transform(X), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (X.shape[0] - 1) / 3)))
        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
        return tsne.fit_transform(X), "t-SNE"


def plot_embedding_map(X: np.ndarray, labels: np.ndarray, path: str | Path, name: str,
                       pooling: str = "mean", seed: int = 0, projection=None) -> tuple[Path, str]:
    """2-D map of clip embeddings coloured by label.

    Parameters
    ----------
    X : np.ndarray, shape (n_clips, D)
    labels : np.ndarray of str, shape (n_clips,); "" is drawn grey as "(no label)"
    path : output .png
    name, pooling : for the title
    seed : projection seed
    projection : (np.ndarray (n_finite, 2), str), optional
        A :func:`project_2d` result of the finite rows of ``X``, to draw instead of projecting again.

    Returns
    -------
    (Path, str)
        The PNG and the method used (``UMAP`` or ``t-SNE``).
    """
    plt = pyplot()
    X = np.asarray(X)
    keep = np.isfinite(X).all(axis=1)
    X, labels = X[keep], np.asarray(labels).astype(str)[keep]
    if len(X) < 5:
        raise Tile2AudioError(f"an embedding map needs at least 5 clips, got {len(X)}")
    xy, method = project_2d(X, seed) if projection is None else projection
    names = sorted(set(labels) - {""})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8, 6.5))
    if (labels == "").any():
        m = labels == ""
        ax.scatter(xy[m, 0], xy[m, 1], s=12, c="lightgrey", label="(no label)")
    for i, lab in enumerate(names):
        m = labels == lab
        ax.scatter(xy[m, 0], xy[m, 1], s=14, color=cmap(i % cmap.N), label=lab, alpha=0.85)
    ax.set_xlabel(f"{method} 1")
    ax.set_ylabel(f"{method} 2")
    ax.set_title(f"{method} of {name} clip embeddings ({pooling} pooling, {len(X)} clips)")
    ax.legend(title="label", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=1.5)
    path = Path(path)
    save_png(fig, path)
    return path, method


# --------------------------------------------------------------------------- report


def plot_curves(result: dict, path: str | Path, title: str = "k-means cluster-count analysis") -> Path:
    """Draw inertia (elbow) and silhouette against k, chosen k marked; save a PNG.

    Parameters
    ----------
    result : dict from :func:`cluster_sweep`
    path : output .png
    title : figure title

    Returns
    -------
    Path
    """
    plt = pyplot()
    ks = result["ks"]
    curves = result["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = [("inertia", "Inertia (within-cluster sum of squares)", "elbow"),
              ("silhouette", "Silhouette score", "silhouette")]
    for ax, (key, ylabel, crit) in zip(axes, panels):
        pts = [(r["k"], r[key]) for r in curves if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", color="tab:blue")
        k = result["chosen"].get(crit)
        if k is not None:
            ax.axvline(k, color="tab:red", linestyle="--", label=f"{crit} pick: k = {k}")
        nc = result.get("n_classes")
        if nc and ks[0] <= nc <= ks[-1]:
            ax.axvline(nc, color="grey", linestyle=":", label=f"classes: {nc}")
        ax.set_xlabel("number of clusters k")
        ax.set_ylabel(ylabel)
        ax.set_xticks(ks if len(ks) <= 20 else ks[:: max(1, len(ks) // 20)])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
    axes[0].set_title("Elbow (kneedle rule)")
    axes[1].set_title("Silhouette (higher is better)")
    fig.suptitle(title + (" (standardised features)" if result.get("standardized") else ""))
    fig.tight_layout()
    path = Path(path)
    save_png(fig, path)
    return path
