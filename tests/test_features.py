"""Tests for tile2audio.features: log-mel, the sharded cache, bad input, resume after SIGKILL."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from tile2audio.audio import load_audio
from tile2audio.config import FeatureParams
from tile2audio.errors import Tile2AudioError
from tile2audio.features import build_cache, extract_clip, log_mel, normalize_frames, open_cache

SMALL = FeatureParams(n_mels=32, n_fft=512, hop_length=256)


def _manifest(root: Path, names: list[str], labels: list[str] | None = None) -> pd.DataFrame:
    """A manifest of files under ``root`` (clip_id = name without extension)."""
    labels = labels or ["x"] * len(names)
    return pd.DataFrame({
        "clip_id": [n.rsplit(".", 1)[0] for n in names], "path": names, "root": str(root),
        "label": labels, "split": "", "fold": [i % 2 for i in range(len(names))], "group": "",
    })


def _tree_bytes(cache_dir: Path) -> dict[str, bytes]:
    """Every file of a finished cache except the resume records, by relative path."""
    return {
        str(p.relative_to(cache_dir)): p.read_bytes()
        for p in sorted(cache_dir.rglob("*")) if p.is_file() and "chunks" not in p.parts
    }


@pytest.fixture
def messy(tmp_path, write_audio, tone_fn):
    """Good clips beside every kind of bad file; returns (audio root, manifest)."""
    root = tmp_path / "audio"
    good = {
        "sine.wav": (tone_fn(2.0, freq=330.0), 22050),
        "chirp.flac": (tone_fn(1.5, chirp_to=3000.0), 22050),
        "noisy.wav": (tone_fn(1.2, noise=0.1, seed=1), 22050),
        "stereo44.wav": (tone_fn(1.0, sr=44100, channels=2), 44100),
        "six48.wav": (tone_fn(1.0, sr=48000, channels=6), 48000),
    }
    for name, (y, sr) in good.items():
        write_audio(root / name, y, sr=sr)
    write_audio(root / "short.wav", tone_fn(0.1))
    write_audio(root / "silent.wav", np.zeros(22050, np.float32))
    nan = tone_fn(1.0)
    nan[100:103] = np.nan
    write_audio(root / "nan.wav", nan, subtype="FLOAT")
    sf.write(str(root / "full.mp3"), tone_fn(2.0), 22050, format="MP3")
    data = (root / "full.mp3").read_bytes()
    (root / "corrupt.mp3").write_bytes(data[: len(data) // 3])
    (root / "full.mp3").unlink()
    (root / "empty.wav").touch()
    (root / "text.ogg").write_text("not audio at all\n" * 30)
    names = list(good) + ["short.wav", "silent.wav", "nan.wav", "corrupt.mp3", "empty.wav", "text.ogg", "gone.wav"]
    return root, _manifest(root, names)


def test_log_mel_shape_and_dtype(tone_fn):
    y = tone_fn(1.0)
    out = log_mel(y, SMALL)
    assert out.shape == (1 + len(y) // SMALL.hop_length, 32)
    assert out.dtype == np.float32
    # the tone's energy sits in the band holding 440 Hz
    import librosa

    centres = librosa.mel_frequencies(n_mels=32 + 2, fmax=11025)[1:-1]
    assert abs(centres[np.argmax(out.mean(axis=0))] - 440.0) < 120.0
    natural = log_mel(y, dataclasses.replace(SMALL, log="log"))
    assert np.isfinite(natural).all() and not np.allclose(natural, out)


def test_build_cache_with_bad_files(messy, tmp_path):
    root, manifest = messy
    cache = build_cache(manifest, tmp_path / "cache", params=SMALL, jobs=1, chunk_clips=4, progress=False)
    # The cut MP3 keeps what decodes (features.truncated_policy='keep'), with a note.
    assert list(cache.index["clip_id"]) == ["sine", "chirp", "noisy", "stereo44", "six48", "short", "silent",
                                            "corrupt"]
    assert cache.index["note"].iloc[-1].startswith("truncated")
    fails = cache.failures.set_index("clip_id")
    assert set(fails.index) == {"short", "silent", "nan", "corrupt", "empty", "text", "gone"}
    expected = {
        "short": ("shorter than min_seconds", "kept"), "silent": ("silent", "kept"),
        "nan": ("3 NaN or inf", "skipped"), "corrupt": ("truncated: the header declares", "kept"),
        "empty": ("zero-byte", "skipped"), "text": ("not an audio file", "skipped"),
        "gone": ("file not found", "skipped"),
    }
    for clip_id, (reason, action) in expected.items():
        assert reason in fails.loc[clip_id, "reason"]
        assert fails.loc[clip_id, "action"] == action
    notes = cache.index.set_index("clip_id")["note"]
    assert notes["short"] == "padded from 0.10 s" and notes["silent"] == "silent" and notes["sine"] == ""
    index = cache.index.set_index("clip_id")
    assert index.loc["short", "duration_s"] == pytest.approx(0.1, abs=1e-3)  # the original duration
    assert index.loc["short", "n_frames"] == 1 + 22050 // SMALL.hop_length  # looped to min_seconds
    assert str(cache.index["fold"].dtype) == "Int64"
    for name in cache.shards:
        shard = np.load(tmp_path / "cache" / "shards" / f"{name}.npy", allow_pickle=False)
        assert shard.dtype == np.float16 and np.isfinite(shard).all()


def test_parallel_build_is_byte_identical(messy, tmp_path):
    _, manifest = messy
    build_cache(manifest, tmp_path / "one", params=SMALL, jobs=1, chunk_clips=3, progress=False)
    build_cache(manifest, tmp_path / "two", params=SMALL, jobs=2, chunk_clips=3, progress=False)
    one, two = _tree_bytes(tmp_path / "one"), _tree_bytes(tmp_path / "two")
    assert set(one) == set(two) and len(one) > 4
    assert all(one[k] == two[k] for k in one)


def test_frames_match_log_mel_of_the_file(messy, tmp_path):
    root, manifest = messy
    cache = build_cache(manifest, tmp_path / "cache", params=SMALL, jobs=1, chunk_clips=4, progress=False)
    for clip_id, name in [("stereo44", "stereo44.wav"), ("six48", "six48.wav"), ("chirp", "chirp.flac")]:
        ref = log_mel(load_audio(root / name, SMALL.sample_rate), SMALL)
        raw = cache.frames(clip_id, raw=True)
        assert raw.dtype == np.float32 and raw.shape == ref.shape
        np.testing.assert_allclose(raw, ref, atol=0.1)  # float16 storage
        frames, note = extract_clip(root / name, SMALL)
        np.testing.assert_allclose(raw, frames, atol=0.1)
        assert note == ""


def test_normalisation_modes(messy, tmp_path):
    _, manifest = messy
    cache = build_cache(manifest, tmp_path / "cache", params=SMALL, jobs=1, progress=False)
    ids = list(cache.index["clip_id"])
    everything = np.concatenate([cache.frames(c, raw=True) for c in ids])
    np.testing.assert_allclose(cache.stats["mean"], everything.mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(cache.stats["std"], everything.std(axis=0), atol=1e-3)
    assert cache.stats["n_frames"] == len(everything)

    standard = np.concatenate([cache.frames(c) for c in ids])  # SMALL.normalize == "standardize"
    np.testing.assert_allclose(standard.mean(axis=0), 0.0, atol=1e-3)
    np.testing.assert_allclose(standard.std(axis=0), 1.0, atol=1e-3)

    cache.params = dataclasses.replace(SMALL, normalize="minmax")
    for c in ids:
        x = cache.frames(c)
        if c == "silent":  # constant clip: no range to stretch
            assert np.allclose(x, 0.0)
        else:
            assert x.min() == pytest.approx(0.0, abs=1e-6) and x.max() == pytest.approx(1.0, abs=1e-6)
    cache.params = dataclasses.replace(SMALL, normalize="none")
    np.testing.assert_array_equal(cache.frames("sine"), cache.frames("sine", raw=True))


def test_normalize_frames_matches_the_cache(messy, tmp_path):
    root, manifest = messy
    for mode in ("standardize", "minmax"):
        params = dataclasses.replace(SMALL, normalize=mode)
        cache = build_cache(manifest, tmp_path / mode, params=params, jobs=1, progress=False)
        raw = cache.frames("chirp", raw=True)
        np.testing.assert_allclose(normalize_frames(raw, params, cache.stats), cache.frames("chirp"), atol=1e-5)
    with pytest.raises(Tile2AudioError, match="mean and std"):
        normalize_frames(raw, SMALL, None)


def test_frames_block_and_shard_parts(messy, tmp_path):
    _, manifest = messy
    # a 0.005 MB limit forces one shard part per clip
    cache = build_cache(manifest, tmp_path / "cache", params=SMALL, jobs=1, chunk_clips=8,
                        max_shard_mb=0.005, progress=False)
    assert len(cache.shards) == len(cache.index)
    ids = ["six48", "sine", "short"]
    block, offsets, lengths = cache.frames_block(ids)
    assert offsets.dtype == np.int64 and lengths.dtype == np.int64
    assert block.shape == (lengths.sum(), 32)
    for c, o, n in zip(ids, offsets, lengths):
        np.testing.assert_array_equal(block[o:o + n], cache.frames(c))
    name = cache.index.set_index("clip_id").loc["sine", "shard"]
    assert cache.shard_nbytes(name) == cache.frames("sine").nbytes
    with pytest.raises(Tile2AudioError, match="not in the cache"):
        cache.frames("nope")
    with pytest.raises(Tile2AudioError, match="not in the cache"):
        cache.frames_block(["sine", "nope"])


def test_skip_policies(messy, tmp_path):
    _, manifest = messy
    params = dataclasses.replace(SMALL, short_policy="skip", silent_policy="skip")
    cache = build_cache(manifest, tmp_path / "cache", params=params, jobs=1, progress=False)
    assert "short" not in set(cache.index["clip_id"]) and "silent" not in set(cache.index["clip_id"])
    actions = cache.failures.set_index("clip_id")["action"]
    assert actions["short"] == "skipped" and actions["silent"] == "skipped"
    with pytest.raises(Tile2AudioError, match="skipped: silent"):
        extract_clip(messy[0] / "silent.wav", params)


def test_manifest_csv_and_root_override(messy, tmp_path):
    root, manifest = messy
    moved = manifest.assign(root="/somewhere/else")
    csv = tmp_path / "manifest.csv"
    moved.to_csv(csv, index=False)
    cache = build_cache(csv, tmp_path / "cache", params=SMALL, root=root, jobs=1, progress=False)
    assert len(cache.index) == 8  # the 7 good or padded clips and the cut MP3 (kept, truncated)
    assert set(cache.index["root"]) == {str(root.absolute())}
    assert list(cache.index["fold"][:3]) == [0, 1, 0]


def test_rerun_fingerprint_and_overwrite(messy, tmp_path):
    _, manifest = messy
    out = tmp_path / "cache"
    build_cache(manifest, out, params=SMALL, jobs=1, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = build_cache(manifest, out, params=SMALL, jobs=1, progress=False)
    assert len(again.index) == 8
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    other = dataclasses.replace(SMALL, n_mels=16)
    with pytest.raises(Tile2AudioError, match="overwrite"):
        build_cache(manifest, out, params=other, jobs=1, progress=False)
    with pytest.raises(Tile2AudioError, match="overwrite"):
        build_cache(manifest.iloc[:3], out, params=SMALL, jobs=1, progress=False)
    rebuilt = build_cache(manifest, out, params=other, jobs=1, progress=False, overwrite=True)
    assert rebuilt.n_mels == 16 and rebuilt.frames("sine").shape[1] == 16


def test_bad_manifests(tmp_path):
    with pytest.raises(Tile2AudioError, match="required column"):
        build_cache(pd.DataFrame({"path": ["a.wav"]}), tmp_path / "c", jobs=1, progress=False)
    with pytest.raises(Tile2AudioError, match="duplicate clip_id"):
        build_cache(pd.DataFrame({"clip_id": ["a", "a"], "path": ["a.wav", "b.wav"]}), tmp_path / "c",
                    jobs=1, progress=False)
    # Every file missing: refused up front, before the output folder is touched (issue 18).
    with pytest.raises(Tile2AudioError, match=r"no clip could be cached: none of the 1 audio file\(s\)"):
        build_cache(pd.DataFrame({"clip_id": ["a"], "path": [str(tmp_path / "a.wav")]}), tmp_path / "c",
                    jobs=1, progress=False)
    assert not (tmp_path / "c").exists()
    (tmp_path / "a.wav").write_bytes(b"")  # present but unusable: listed in failures.csv
    with pytest.raises(Tile2AudioError, match="no clip could be cached"):
        build_cache(pd.DataFrame({"clip_id": ["a"], "path": [str(tmp_path / "a.wav")]}), tmp_path / "c",
                    jobs=1, progress=False)
    assert "zero-byte" in pd.read_csv(tmp_path / "c" / "failures.csv")["reason"][0]


def test_open_cache_errors(messy, tmp_path):
    with pytest.raises(Tile2AudioError, match="not a directory"):
        open_cache(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(Tile2AudioError, match="no params.json"):
        open_cache(tmp_path / "empty")
    _, manifest = messy
    out = tmp_path / "cache"
    cache = build_cache(manifest, out, params=SMALL, jobs=1, progress=False)
    meta = (out / "params.json").read_text()
    (out / "params.json").write_text("{not json")
    with pytest.raises(Tile2AudioError, match="not valid JSON"):
        open_cache(out)
    (out / "params.json").write_text(meta.replace('"n_mels": 32', '"n_mels": 32, "colour": 1'))
    with pytest.raises(Tile2AudioError, match="unknown feature parameter"):
        open_cache(out)
    (out / "params.json").write_text(meta)
    (out / "shards" / f"{cache.shards[0]}.npy").unlink()
    with pytest.raises(Tile2AudioError, match="shard file"):
        open_cache(out)
    (out / "index.csv").write_text("clip_id,shard\nsine,x\n")
    with pytest.raises(Tile2AudioError, match="lacks column"):
        open_cache(out)


_KILL_SCRIPT = """
import sys, time
import pandas as pd
import tile2audio.features as F
from tile2audio.config import FeatureParams
original = F._analyse_clip
def slow(path, params):  # slow each clip down so the parent can kill mid-build
    time.sleep(float(sys.argv[3]))
    return original(path, params)
F._analyse_clip = slow
F.build_cache(pd.read_csv(sys.argv[1], keep_default_na=False), sys.argv[2],
              params=FeatureParams(n_mels=32, n_fft=512, hop_length=256), jobs=1, chunk_clips=2,
              progress=False)
"""


def _start(manifest_csv: Path, out: Path, delay: float, log: Path) -> subprocess.Popen:
    """Run build_cache in a fresh interpreter, stderr to ``log``."""
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(manifest_csv), str(out), str(delay)],
                                stdout=subprocess.DEVNULL, stderr=err)


def test_sigkill_and_resume_is_byte_identical(tmp_path, write_audio, tone_fn):
    root = tmp_path / "audio"
    names = []
    for i in range(20):
        name = f"c{i:02d}.wav"
        write_audio(root / name, tone_fn(0.5 + 0.05 * i, freq=200.0 + 40 * i, noise=0.01, seed=i))
        names.append(name)
    names.insert(7, "missing.wav")
    csv = tmp_path / "manifest.csv"
    _manifest(root, names).to_csv(csv, index=False)
    n_chunks = (len(names) + 1) // 2

    killed = tmp_path / "killed"
    log = tmp_path / "stderr.txt"
    proc = _start(csv, killed, 0.1, log)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            done = len(list((killed / "chunks").glob("chunk-*.json"))) if (killed / "chunks").is_dir() else 0
            if done >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-build: {log.read_text()[-2000:]}"
    done = len(list((killed / "chunks").glob("chunk-*.json")))
    assert 3 <= done < n_chunks
    assert not (killed / "index.csv").exists()

    params = FeatureParams(n_mels=32, n_fft=512, hop_length=256)
    build_cache(csv, killed, params=params, jobs=1, chunk_clips=2, progress=False)  # resume
    build_cache(csv, tmp_path / "straight", params=params, jobs=1, chunk_clips=2, progress=False)
    a, b = _tree_bytes(killed), _tree_bytes(tmp_path / "straight")
    assert set(a) == set(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert not list(killed.rglob(".*.tmp"))
    assert json.loads((killed / "params.json").read_text())["stats"]["n_frames"] > 0


def test_resume_after_partial_chunk(messy, tmp_path):
    _, manifest = messy
    out = tmp_path / "cache"
    build_cache(manifest, out, params=SMALL, jobs=1, chunk_clips=3, progress=False)
    reference = _tree_bytes(out)
    # what a kill leaves behind: a chunk's shard written but not its record, a temp file,
    # and no merged outputs yet
    (out / "chunks" / "chunk-00001.json").unlink()
    (out / "index.csv").unlink()
    (out / "params.json").unlink()
    (out / "shards" / ".c00002-00.npy.abc123.tmp").write_bytes(b"half a shard")
    cache = build_cache(manifest, out, params=SMALL, jobs=1, chunk_clips=3, progress=False)
    assert _tree_bytes(out) == reference
    assert not list(out.rglob("*.tmp"))
    assert len(cache.index) == 8  # the 7 good or padded clips and the cut MP3 (kept, truncated)


def test_log_mel_equals_librosa_reference(tone_fn):
    import librosa

    y = tone_fn(1.3, chirp_to=5000.0, noise=0.05)
    params = FeatureParams(n_mels=40, fmin=50.0, fmax=8000.0, win_length=800)
    ref = librosa.power_to_db(
        librosa.feature.melspectrogram(y=y, sr=22050, n_fft=1024, hop_length=512, win_length=800, n_mels=40,
                                       fmin=50.0, fmax=8000.0, power=2.0),
        ref=1.0, top_db=80.0,
    ).T
    np.testing.assert_allclose(log_mel(y, params), ref, atol=1e-3)
