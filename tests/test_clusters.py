"""k-means cluster-count analysis on synthetic blobs."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from tile2audio.clusters import (
    cluster_embeddings,
    cluster_sweep,
    elbow_k,
    hungarian_accuracy,
    label_agreement,
    purity,
)
from tile2audio.config import ClusterConfig
from tile2audio.embed import from_clip_matrix
from tile2audio.errors import Tile2AudioError


def blobs(n_per: int = 40, centres: int = 4, dim: int = 5, spread: float = 0.3, seed: int = 0):
    """Well-separated Gaussian blobs and their string labels."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 5, size=(centres, dim))
    X = np.vstack([m + spread * rng.standard_normal((n_per, dim)) for m in means])
    y = np.repeat([f"c{i}" for i in range(centres)], n_per)
    return X, y


CFG = ClusterConfig(k_min=2, k_max=8, seed=0)


def test_four_blobs_pick_four_and_match_labels():
    X, y = blobs()
    r = cluster_sweep(X, y, CFG)
    assert r["chosen"]["silhouette"] == 4
    assert r["chosen"]["calinski_harabasz"] == 4
    assert r["chosen"]["davies_bouldin"] == 4
    assert r["chosen"]["elbow"] == 4
    assert r["chosen"]["gap"] == 4
    assert r["ks"] == list(range(2, 9))
    assert r["at_n_classes"]["k"] == 4
    assert r["at_n_classes"]["nmi"] > 0.95
    assert r["at_n_classes"]["accuracy"] > 0.95
    assert r["at_n_classes"]["purity"] > 0.95
    comp = r["at_n_classes"]["composition"]
    assert np.asarray(comp["counts"]).sum() == len(X)
    assert comp["labels"] == ["c0", "c1", "c2", "c3"]
    inertia = [c["inertia"] for c in r["curves"]]
    assert inertia[0] > inertia[2]  # k=2 leaves far more spread than k=4


def test_three_blobs_pick_three():
    X, y = blobs(n_per=30, centres=3, seed=3)
    r = cluster_sweep(X, y, CFG)
    assert r["chosen"]["silhouette"] == 3
    assert r["n_classes"] == 3


def test_without_labels_reports_only_label_free_part():
    X, _ = blobs()
    r = cluster_sweep(X, None, ClusterConfig(k_min=2, k_max=6, gap=False))
    assert r["label_metrics"] == [] and r["at_n_classes"] is None
    assert r["chosen"]["silhouette"] == 4
    assert r["chosen"]["gap"] is None
    assert any("gap" in n for n in r["notes"])
    json.dumps(r)  # plain Python only


def test_hungarian_accuracy_of_a_permuted_perfect_clustering_is_one():
    labels = np.repeat(["a", "b", "c"], 10)
    clusters = np.repeat([2, 0, 1], 10)
    assert hungarian_accuracy(labels, clusters) == 1.0
    assert purity(labels, clusters) == 1.0
    scores = label_agreement(labels, clusters)
    assert scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)


def test_hungarian_accuracy_counts_unmatched_clusters_as_errors():
    labels = np.array(["a"] * 4 + ["b"] * 4)
    clusters = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    # a->0 (2) and b->2 (4): 6 of 8; purity is higher since clusters may share a label
    assert hungarian_accuracy(labels, clusters) == pytest.approx(6 / 8)
    assert purity(labels, clusters) == 1.0


def test_elbow_rule_on_a_known_curve():
    ks = [1, 2, 3, 4, 5, 6]
    assert elbow_k(ks, [100, 50, 10, 8, 6, 5]) == 3
    assert elbow_k([2, 3], [5, 4]) is None


def test_unlabelled_points_are_left_out_of_label_scores():
    X, y = blobs(n_per=20)
    y = y.astype(object)
    y[:5] = ""
    r = cluster_sweep(X, y, ClusterConfig(k_min=2, k_max=5, gap=False))
    counts = np.asarray(r["at_n_classes"]["composition"]["counts"])
    assert counts.sum() == len(X) - 5


def test_k_range_clipped_and_bad_input_rejected():
    X, y = blobs(n_per=2, centres=3)
    r = cluster_sweep(X, None, ClusterConfig(k_min=2, k_max=20, gap=False))
    assert max(r["ks"]) == len(X) - 1
    with pytest.raises(Tile2AudioError):
        cluster_sweep(np.full((10, 3), np.nan), None, CFG)
    with pytest.raises(Tile2AudioError):
        cluster_sweep(np.zeros((2, 3)), None, CFG)


def test_cluster_embeddings_writes_json_and_png(tmp_path):
    X, y = blobs(n_per=25)
    clips = pd.DataFrame({"clip_id": [f"clip{i}" for i in range(len(X))], "label": y})
    emb = from_clip_matrix(clips, X, name="blobs", kind="trained")
    r = cluster_embeddings(emb, ClusterConfig(k_min=2, k_max=7), tmp_path)
    saved = json.loads((tmp_path / "cluster.json").read_text())
    assert saved["chosen"] == r["chosen"] and saved["name"] == "blobs"
    png = tmp_path / "kmeans_curves.png"
    assert png.stat().st_size > 10_000
    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert img.std() > 0.01  # not a blank canvas
