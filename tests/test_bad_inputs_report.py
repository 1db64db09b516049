"""Bad inputs of the report, the probes and the HEAR API (issue 18): runs with other
features, classes smaller than the probe folds, labels that break Markdown, runs that
share a folder name, and HEAR batches of the wrong dtype, level or size. Every case
asserts its outcome and, where the defect was a message, that it names the real cause."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_FEATURES, TINY_TRAIN, one_line_error
from tile2audio.cli import main
from tile2audio.clusters import cluster_entries
from tile2audio.config import ClusterConfig, FeatureParams, ProbeConfig, load_training
from tile2audio.embed import from_clip_matrix
from tile2audio.errors import Tile2AudioError
from tile2audio.pipeline import run_names
from tile2audio.probes import make_splits, run_probes
from tile2audio.report import escape_markdown, make_report
from tile2audio.runs import update_run_json

QUICK = ["--set", "probe.n_splits=2", "--set", "cluster.k_max=4", "--set", "probe.c_grid=[1.0]"]


def _set(labels, seed=0, **cols):
    """An in-memory clip-level embedding set: one blob per label."""
    rng = np.random.default_rng(seed)
    clips = pd.DataFrame({"clip_id": [f"c{i:03d}" for i in range(len(labels))], "label": labels, **cols})
    means = {lab: rng.normal(0, 4, 6) for lab in sorted(set(labels))}
    X = np.stack([means[lab] + rng.standard_normal(6) for lab in labels])
    return from_clip_matrix(clips, X, name="e", kind="trained")


# --------------------------------------------------------------------------- report of runs


def _train(cache, out):
    from tile2audio.train import train

    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2"])
    return train(cache, out, cfg, exact=True, progress=False)


@pytest.fixture(scope="module")
def run(tiny_cache, tmp_path_factory):
    """A tiny run on the shared tiny cache (3 classes x 4 clips, one artist per clip)."""
    return _train(tiny_cache, tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def other_run(tiny_dataset, tmp_path_factory):
    """A tiny run on a cache of the same clips with another hop length."""
    from tile2audio.features import build_cache

    root = tmp_path_factory.mktemp("other")
    build_cache(tiny_dataset, root / "cache", FeatureParams(**{**TINY_FEATURES, "hop_length": 256}), jobs=1,
                progress=False)
    return _train(root / "cache", root / "run")


def test_report_of_runs_with_other_features_says_so(run, other_run, tiny_cache, tmp_path, tone_fn, write_audio,
                                                    capsys):
    # The first run's cache, with an unrelated manifest beside it (same clip ids, other audio):
    # the old fallback embedded that manifest with the second run and stored it in its folder.
    shutil.copytree(tiny_cache, tmp_path / "exp" / "cache")
    noise = write_audio(tmp_path / "elsewhere" / "noise.wav", tone_fn(3.0, sr=8000, noise=0.5, amp=0.0), sr=8000)
    ids = pd.read_csv(tiny_cache / "index.csv")["clip_id"]
    pd.DataFrame({"clip_id": ids, "path": noise.name, "root": str(noise.parent), "label": "x", "split": "", "fold": "",
                  "group": ""}).to_csv(tmp_path / "exp" / "manifest.csv", index=False)
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(run, a)
    shutil.copytree(other_run, b)
    update_run_json(a, cache=str(tmp_path / "exp" / "cache"))
    assert main(["-q", "report", str(a), str(b), "-o", str(tmp_path / "rep"), *QUICK]) == 2
    one_line_error(capsys, "features differ", "b/run has hop_length=256", str(tmp_path / "exp" / "cache"))
    assert not (b / "embeddings").exists() and not (a / "embeddings").exists()


def test_default_report_at_four_clips_per_class_lowers_the_folds(run, tmp_path, capsys):
    # The default probe.n_splits=5 with 4 clips (4 artists) per class was a raw sklearn ValueError.
    a = tmp_path / "run"
    shutil.copytree(run, a)
    assert main(["-q", "report", str(a), "-o", str(tmp_path / "rep")]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["n_folds"] == 4 and [s["name"] for s in rep["splits"]][-1] == "kfold 4/4"
    assert any("probe.n_splits=5 lowered to 4" in n for n in rep["probe_notes"]), rep["probe_notes"]
    assert "probe.n_splits=5 lowered to 4" in (tmp_path / "rep" / "report.md").read_text()


def test_report_names_runs_apart_by_their_path(run, tmp_path):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    assert main(["-q", "report", str(a), str(b), "-o", str(tmp_path / "rep"), *QUICK]) == 0
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    names = [e["name"] for e in rep["entries"]]
    assert names[:3] == ["a/run", "b/run", "a/run (random)"], names
    assert {r["name"] for r in rep["rows"]} >= {"a/run", "b/run"}
    assert set(rep["extra"]["train_seconds"]) == {"a/run", "b/run"}


def test_run_names_are_the_shortest_distinguishing_suffix():
    assert run_names(["x/a/run", "x/b/run"]) == ["a/run", "b/run"]
    assert run_names(["runs/one", "runs/two"]) == ["one", "two"]
    assert run_names(["p/a/run", "q/a/run"]) == ["p/a/run", "q/a/run"]
    assert run_names(["r", "r"]) == ["r", "r (2)"]


# --------------------------------------------------------------------------- probe folds, every protocol


@pytest.mark.parametrize("groups", [False, True])
def test_kfold_with_fewer_clips_than_folds_lowers_them(groups, caplog):
    labels = ["a"] * 4 + ["b"] * 4 + ["c"] * 6
    cols = {"group": [f"g{i}" for i in range(14)]} if groups else {}
    notes: list = []
    with caplog.at_level(logging.WARNING, logger="tile2audio.probes"):
        splits = make_splits(pd.DataFrame({"clip_id": [f"c{i}" for i in range(14)], "label": labels, **cols}),
                             ProbeConfig(), notes)
    assert len(splits) == 4 and splits[0].name == "kfold 1/4"
    unit = "groups" if groups else "clips"
    assert notes == [f"probe.n_splits=5 lowered to 4: class 'a' has only 4 labelled {unit}"]
    assert "lowered to 4" in caplog.text
    assert sorted(np.concatenate([s.test for s in splits])) == list(range(14))


def test_probe_result_records_the_lowered_folds():
    res = run_probes([_set(["a"] * 3 + ["b"] * 3)], ProbeConfig(c_grid=(1.0,)), progress=False)
    assert res["n_folds"] == 3 and res["notes"] == ["probe.n_splits=5 lowered to 3: class 'a' has only 3 labelled clips"]


def test_a_class_of_one_clip_is_kept_with_a_warning():
    notes: list = []
    splits = make_splits(pd.DataFrame({"clip_id": [f"c{i}" for i in range(21)], "label": ["a"] * 10 + ["b"] * 10 + ["c"]}),
                         ProbeConfig(), notes)
    assert len(splits) == 5 and len(notes) == 1 and "'c' have a single labelled clip" in notes[0]


@pytest.mark.parametrize("labels, cols, needle", [
    (["a", "b", "c"], {}, "every class has a single labelled clip"),
    (["a"] * 3 + ["b"] * 3, {"group": ["x"] * 3 + ["y"] * 3}, "every class has a single labelled group"),
    (["a"] * 6, {}, "at least two classes; every labelled clip has the label 'a'"),
    (["a"] * 3 + ["b"] * 3, {"fold": [1] * 3 + [2] * 3}, "fold 1: every training clip has the label 'b'"),
    (["a"] * 3 + ["b"] * 3, {"split": ["train"] * 3 + ["test"] * 3}, "split: every training clip has the label 'a'"),
], ids=["one-clip-classes", "one-group-classes", "one-class", "fold", "split"])
def test_splits_that_cannot_be_probed_give_one_line(labels, cols, needle):
    clips = pd.DataFrame({"clip_id": [f"c{i}" for i in range(len(labels))], "label": labels, **cols})
    with pytest.raises(Tile2AudioError, match=re.escape(needle)):
        make_splits(clips, ProbeConfig())


def test_knn_with_k_above_the_training_side(caplog):
    res = run_probes([_set(["a"] * 4 + ["b"] * 4)], ProbeConfig(n_splits=2, knn_k=50, c_grid=(1.0,)), progress=False)
    knn = [r for r in res["rows"] if r["probe"].startswith("knn")]
    assert len(knn) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in knn)


def test_nan_embeddings_name_the_cause():
    bad = _set(["a"] * 5 + ["b"] * 5)
    bad.arrays = {k: np.full_like(v, np.nan) for k, v in bad.arrays.items()}
    with pytest.raises(Tile2AudioError, match="10 of 10 clips whose features are NaN or inf in 'e'"):
        run_probes([bad], ProbeConfig(n_splits=2), progress=False)


def test_report_of_a_single_class_skips_the_probes(tmp_path):
    md = make_report([_set(["a"] * 8)], tmp_path, cluster_config=ClusterConfig(k_max=4), progress=False)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["rows"] == [] and "a single class" in rep["probe_note"] and rep["cluster"]["entries"]
    assert "a single class: probes skipped" in md.read_text()


def test_report_of_a_collapsed_encoder_does_not_crash(tmp_path):
    # Identical clip embeddings (a collapsed encoder) made t-SNE divide by zero and the
    # process die with a segmentation fault; run in a child so a crash fails one test only.
    code = (
        "import logging, numpy as np, pandas as pd\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "from tile2audio.config import ClusterConfig, ProbeConfig\n"
        "from tile2audio.embed import from_clip_matrix\n"
        "from tile2audio.report import make_report\n"
        "clips = pd.DataFrame({'clip_id': [f'c{i}' for i in range(10)], 'label': ['a'] * 5 + ['b'] * 5})\n"
        f"make_report([from_clip_matrix(clips, np.ones((10, 4)), 'flat', kind='trained')], {str(tmp_path)!r},\n"
        "            ProbeConfig(n_splits=2, c_grid=(1.0,)), ClusterConfig(k_max=4), progress=False)\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": repo})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "same embedding (a collapsed encoder?)" in done.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["rows"] and "embedding_map.png" not in {f["file"] for f in rep["figures"]}


def test_features_of_dimension_zero_give_one_line(tmp_path):
    e = from_clip_matrix(pd.DataFrame({"clip_id": [f"c{i}" for i in range(6)], "label": ["a", "b"] * 3}),
                         np.zeros((6, 0)), name="empty")
    with pytest.raises(Tile2AudioError, match="'empty' has features of dimension 0"):
        run_probes([e], ProbeConfig(n_splits=2), progress=False)
    with pytest.raises(Tile2AudioError, match=re.escape("needs a (n >= 3, D >= 1) matrix, got shape (6, 0)")):
        cluster_entries([e], ClusterConfig(k_max=4), tmp_path)


# --------------------------------------------------------------------------- Markdown


def test_labels_and_names_are_escaped_in_markdown(tmp_path):
    labels = ["rock\nroll", "a|b", "*bold*"] * 6
    e = _set(labels)
    e.meta["name"] = "my\nrun|x"
    md = make_report([e], tmp_path, ProbeConfig(n_splits=2, c_grid=(1.0,)), ClusterConfig(k_max=4),
                     progress=False).read_text()
    per_class = md.split("## Per-class F1")[1].split("##")[0]
    rows = [line for line in per_class.splitlines() if line.strip()][1:]
    assert len(rows) == 2 + 3  # header, rule, one row per class
    cells = [len(re.findall(r"(?<!\\)\|", line)) for line in rows]
    assert all(line.startswith("| ") for line in rows) and len(set(cells)) == 1, per_class
    assert "| rock␊roll |" in per_class and "| a\\|b |" in per_class and "| \\*bold\\* |" in per_class
    assert "my␊run\\|x" in md


def test_escape_markdown():
    assert escape_markdown("class_2") == "class_2"
    assert escape_markdown("a\tb\r\n") == "a␉b␍␊"
    assert escape_markdown("[x](y) <b> `c` _d_ R&B") == "\\[x\\](y) \\<b\\> \\`c\\` \\_d\\_ R\\&B"
    assert escape_markdown(3) == "3"


# --------------------------------------------------------------------------- HEAR inputs


@pytest.fixture(scope="module")
def hear_model(run):
    from tile2audio import hear

    return hear.load_model(str(run))


@pytest.mark.parametrize("audio, needle", [
    (np.zeros((1, 8000), np.int16), "got dtype int16; for PCM divide by 32768"),
    (np.array([["0.1", "0.2"]]), "got dtype <U3"),
    (np.array([[0.1, None]], dtype=object), "got dtype object"),
    (np.zeros((1, 10), bool), "got dtype bool"),
    ([[0.1, 0.2], [0.3]], "one (n_sounds, n_samples) array"),
], ids=["int16", "str", "object", "bool", "ragged"])
def test_hear_refuses_audio_that_is_not_float(hear_model, audio, needle):
    from tile2audio import hear

    for fn in (hear.get_scene_embeddings, hear.get_timestamp_embeddings):
        with pytest.raises(Tile2AudioError, match=re.escape(needle)):
            fn(audio, hear_model)


def test_hear_warns_on_audio_above_one(hear_model, tone_fn, caplog):
    from tile2audio import hear

    loud = 1000.0 * tone_fn(1.0, sr=8000, amp=1.0)[None]
    with caplog.at_level(logging.WARNING, logger="tile2audio.hear"):
        hear.get_scene_embeddings(loud, hear_model)
    assert "audio peaks at 1000" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tile2audio.hear"):
        hear.get_scene_embeddings(tone_fn(1.0, sr=8000, amp=1.0)[None].astype(np.float64), hear_model)
    assert "peaks" not in caplog.text


@pytest.mark.parametrize("n_samples", [8000, 0])
def test_hear_empty_batch_gives_empty_outputs(hear_model, n_samples):
    import tensorflow as tf

    from tile2audio import hear

    emb, ts = hear.get_timestamp_embeddings(np.zeros((0, n_samples), np.float32), hear_model)
    scene = hear.get_scene_embeddings(np.zeros((0, n_samples), np.float32), hear_model)
    assert emb.dtype == ts.dtype == scene.dtype == tf.float32
    one = hear.get_timestamp_embeddings(np.zeros((1, n_samples), np.float32), hear_model)[1] if n_samples else None
    n = one.shape[1] if n_samples else 0
    assert emb.shape == (0, n, hear_model.timestamp_embedding_size) and ts.shape == (0, n)
    assert scene.shape == (0, hear_model.scene_embedding_size)
