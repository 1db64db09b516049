"""Probe protocols, leak checks, probes on synthetic blobs, and the MFCC baseline."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from tile2audio import baselines, probes
from tile2audio.config import ProbeConfig
from tile2audio.embed import EmbeddingSet, from_clip_matrix
from tile2audio.errors import Tile2AudioError
from tile2audio.probes import Split, check_no_leak, make_splits, run_probes

from conftest import SHARED_DATASETS as DATASETS


# --------------------------------------------------------------------------- helpers


def clip_table(n: int = 60, classes: int = 3, **cols) -> pd.DataFrame:
    """A clip table with balanced labels c0..c{classes-1} and optional extra columns."""
    t = pd.DataFrame({"clip_id": [f"clip{i:03d}" for i in range(n)],
                      "label": [f"c{i % classes}" for i in range(n)]})
    for k, v in cols.items():
        t[k] = v
    return t


def blob_features(labels, dim: int = 6, spread: float = 0.5, seed: int = 0) -> np.ndarray:
    """One well-separated Gaussian blob per label."""
    rng = np.random.default_rng(seed)
    names = sorted(set(labels))
    means = {lab: rng.normal(0, 4, dim) for lab in names}
    return np.stack([means[lab] + spread * rng.standard_normal(dim) for lab in labels])


def tile_set(clips: pd.DataFrame, tiles: list[np.ndarray], name: str = "tiles", kind: str = "trained") -> EmbeddingSet:
    """An in-memory embedding set with several tiles per clip."""
    base = from_clip_matrix(clips, np.stack([t.mean(axis=0) for t in tiles]), name=name, kind=kind)
    base.tile_arrays = {cid: (t, np.zeros((len(t), 2))) for cid, t in zip(base.clips["clip_id"], tiles)}
    return base


def ids(clips, rows) -> set:
    return set(clips["clip_id"].to_numpy()[rows])


# --------------------------------------------------------------------------- protocols


def test_kfold_protocol_is_stratified_and_partitions_clips():
    clips = clip_table(60, 3)
    splits = make_splits(clips, ProbeConfig(n_splits=5, seed=0))
    assert len(splits) == 5
    tests = np.concatenate([s.test for s in splits])
    assert sorted(tests) == list(range(60))  # each clip tested exactly once
    for s in splits:
        assert clips["label"].iloc[s.test].value_counts().tolist() == [4, 4, 4]
        assert not ids(clips, s.fit) & ids(clips, s.test)
        assert len(s.valid) > 0 and not set(s.valid) & set(s.train)
        assert len(s.fit) + len(s.test) == 60


def test_kfold_is_seeded():
    clips = clip_table(60, 3)
    a = make_splits(clips, ProbeConfig(seed=0))
    b = make_splits(clips, ProbeConfig(seed=0))
    c = make_splits(clips, ProbeConfig(seed=1))
    assert all(np.array_equal(x.test, y.test) for x, y in zip(a, b))
    assert not all(np.array_equal(x.test, y.test) for x, y in zip(a, c))


def test_grouped_kfold_keeps_groups_together():
    clips = clip_table(90, 3, group=[f"artist{i // 3}" for i in range(90)])
    splits = make_splits(clips, ProbeConfig(n_splits=5))
    for s in splits:
        fit_groups = set(clips["group"].iloc[s.fit])
        test_groups = set(clips["group"].iloc[s.test])
        assert not fit_groups & test_groups
        # the inner validation hold-out is grouped too
        assert not set(clips["group"].iloc[s.train]) & set(clips["group"].iloc[s.valid])


def test_split_protocol_uses_the_split_column():
    split = ["train"] * 30 + ["valid"] * 12 + ["test"] * 18
    clips = clip_table(60, 3, split=split)
    (s,) = make_splits(clips, ProbeConfig())
    assert list(s.train) == list(range(30))
    assert list(s.valid) == list(range(30, 42))
    assert list(s.test) == list(range(42, 60))


def test_split_protocol_without_valid_holds_out_part_of_train():
    clips = clip_table(60, 3, split=["train"] * 40 + ["test"] * 20)
    (s,) = make_splits(clips, ProbeConfig())
    assert set(s.fit) == set(range(40))
    assert 0 < len(s.valid) < 40 and list(s.test) == list(range(40, 60))


def test_fold_protocol_is_leave_one_fold_out():
    clips = clip_table(60, 3, fold=[1 + i % 3 for i in range(60)])
    splits = make_splits(clips, ProbeConfig())
    assert [s.name for s in splits] == ["fold 1", "fold 2", "fold 3"]
    for k, s in enumerate(splits, start=1):
        assert set(clips["fold"].iloc[s.test]) == {k}
        assert k not in set(clips["fold"].iloc[s.fit])


def test_auto_prefers_split_then_fold_then_kfold():
    both = clip_table(60, 3, split=["train"] * 40 + ["test"] * 20, fold=[1 + i % 2 for i in range(60)])
    assert probes.resolve_protocol(both) == "split"
    assert probes.resolve_protocol(both.drop(columns="split")) == "fold"
    assert probes.resolve_protocol(clip_table(60, 3)) == "kfold"
    with pytest.raises(Tile2AudioError):
        probes.resolve_protocol(clip_table(60, 3), "split")


def test_unlabelled_clips_are_excluded():
    clips = clip_table(60, 3)
    clips.loc[:9, "label"] = ""
    splits = make_splits(clips, ProbeConfig())
    used = np.concatenate([np.concatenate([s.fit, s.test]) for s in splits])
    assert not set(used) & set(range(10))


def test_check_no_leak_catches_a_shared_clip_and_a_shared_group():
    clips = clip_table(12, 2, group=[f"g{i // 2}" for i in range(12)])
    ok = Split("ok", np.arange(0, 6), np.zeros(0, np.int64), np.arange(6, 12))
    check_no_leak(clips, ok)
    clip_leak = Split("bad", np.arange(0, 7), np.zeros(0, np.int64), np.arange(6, 12))
    with pytest.raises(Tile2AudioError, match="clip"):
        check_no_leak(clips, clip_leak)
    # rows 5 (train) and 4 (test) share group g2 without sharing a clip
    group_leak = Split("bad", np.array([0, 1, 2, 3, 5]), np.zeros(0, np.int64), np.array([4, 6, 7]))
    with pytest.raises(Tile2AudioError, match="group"):
        check_no_leak(clips, group_leak)
    # a duplicated clip id in validation vs test is a leak too
    valid_leak = Split("bad", np.arange(0, 4), np.array([8]), np.arange(6, 12))
    with pytest.raises(Tile2AudioError):
        check_no_leak(clips, valid_leak)


def test_fold_protocol_with_a_group_across_folds_is_refused():
    clips = clip_table(40, 2, fold=[1 + i % 2 for i in range(40)], group=[f"s{i // 2}" for i in range(40)])
    with pytest.raises(Tile2AudioError, match="group"):
        make_splits(clips, ProbeConfig())


# --------------------------------------------------------------------------- probes


def test_separable_blobs_score_near_one_and_random_near_chance():
    clips = clip_table(120, 4)
    good = from_clip_matrix(clips, blob_features(clips["label"]), name="blobs", kind="trained")
    noise = np.random.default_rng(1).standard_normal((120, 6))
    rand = from_clip_matrix(clips, noise, name="noise", kind="random")
    res = run_probes([good, rand], ProbeConfig(c_grid=(0.1, 1.0)), progress=False)
    assert res["protocol"] == "kfold" and res["n_folds"] == 5 and res["labels"] == ["c0", "c1", "c2", "c3"]
    rows = {(r["name"], r["probe"]): r for r in res["rows"]}
    assert len(rows) == 6
    for probe in ("logreg", "knn_cosine", "knn_euclidean"):
        assert rows[("blobs", probe)]["accuracy"] >= 0.95
        assert rows[("blobs", probe)]["macro_f1"] >= 0.95
        assert 0.05 <= rows[("noise", probe)]["accuracy"] <= 0.45
    r = rows[("blobs", "logreg")]
    assert np.asarray(r["confusion"]).sum() == 120
    assert np.trace(r["confusion"]) >= 114
    assert set(r["per_class_f1"]) == {"c0", "c1", "c2", "c3"}
    assert len(r["chosen_c"]) == 5 and set(r["chosen_c"]) <= {0.1, 1.0}
    assert rows[("blobs", "knn_cosine")]["chosen_c"] is None
    assert len(r["fold_accuracy"]) == 5
    assert r["accuracy_std"] == pytest.approx(np.std(r["fold_accuracy"]))


def test_svm_probe_and_fixed_c():
    clips = clip_table(60, 3)
    emb = from_clip_matrix(clips, blob_features(clips["label"]), name="blobs", kind="trained")
    res = run_probes([emb], ProbeConfig(fixed_c=2.5, svm=True, n_splits=3), progress=False)
    rows = {r["probe"]: r for r in res["rows"]}
    assert rows["logreg"]["chosen_c"] == [2.5, 2.5, 2.5]
    assert rows["svm"]["chosen_c"] == [2.5, 2.5, 2.5]
    assert rows["svm"]["accuracy"] >= 0.95


def test_c_is_chosen_on_validation_clips_only(monkeypatch):
    clips = clip_table(60, 3)
    emb = from_clip_matrix(clips, blob_features(clips["label"], spread=3.0), name="b", kind="trained")
    config = ProbeConfig(n_splits=3, c_grid=(0.01, 1.0, 100.0))
    splits = make_splits(clips, config)
    calls = []
    real = probes._fit_predict

    def spy(probe, c, data, fit_clips, eval_clips, cfg):
        calls.append((probe, set(fit_clips), set(eval_clips)))
        return real(probe, c, data, fit_clips, eval_clips, cfg)

    monkeypatch.setattr(probes, "_fit_predict", spy)
    run_probes([emb], config, progress=False)
    logreg = [c for c in calls if c[0] == "logreg"]
    assert len(logreg) == 3 * (3 + 1)  # per fold: one fit per C, then the refit
    for s in splits:
        search = [c for c in logreg if c[2] == set(s.valid)]
        final = [c for c in logreg if c[2] == set(s.test)]
        assert len(search) == 3 and len(final) == 1
        assert all(c[1] == set(s.train) for c in search)  # search never fits on validation
        assert final[0][1] == set(s.fit)
    assert all(not fit & ev for _, fit, ev in calls)  # never scored on rows it was fitted on


def test_tile_scores_are_averaged_per_clip_not_voted():
    scores = np.array([[0.6, 0.4], [0.6, 0.4], [0.0, 1.0], [0.9, 0.1]])
    owner = np.array([5, 5, 5, 7])
    clips, pred = probes._clip_predictions(scores, owner)
    assert list(clips) == [5, 7]
    assert list(pred) == [1, 0]  # a majority vote would give clip 5 class 0


def test_tile_level_probe_predicts_per_clip():
    clips = clip_table(60, 3)
    rng = np.random.default_rng(0)
    centres = {lab: rng.normal(0, 4, 5) for lab in ("c0", "c1", "c2")}
    tiles = [centres[lab] + 0.8 * rng.standard_normal((int(rng.integers(2, 6)), 5)) for lab in clips["label"]]
    emb = tile_set(clips, tiles)
    res = run_probes([emb], ProbeConfig(level="tile", n_splits=3, c_grid=(1.0,)), progress=False)
    for r in res["rows"]:
        assert r["level"] == "tile"
        assert np.asarray(r["confusion"]).sum() == 60  # one prediction per clip, not per tile
        assert r["accuracy"] >= 0.95


def test_entries_are_aligned_on_clip_id():
    clips = clip_table(60, 3)
    X = blob_features(clips["label"], spread=2.5)
    a = from_clip_matrix(clips, X, name="a", kind="trained")
    order = np.random.default_rng(0).permutation(60)
    b = from_clip_matrix(clips.iloc[order], X[order], name="b", kind="trained")
    res = run_probes([a, b], ProbeConfig(n_splits=3, fixed_c=1.0), progress=False)
    ra = [r for r in res["rows"] if r["name"] == "a"]
    rb = [r for r in res["rows"] if r["name"] == "b"]
    for x, y in zip(ra, rb):
        assert x["fold_accuracy"] == pytest.approx(y["fold_accuracy"])
        assert x["confusion"] == y["confusion"]
    short = from_clip_matrix(clips.iloc[:50], X[:50], name="short", kind="mfcc")
    with pytest.raises(Tile2AudioError, match="lacks"):
        run_probes([a, short], ProbeConfig(n_splits=3), progress=False)


def test_non_finite_clips_are_dropped_for_every_entry(caplog):
    clips = clip_table(60, 3)
    X = blob_features(clips["label"])
    Xbad = X.copy()
    Xbad[7] = np.nan
    good = from_clip_matrix(clips, X, name="good", kind="trained")
    bad = from_clip_matrix(clips, Xbad, name="mfcc", kind="mfcc")
    with caplog.at_level(logging.WARNING):
        res = run_probes([good, bad], ProbeConfig(n_splits=3, fixed_c=1.0), progress=False)
    assert res["dropped_clips"] == ["clip007"] and res["n_clips"] == 59
    assert all(np.asarray(r["confusion"]).sum() == 59 for r in res["rows"])
    assert "clip007" in caplog.text


def test_supervised_entries_are_not_label_free():
    clips = clip_table(60, 3)
    X = blob_features(clips["label"])
    sup = from_clip_matrix(clips, X, name="sup", kind="supervised", label_free=False)
    res = run_probes([sup], ProbeConfig(n_splits=3, fixed_c=1.0), progress=False)
    assert all(r["kind"] == "supervised" and r["label_free"] is False for r in res["rows"])


# --------------------------------------------------------------------------- MFCC baseline


def test_mfcc_statistics_shape_and_edge_cases(tone_fn):
    sr = 22050
    for y in (tone_fn(1.0), tone_fn(1.0, chirp_to=4000.0, noise=0.05), np.zeros(sr, np.float32),
              tone_fn(0.05), tone_fn(0.01)):
        v = baselines.mfcc_statistics(y, sr)
        assert v.shape == (96,) and v.dtype == np.float32 and np.isfinite(v).all()
    low = baselines.mfcc_statistics(tone_fn(1.0, freq=200.0), sr)
    high = baselines.mfcc_statistics(tone_fn(1.0, freq=4000.0), sr)
    assert not np.allclose(low, high)
    # a pure tone crosses zero 2 * f times a second: ZCR mean ~ 2f / sr
    assert baselines.mfcc_statistics(tone_fn(1.0, freq=1000.0), sr)[47] == pytest.approx(2000 / sr, rel=0.05)
    with pytest.raises(Tile2AudioError):
        baselines.mfcc_statistics(np.zeros(0, np.float32), sr)


def test_mfcc_statistics_match_the_anchor_recipe(tone_fn):
    import librosa

    sr = 22050
    y = tone_fn(2.0, freq=300.0, chirp_to=3000.0, noise=0.05)
    mfcc = librosa.feature.mfcc(y=y, sr=sr, n_mfcc=20)
    frames = np.vstack([mfcc, librosa.feature.delta(mfcc, width=3), librosa.feature.spectral_contrast(y=y, sr=sr),
                        librosa.feature.zero_crossing_rate(y)])
    expected = np.concatenate([frames.mean(axis=1), frames.std(axis=1)])
    np.testing.assert_allclose(baselines.mfcc_statistics(y, sr), expected, rtol=1e-4, atol=1e-4)


def test_mfcc_matrix_nan_row_for_a_bad_file_and_cache_reuse(tmp_path, tone_fn, write_audio, monkeypatch, caplog):
    good = write_audio(tmp_path / "a.wav", tone_fn(1.0))
    stereo = write_audio(tmp_path / "b.flac", tone_fn(1.5, sr=44100, channels=2), sr=44100)
    broken = tmp_path / "c.wav"
    broken.write_bytes(b"not audio at all")
    cache = tmp_path / "mfcc.npz"
    with caplog.at_level(logging.WARNING):
        M = baselines.mfcc_matrix([good, stereo, broken], ["a", "b", "c"], cache_file=cache, jobs=1, progress=False)
    assert M.shape == (3, 96)
    assert np.isfinite(M[:2]).all() and np.isnan(M[2]).all()
    assert "c" in caplog.text
    with np.load(cache, allow_pickle=False) as z:
        assert sorted(z["clip_ids"]) == ["a", "b"]  # failures are retried, not cached

    computed = []
    real = baselines._clip_row
    monkeypatch.setattr(baselines, "_clip_row", lambda p, sr: computed.append(p) or real(p, sr))
    M2 = baselines.mfcc_matrix([stereo, good], ["b", "a"], cache_file=cache, jobs=1, progress=False)
    assert computed == []
    np.testing.assert_allclose(M2, M[[1, 0]])


def test_mfcc_matrix_in_worker_processes_matches_in_process(tmp_path, tone_fn, write_audio):
    paths = [write_audio(tmp_path / f"{i}.wav", tone_fn(1.0, freq=200.0 * (i + 1), noise=0.01, seed=i))
             for i in range(3)]
    clip_ids = ["x", "y", "z"]
    serial = baselines.mfcc_matrix(paths, clip_ids, jobs=1, progress=False)
    parallel = baselines.mfcc_matrix(paths, clip_ids, jobs=2, progress=False)
    np.testing.assert_allclose(parallel, serial, rtol=1e-6)


# --------------------------------------------------------------------------- anchors


def _emotify():
    d = DATASETS / "emotify30"
    t = pd.read_csv(d / "labels.csv")
    clips = pd.DataFrame({"clip_id": t["path"].str.rsplit(".", n=1).str[0], "label": t["genre"], "path": t["path"]})
    return clips, [d / p for p in t["path"]]


def _urbansound():
    d = DATASETS / "urbansound_f12"
    t = pd.read_csv(d / "labels.csv")
    clips = pd.DataFrame({
        "clip_id": t["path"].str.rsplit(".", n=1).str[0], "label": t["class"], "path": t["path"],
        "fold": t["fold"].str.replace("fold", "").astype(int), "group": t["source_id"].astype(str),
    })
    return clips, [d / p for p in t["path"]]


@pytest.mark.slow
@pytest.mark.skipif(not (DATASETS / "emotify30" / "labels.csv").is_file()
                    or not (DATASETS / "urbansound_f12" / "labels.csv").is_file(),
                    reason="real data sets not available")
def test_mfcc_baseline_reproduces_the_published_anchors(tmp_path):
    config = ProbeConfig(fixed_c=1.0, protocol="auto")
    def logreg(clips_and_paths, cache_file):
        emb = baselines.mfcc_embeddings(*clips_and_paths, cache_file=cache_file, jobs=2, progress=False)
        res = run_probes([emb], config, progress=False)
        return res, next(r for r in res["rows"] if r["probe"] == "logreg")

    res, row = logreg(_emotify(), tmp_path / "emotify.npz")
    assert res["protocol"] == "kfold" and res["n_folds"] == 5
    assert row["accuracy"] == pytest.approx(0.600, abs=0.02)
    assert row["macro_f1"] == pytest.approx(0.596, abs=0.02)

    res, row = logreg(_urbansound(), tmp_path / "urban.npz")
    assert res["protocol"] == "fold" and res["n_folds"] == 2
    assert row["macro_f1"] == pytest.approx(0.493, abs=0.02)
    assert row["accuracy"] == pytest.approx(0.480, abs=0.02)


def test_mfcc_baseline_uses_the_cache_crop(tmp_path, write_audio, tone_fn):
    from tile2audio.baselines import baseline_matrix

    head = tone_fn(0.5, sr=22050, freq=440.0)
    tail = tone_fn(1.5, sr=22050, freq=3000.0, noise=0.3)
    whole = write_audio(tmp_path / "whole.wav", np.concatenate([head, tail]), sr=22050)
    cut = write_audio(tmp_path / "cut.wav", head, sr=22050)
    cropped = baseline_matrix("mfcc", [whole], ["w"], sample_rate=22050, jobs=1, progress=False, max_seconds=0.5)
    reference = baseline_matrix("mfcc", [cut], ["c"], sample_rate=22050, jobs=1, progress=False)
    full = baseline_matrix("mfcc", [whole], ["w"], sample_rate=22050, jobs=1, progress=False)
    np.testing.assert_allclose(cropped, reference, rtol=1e-4, atol=1e-4)
    assert not np.allclose(full, reference, atol=1e-2)
