"""Tests for tile2audio.synth: the built-in synthetic demo dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tile2audio.errors import Tile2AudioError
from tile2audio.synth import ARTISTS_PER_STYLE, STYLES, make_demo_dataset

TINY = dict(n_classes=3, clips_per_class=8, seconds=1.5, sample_rate=16000, progress=False)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A tiny demo dataset shared by the read-only tests; returns its manifest path."""
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), seed=3, **TINY)


def test_manifest_schema_and_files(demo):
    df = pd.read_csv(demo, dtype=str, keep_default_na=False)
    assert list(df.columns[:7]) == ["clip_id", "path", "root", "label", "split", "fold", "group"]
    assert len(df) == 3 * 8 and df["clip_id"].is_unique
    audio = demo.parent / "audio"
    assert set(df["root"]) == {str(audio)}
    names = [s.name for s in STYLES[:3]]
    assert sorted(df["label"].unique()) == sorted(names)
    assert (df["split"] == "").all() and (df["fold"] == "").all()
    for row in df.itertuples():
        assert row.clip_id == f"{row.label}/{row.label}_{int(row.clip_id[-3:]):03d}"
        assert row.path == row.clip_id + ".wav"
        assert row.group.startswith(row.label + "_")
        info = sf.info(str(audio / row.path))
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 24000, "PCM_16")
    groups = df.groupby("label")["group"].nunique()
    assert (groups == ARTISTS_PER_STYLE).all()


def test_deterministic_for_a_seed(demo, tmp_path):
    again = make_demo_dataset(tmp_path / "again", seed=3, **TINY)
    other = make_demo_dataset(tmp_path / "other", seed=4, **TINY)
    df = pd.read_csv(demo, dtype=str, keep_default_na=False)
    for rel in df["path"].iloc[[0, 9, 23]]:
        first = (demo.parent / "audio" / rel).read_bytes()
        assert first == (again.parent / "audio" / rel).read_bytes()
        assert first != (other.parent / "audio" / rel).read_bytes()
    same = pd.read_csv(again, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(df.drop(columns="root"), same.drop(columns="root"))


def test_clips_vary_inside_a_class(demo):
    df = pd.read_csv(demo, dtype=str, keep_default_na=False)
    for label, rows in df.groupby("label"):
        levels = []
        for rel in rows["path"]:
            y, _ = sf.read(str(demo.parent / "audio" / rel), dtype="float32")
            assert np.isfinite(y).all() and np.abs(y).max() > 1e-3  # never silent
            levels.append(20 * np.log10(np.sqrt(np.mean(y**2))))
        assert max(levels) - min(levels) > 6.0, f"{label}: loudness hardly varies"
        assert rows["transpose"].nunique() > 1 and rows["tempo_bpm"].nunique() > 1


def test_rerun_does_not_rewrite(tmp_path):
    manifest = make_demo_dataset(tmp_path, seed=1, **TINY)
    files = sorted((tmp_path / "audio").rglob("*.wav")) + [manifest]
    stamps = {p: p.stat().st_mtime_ns for p in files}
    victim = files[5]
    content = victim.read_bytes()
    victim.unlink()
    make_demo_dataset(tmp_path, seed=1, **TINY)
    assert victim.read_bytes() == content  # regenerated identically
    assert {p: p.stat().st_mtime_ns for p in files if p != victim} == {
        p: t for p, t in stamps.items() if p != victim
    }


def test_bad_arguments(tmp_path):
    with pytest.raises(Tile2AudioError, match="n_classes"):
        make_demo_dataset(tmp_path, n_classes=len(STYLES) + 1, progress=False)
    with pytest.raises(Tile2AudioError, match="clips_per_class"):
        make_demo_dataset(tmp_path, clips_per_class=0, progress=False)
