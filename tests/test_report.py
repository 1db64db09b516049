"""Report: report.json content, the Markdown tables and the figures."""

from __future__ import annotations

import json

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from tile2audio.config import ClusterConfig, ProbeConfig
from tile2audio.embed import from_clip_matrix
from tile2audio.errors import Tile2AudioError
from tile2audio.report import best_entry_name, make_report, render_markdown

PROBE = ProbeConfig(n_splits=3, c_grid=(0.1, 1.0))
CLUSTER = ClusterConfig(k_min=2, k_max=6)


def entries(n: int = 90, classes: int = 3, seed: int = 0):
    """A good 'trained' set, a supervised one, and random / MFCC-like baselines."""
    rng = np.random.default_rng(seed)
    labels = np.array([f"class_{i % classes}" for i in range(n)])
    clips = pd.DataFrame({"clip_id": [f"c{i:03d}" for i in range(n)], "label": labels})
    means = {lab: rng.normal(0, 4, 8) for lab in sorted(set(labels))}
    good = np.stack([means[lab] + rng.standard_normal(8) for lab in labels])
    return [
        from_clip_matrix(clips, good, name="run-a", kind="trained"),
        from_clip_matrix(clips, good + 2 * rng.standard_normal(good.shape), name="sup", kind="supervised",
                         label_free=False),
        from_clip_matrix(clips, rng.standard_normal((n, 8)), name="random-init", kind="random"),
        from_clip_matrix(clips, good + 4 * rng.standard_normal(good.shape), name="mfcc", kind="mfcc"),
    ]


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    md = make_report(entries(), out, PROBE, CLUSTER, title="Synthetic check",
                     extra={"training_seconds": 12.5, "config": {"margin": 0.5}}, progress=False)
    assert md == out / "report.md"
    return out


def test_report_json_has_probe_rows_with_required_keys(report_dir):
    rep = json.loads((report_dir / "report.json").read_text())
    assert rep["title"] == "Synthetic check"
    assert rep["protocol"] == "kfold" and rep["labels"] == ["class_0", "class_1", "class_2"]
    assert len(rep["rows"]) == 4 * 3
    for r in rep["rows"]:
        for key in ("name", "kind", "probe", "accuracy", "macro_f1", "accuracy_std", "macro_f1_std",
                    "per_class_f1", "confusion", "label_free"):
            assert key in r
    sup = [r for r in rep["rows"] if r["name"] == "sup"]
    assert sup and all(r["label_free"] is False for r in sup)
    assert rep["best_entry"] == "run-a"
    assert rep["extra"]["training_seconds"] == 12.5
    assert {f["file"] for f in rep["figures"]} == {"confusion.png", "embedding_map.png", "embedding_map_random.png",
                                                   "kmeans_curves.png"}
    names = [c["name"] for c in rep["cluster"]["entries"]]
    assert names == ["run-a", "sup", "random-init", "mfcc"]
    run_a = rep["cluster"]["entries"][0]
    assert run_a["at_n_classes"]["k"] == 3 and run_a["at_n_classes"]["nmi"] > 0.8


def test_markdown_lists_every_entry_and_marks_supervised(report_dir):
    md = (report_dir / "report.md").read_text()
    rep = json.loads((report_dir / "report.json").read_text())
    assert md == render_markdown(rep)  # the Markdown is rendered from the JSON
    probe_table = md.split("## Probes")[1].split("## ")[0]
    table_rows = [line for line in probe_table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(table_rows) == 12
    for name in ("run-a", "random-init", "mfcc"):
        assert sum(f"| {name} |" in line for line in table_rows) == 3
    assert sum("| sup † |" in line for line in table_rows) == 3
    assert "not label-free" in md
    assert "±" in probe_table
    assert "## Per-class F1" in md and "| class_2 |" in md
    assert "## k-means cluster count" in md
    for fig in ("confusion.png", "embedding_map.png", "kmeans_curves.png"):
        assert f"]({fig})" in md
    assert "training_seconds" in md


def test_run_details_are_a_yaml_block_and_the_random_map_is_beside_the_trained_one(report_dir):
    import yaml

    md = (report_dir / "report.md").read_text()
    details = md.split("## Run details")[1]
    block = details.split("```yaml\n")[1].split("\n```")[0]
    assert yaml.safe_load(block) == {"training_seconds": 12.5, "config": {"margin": 0.5}}
    maps = [line for line in md.splitlines() if "](embedding_map.png)" in line]
    assert len(maps) == 1 and "](embedding_map_random.png)" in maps[0]  # one table row, side by side
    rep = json.loads((report_dir / "report.json").read_text())
    twin = next(f for f in rep["figures"] if f["kind"] == "map_random")
    assert "random-init" in twin["caption"]


@pytest.mark.parametrize("name", ["confusion.png", "embedding_map.png", "embedding_map_random.png",
                                  "kmeans_curves.png"])
def test_figures_are_valid_non_trivial_pngs(report_dir, name):
    path = report_dir / name
    assert path.stat().st_size > 10_000
    img = mpimg.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 200
    assert img[..., :3].std() > 0.02


def test_map_title_names_the_method(report_dir):
    rep = json.loads((report_dir / "report.json").read_text())
    fig = next(f for f in rep["figures"] if f["kind"] == "map")
    try:
        import umap  # noqa: F401
        expected = "UMAP"
    except ImportError:
        expected = "t-SNE"
    assert fig["method"] == expected and expected in fig["caption"]


def test_report_reuses_given_results_and_handles_a_single_cluster_result(tmp_path):
    from tile2audio.clusters import cluster_sweep
    from tile2audio.probes import run_probes

    ents = entries(60)
    probe_result = run_probes(ents, PROBE, progress=False)
    single = cluster_sweep(ents[0].pooled("mean"), ents[0].clips["label"].to_numpy(),
                           ClusterConfig(k_min=2, k_max=4, gap=False))
    single["name"] = "run-a"
    make_report(ents, tmp_path, PROBE, probe_result=probe_result, cluster_result=single, progress=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["rows"] == json.loads(json.dumps(probe_result["rows"]))
    assert len(rep["cluster"]["entries"]) == 1
    assert (tmp_path / "kmeans_curves.png").is_file()


def test_best_entry_prefers_trained_runs():
    rows = [{"name": "mfcc", "kind": "mfcc", "probe": "logreg", "macro_f1": 0.9, "accuracy": 0.9},
            {"name": "run", "kind": "trained", "probe": "logreg", "macro_f1": 0.5, "accuracy": 0.5},
            {"name": "run2", "kind": "trained", "probe": "logreg", "macro_f1": 0.6, "accuracy": 0.6}]
    assert best_entry_name(rows) == "run2"
    assert best_entry_name(rows[:1]) == "mfcc"


def test_empty_entries_rejected(tmp_path):
    with pytest.raises(Tile2AudioError):
        make_report([], tmp_path)


def test_report_without_labels_has_clusters_and_map_but_no_probes(tmp_path):
    ents = entries(60)
    for e in ents:
        e.clips["label"] = ""
    md = make_report(ents[:2], tmp_path, PROBE, ClusterConfig(k_min=2, k_max=4, gap=False), progress=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["rows"] == [] and rep["probe_note"]
    assert {f["file"] for f in rep["figures"]} == {"embedding_map.png", "kmeans_curves.png"}
    assert all(c["at_n_classes"] is None for c in rep["cluster"]["entries"])
    text = md.read_text()
    assert "probes skipped" in text and "## k-means cluster count" in text
