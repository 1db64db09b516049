"""k-means cluster-count analysis: how many groups does the embedding space hold?

For each k in ``k_min..k_max`` one seeded k-means (``n_init`` fixed at :data:`N_INIT`)
gives the inertia, the silhouette (on a seeded sample of at most
``silhouette_sample`` points), the Calinski-Harabasz and the Davies-Bouldin indices,
and, when affordable, the gap statistic. Each criterion picks a k:

``elbow``
    the kneedle rule: with k and inertia both scaled to [0, 1], the k farthest below
    the chord from the first to the last point of the curve;
``silhouette`` / ``calinski_harabasz``
    the maximum;
``davies_bouldin``
    the minimum;
``gap``
    Tibshirani, Walther & Hastie (2001): the smallest k with
    Gap(k) >= Gap(k+1) - s(k+1), references drawn uniformly in the data's bounding box.

Features are standardised (z-scored per dimension) before clustering unless
``standardize=False``, so that handcrafted features with unequal scales (the MFCC
baseline) and embeddings are clustered on the same footing.

With labels, the clusterings at k = number of classes and at every chosen k are
compared with them: NMI, ARI, V-measure, purity, Hungarian-matched accuracy
(one-to-one matching of clusters to classes with ``linear_sum_assignment``; unmatched
clusters count as errors) and the cluster x label composition table. Points with an
empty label are clustered but left out of these scores.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
    silhouette_score,
    v_measure_score,
)
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from . import atomic
from .config import ClusterConfig
from .errors import Tile2AudioError
from .plots import plot_curves
from .probes import SMALL_PROBLEM

log = logging.getLogger(__name__)

N_INIT = 4
GAP_REFERENCES = 5
#: Above this many point-dimension-cluster products (summed over k and references) the
#: gap statistic is skipped: it costs GAP_REFERENCES extra k-means sweeps.
GAP_BUDGET = 3e9


def _kmeans(X: np.ndarray, k: int, seed: int) -> KMeans:
    """A fitted, seeded k-means."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning for duplicate points
        return KMeans(n_clusters=k, n_init=N_INIT, random_state=seed).fit(X)


def elbow_k(ks: list[int], inertia: list[float]) -> int | None:
    """The kneedle / max-distance-to-chord elbow of a decreasing inertia curve.

    Parameters
    ----------
    ks : list of int, increasing
    inertia : list of float, same length

    Returns
    -------
    int or None
        None when there are fewer than 3 points or the curve is flat.
    """
    if len(ks) < 3:
        return None
    x = np.asarray(ks, dtype=float)
    y = np.asarray(inertia, dtype=float)
    if np.ptp(y) <= 0:
        return None
    x = (x - x[0]) / (x[-1] - x[0])
    y = (y - y.min()) / np.ptp(y)
    # Chord from (0, y0) to (1, y_last); distance below it (y is decreasing and convex).
    chord = y[0] + (y[-1] - y[0]) * x
    return int(ks[int(np.argmax(chord - y))])


def _gap_statistic(X: np.ndarray, ks: list[int], inertia: list[float], seed: int) -> tuple[list, list]:
    """Gap(k) and s(k) from uniform references in the bounding box of ``X``."""
    rng = np.random.default_rng(seed)
    lo, hi = X.min(axis=0), X.max(axis=0)
    ref_logw = np.zeros((GAP_REFERENCES, len(ks)))
    for b in range(GAP_REFERENCES):
        R = rng.uniform(lo, hi, size=X.shape)
        for j, k in enumerate(ks):
            ref_logw[b, j] = np.log(max(_kmeans(R, k, seed + b).inertia_, 1e-300))
    logw = np.log(np.maximum(np.asarray(inertia), 1e-300))
    gap = ref_logw.mean(axis=0) - logw
    s = ref_logw.std(axis=0) * np.sqrt(1 + 1 / GAP_REFERENCES)
    return gap.tolist(), s.tolist()


def _gap_k(ks: list[int], gap: list[float], s: list[float]) -> tuple[int, str | None]:
    """Tibshirani's rule; falls back to the largest gap (with a note) when no k passes."""
    for j in range(len(ks) - 1):
        if gap[j] >= gap[j + 1] - s[j + 1]:
            return ks[j], None
    return ks[int(np.argmax(gap))], "no k passed Gap(k) >= Gap(k+1) - s(k+1); the largest gap is reported"


def hungarian_accuracy(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Accuracy after the best one-to-one matching of clusters to labels.

    Parameters
    ----------
    labels, clusters : np.ndarray, shape (n,)

    Returns
    -------
    float
        Matched points / n; clusters (or classes) left without a partner count as errors.
    """
    c = contingency_matrix(labels, clusters)
    rows, cols = linear_sum_assignment(-c)
    return float(c[rows, cols].sum() / len(labels))


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of points whose cluster's majority label is their own."""
    c = contingency_matrix(labels, clusters)
    return float(c.max(axis=0).sum() / len(labels))


def label_agreement(labels: np.ndarray, clusters: np.ndarray) -> dict:
    """NMI, ARI, V-measure, purity, Hungarian accuracy and the composition table.

    Parameters
    ----------
    labels : np.ndarray of str, shape (n,)
    clusters : np.ndarray of int, shape (n,)

    Returns
    -------
    dict
        ``nmi, ari, v_measure, purity, accuracy`` and ``composition``:
        ``{"labels": [...], "clusters": [...], "counts": [[count of label j in cluster i]]}``.
    """
    labs = np.unique(labels)
    clus = np.unique(clusters)
    counts = contingency_matrix(clusters, labels)  # rows: clusters, columns: labels (sorted)
    return {
        "nmi": float(normalized_mutual_info_score(labels, clusters)),
        "ari": float(adjusted_rand_score(labels, clusters)),
        "v_measure": float(v_measure_score(labels, clusters)),
        "purity": purity(labels, clusters),
        "accuracy": hungarian_accuracy(labels, clusters),
        "composition": {"labels": labs.tolist(), "clusters": clus.astype(int).tolist(),
                        "counts": counts.astype(int).tolist()},
    }


def _check_input(X: np.ndarray, config: ClusterConfig) -> tuple[np.ndarray, list[int]]:
    """Validate ``X`` and the k range (clipped to n - 1 points)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] < 3 or X.shape[1] == 0:
        raise Tile2AudioError(f"cluster analysis needs a (n >= 3, D >= 1) matrix, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise Tile2AudioError("cluster analysis: the features hold NaN or inf values")
    k_max = min(config.k_max, X.shape[0] - 1)
    if k_max < config.k_min:
        raise Tile2AudioError(f"cluster analysis: {X.shape[0]} points are too few for k >= {config.k_min}")
    if k_max < config.k_max:
        log.warning("cluster analysis: k_max lowered from %d to %d (only %d points)", config.k_max, k_max, X.shape[0])
    return X, list(range(config.k_min, k_max + 1))


def _sweep_row(X: np.ndarray, k: int, config: ClusterConfig) -> tuple[dict, np.ndarray]:
    """Scores of one k and the cluster assignment."""
    km = _kmeans(X, k, config.seed)
    assign = km.labels_
    n_used = len(np.unique(assign))
    row = {"k": k, "inertia": float(km.inertia_), "silhouette": None, "calinski_harabasz": None,
           "davies_bouldin": None}
    if n_used >= 2:  # the indices need at least two non-empty clusters
        sample = config.silhouette_sample if X.shape[0] > config.silhouette_sample else None
        row["silhouette"] = float(silhouette_score(X, assign, sample_size=sample, random_state=config.seed))
        row["calinski_harabasz"] = float(calinski_harabasz_score(X, assign))
        row["davies_bouldin"] = float(davies_bouldin_score(X, assign))
    return row, assign


def _pick(rows: list[dict], key: str, best) -> int | None:
    """The k with the best (max / min) defined score."""
    vals = [(r[key], r["k"]) for r in rows if r[key] is not None]
    return best(vals)[1] if vals else None


def cluster_sweep(
    X: np.ndarray,
    labels: np.ndarray | None = None,
    config: ClusterConfig = ClusterConfig(),
    n_classes: int | None = None,
    standardize: bool = True,
) -> dict:
    """Run k-means for every k of the range and report what each criterion picks.

    Parameters
    ----------
    X : np.ndarray, shape (n, D)
    labels : np.ndarray of str, shape (n,), or None
        Empty strings are "no label".
    config : ClusterConfig
        ``k_min``, ``k_max``, ``gap``, ``silhouette_sample`` and ``seed`` are used.
    n_classes : int or None
        Defaults to the number of distinct labels; marks k = n_classes in the result.
    standardize : bool
        z-score every dimension first (see the module docstring).

    Returns
    -------
    dict
        ``n, dim, standardized, n_init, ks, curves`` (one dict per k: ``k, inertia,
        silhouette, calinski_harabasz, davies_bouldin, gap, gap_s``), ``chosen``
        (``elbow, silhouette, calinski_harabasz, davies_bouldin, gap`` -> k or None),
        ``n_classes``, ``notes`` (list of str), ``label_metrics`` (list of dicts with
        ``k``, ``why`` and the :func:`label_agreement` scores; empty without labels) and
        ``at_n_classes`` (the entry for k = n_classes, or None).
    """
    X, ks = _check_input(X, config)
    if standardize:
        X = StandardScaler().fit_transform(X)
    with threadpool_limits(1 if X.size < SMALL_PROBLEM else None):
        return _sweep(X, ks, labels, config, n_classes, standardize)


def _sweep(X, ks, labels, config, n_classes, standardize) -> dict:
    """The body of :func:`cluster_sweep` on validated (standardised) features."""
    rows, assigns = [], {}
    for k in ks:
        row, assigns[k] = _sweep_row(X, k, config)
        rows.append(row)
    notes = []
    gap_k = _add_gap(X, ks, rows, config, notes)
    inertia = [r["inertia"] for r in rows]
    chosen = {
        "elbow": elbow_k(ks, inertia),
        "silhouette": _pick(rows, "silhouette", max),
        "calinski_harabasz": _pick(rows, "calinski_harabasz", max),
        "davies_bouldin": _pick(rows, "davies_bouldin", min),
        "gap": gap_k,
    }
    result = {"n": int(X.shape[0]), "dim": int(X.shape[1]), "standardized": bool(standardize),
              "n_init": N_INIT, "ks": ks, "curves": rows, "chosen": chosen, "notes": notes}
    result.update(_label_part(X, labels, n_classes, chosen, assigns, config))
    return result


def _add_gap(X: np.ndarray, ks: list[int], rows: list[dict], config: ClusterConfig, notes: list) -> int | None:
    """Fill ``gap`` / ``gap_s`` of each row when enabled and affordable; the gap rule's k."""
    for r in rows:
        r["gap"] = r["gap_s"] = None
    if not config.gap:
        notes.append("gap statistic disabled (cluster.gap = false)")
        return None
    cost = X.shape[0] * X.shape[1] * sum(ks) * GAP_REFERENCES * N_INIT
    if cost > GAP_BUDGET:
        notes.append(f"gap statistic skipped: {X.shape[0]} points x {X.shape[1]} dims is over the time budget")
        return None
    gap, s = _gap_statistic(X, ks, [r["inertia"] for r in rows], config.seed)
    for r, g, sk in zip(rows, gap, s):
        r["gap"], r["gap_s"] = float(g), float(sk)
    k, note = _gap_k(ks, gap, s)
    if note:
        notes.append(note)
    return k


def _label_part(X, labels, n_classes, chosen, assigns, config) -> dict:
    """Label agreement at k = n_classes and at each chosen k (nothing without labels)."""
    out = {"n_classes": n_classes, "label_metrics": [], "at_n_classes": None}
    if labels is None:
        return out
    labels = np.asarray(labels).astype(str)
    if len(labels) != X.shape[0]:
        raise Tile2AudioError(f"cluster analysis: {len(labels)} labels for {X.shape[0]} points")
    has = labels != ""
    if not has.any():
        return out
    n_classes = n_classes or len(np.unique(labels[has]))
    out["n_classes"] = int(n_classes)
    why: dict[int, list[str]] = {}
    if 2 <= n_classes < X.shape[0]:
        why.setdefault(int(n_classes), []).append("n_classes")
    for crit, k in chosen.items():
        if k is not None:
            why.setdefault(int(k), []).append(crit)
    for k in sorted(why):
        assign = assigns[k] if k in assigns else _kmeans(X, k, config.seed).labels_
        entry = {"k": k, "why": why[k]}
        entry.update(label_agreement(labels[has], assign[has]))
        out["label_metrics"].append(entry)
        if "n_classes" in why[k]:
            out["at_n_classes"] = entry
    return out


def centroid_distances(X: np.ndarray, k: int, seed: int = 0, standardize: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The k-means of :func:`cluster_sweep` at one k: each point's cluster and its distance to that centroid.

    Parameters
    ----------
    X : np.ndarray, shape (n, D)
    k : number of clusters
    seed : the sweep's seed (``ClusterConfig.seed``), so the clusters are the sweep's
    standardize : z-score every dimension first, as the sweep does

    Returns
    -------
    clusters : np.ndarray of int, shape (n,)
    distances : np.ndarray of float, shape (n,)
        Euclidean, in the (standardised) space k-means ran in.
    """
    X = np.asarray(X, dtype=np.float64)
    if standardize:
        X = StandardScaler().fit_transform(X)
    with threadpool_limits(1 if X.size < SMALL_PROBLEM else None):
        km = _kmeans(X, k, seed)
    assign = km.labels_.astype(np.int64)
    return assign, np.linalg.norm(X - km.cluster_centers_[assign], axis=1)


def cluster_features(emb, config: ClusterConfig) -> tuple[np.ndarray, np.ndarray]:
    """Clip-level (pooled) or tile-level matrix (n, D) of an embedding set, and labels (n,)."""
    labels = emb.clips["label"].fillna("").astype(str).to_numpy()
    if config.level == "tile":
        X, rows = emb.tile_matrix()
        return X, labels[rows]
    return emb.pooled(config.pooling), labels


def cluster_embeddings(emb, config: ClusterConfig = ClusterConfig(), out_dir: str | Path = ".") -> dict:
    """Cluster-count analysis of one embedding set; writes ``cluster.json`` and ``kmeans_curves.png``.

    Parameters
    ----------
    emb : tile2audio.embed.EmbeddingSet
    config : ClusterConfig
        ``level`` (clip: the ``pooling`` matrix; tile: every tile) and the sweep settings.
    out_dir : output folder

    Returns
    -------
    dict
        :func:`cluster_sweep`'s result plus ``name``, ``kind``, ``level``, ``pooling``
        and ``figure`` (the PNG's file name).
    """
    out_dir = atomic.ensure_dir(out_dir, "cluster output folder")
    result = cluster_sweep(*cluster_features(emb, config), config)
    result = {"name": emb.name, "kind": emb.kind, "level": config.level,
              "pooling": config.pooling if config.level == "clip" else None, **result}
    plot_curves(result, out_dir / "kmeans_curves.png",
                title=f"k-means on {emb.name} ({config.level} level) — {result['n']} points")
    result["figure"] = "kmeans_curves.png"
    atomic.write_json(out_dir / "cluster.json", result)
    return result


def cluster_entries(entries, config: ClusterConfig = ClusterConfig(), out_dir: str | Path = ".",
                    figure_entry=None) -> dict:
    """Cluster-count analysis of several embedding sets on the same clips.

    The k-means table of a report: the trained run beside its random-weight twin and
    the handcrafted baselines, so NMI, ARI, purity and matched accuracy are read against
    references (as the probe table is).

    Parameters
    ----------
    entries : list of tile2audio.embed.EmbeddingSet
    config : ClusterConfig
    out_dir : folder of ``cluster.json`` (and of the figure entry's ``kmeans_curves.png``)
    figure_entry : EmbeddingSet or None
        The entry whose curves are drawn (default: the first).

    Returns
    -------
    dict
        ``{"figure_entry": name, "entries": [result, ...]}``, one
        :func:`cluster_embeddings`-style result per entry (entries that cannot be
        clustered, e.g. too few clips, are skipped with a warning); also written as
        ``out_dir/cluster.json``.
    """
    if not entries:
        raise Tile2AudioError("cluster_entries needs at least one embedding set")
    figure_entry = entries[0] if figure_entry is None else figure_entry
    out_dir = Path(out_dir)
    results = []
    for e in entries:
        if e is figure_entry:
            results.append(cluster_embeddings(e, config, out_dir))
            continue
        X, labels = cluster_features(e, config)
        try:
            r = cluster_sweep(X, labels, config)
        except Tile2AudioError as exc:
            log.warning("k-means analysis of %s skipped: %s", e.name, exc)
            continue
        results.append({"name": e.name, "kind": e.kind, "level": config.level,
                        "pooling": e.meta.get("pooling", config.pooling) if config.level == "clip" else None, **r})
    result = {"figure_entry": figure_entry.name, "entries": results}
    atomic.write_json(out_dir / "cluster.json", result)
    return result
