"""Bad inputs and faults (issue 10): a corpus of broken audio, bad config values, OS errors,
and the resume / skip-existing defects. Every case asserts its outcome and, where the
defect was a message, that the message names the real cause."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import TINY_FEATURES, TINY_TRAIN, one_line_error
from tile2audio import atomic
from tile2audio.audio import load_audio
from tile2audio.cli import main
from tile2audio.config import FeatureParams, load_experiment, load_training
from tile2audio.datasets import build_manifest
from tile2audio.errors import Tile2AudioError
from tile2audio.features import build_cache

SR = 8000


def _cut(path, fraction=0.5):
    """Keep the first ``fraction`` of a file's bytes (a cut-off download)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# Expected outcome per file of the corpus: (action in failures.csv or "" when clean,
# text the reason must contain, start of the note in index.csv or None when the clip is
# not cached).
EXPECTED = {
    "a/corrupt.mp3": ("skipped", "not an audio file or corrupt", None),
    "a/truncated.wav": ("kept", "truncated", "truncated"),
    "a/truncated.flac": ("kept", "truncated", "truncated"),
    "a/zero.wav": ("skipped", "zero-byte", None),
    "a/text.ogg": ("skipped", "not an audio file or corrupt", None),
    "a/short.wav": ("kept", "shorter than min_seconds", "padded from 0.05 s"),
    "a/silent.wav": ("kept", "silent", "silent"),
    "a/nan.wav": ("skipped", "NaN or inf", None),
    "a/inf.wav": ("skipped", "NaN or inf", None),
    "b/six_channels_48k.wav": ("", "", ""),
    "b/rate_8k.wav": ("", "", ""),
    "b/pcm24.wav": ("", "", ""),
    "b/float64.wav": ("", "", ""),
    "b/ünïcödé name with spaces.wav": ("", "", ""),
}


@pytest.fixture
def corpus(tmp_path, tone_fn, write_audio):
    """A folder data set holding every bad file of the campaign; returns its root."""
    root = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    (root / "a").mkdir(parents=True)
    (root / "a" / "corrupt.mp3").write_bytes(b"ID3\x03\x00\x00\x00\x00\x00\x00" + rng.bytes(4000))
    _cut(write_audio(root / "a" / "truncated.wav", tone_fn(3.0, sr=SR), sr=SR, subtype="PCM_16"))
    _cut(write_audio(root / "a" / "truncated.flac", tone_fn(3.0, sr=SR), sr=SR))
    (root / "a" / "zero.wav").write_bytes(b"")
    (root / "a" / "text.ogg").write_text("this is not audio\n" * 20)
    write_audio(root / "a" / "short.wav", tone_fn(0.05, sr=SR), sr=SR)
    write_audio(root / "a" / "silent.wav", np.zeros(2 * SR, np.float32), sr=SR)
    y = tone_fn(2.0, sr=SR)
    y[100:110] = np.nan
    write_audio(root / "a" / "nan.wav", y, sr=SR, subtype="FLOAT")
    y = tone_fn(2.0, sr=SR)
    y[5] = np.inf
    write_audio(root / "a" / "inf.wav", y, sr=SR, subtype="FLOAT")
    write_audio(root / "b" / "six_channels_48k.wav", tone_fn(2.0, sr=48000, channels=6), sr=48000)
    write_audio(root / "b" / "rate_8k.wav", tone_fn(2.0, sr=8000), sr=8000)
    write_audio(root / "b" / "pcm24.wav", tone_fn(2.0, sr=SR), sr=SR, subtype="PCM_24")
    write_audio(root / "b" / "float64.wav", tone_fn(2.0, sr=SR).astype(np.float64), sr=SR, subtype="DOUBLE")
    write_audio(root / "b" / "ünïcödé name with spaces.wav", tone_fn(2.0, sr=SR), sr=SR)
    os.symlink(".", root / "a" / "loop")  # a symlink loop
    (root / "b" / "x.wav").mkdir()  # a directory with an audio name
    return root


def test_corpus_outcomes(corpus, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tile2audio.datasets.folder"):
        manifest = build_manifest("folder", corpus)
    # The loop is not followed, the directory named x.wav is not a clip.
    assert sorted(manifest["path"]) == sorted(EXPECTED)
    assert set(manifest["label"]) == {"a", "b"}
    assert any("symlink loop" in r.getMessage() and "a/loop" in r.getMessage() for r in caplog.records)

    cache = build_cache(manifest, tmp_path / "cache", FeatureParams(**TINY_FEATURES), jobs=1, progress=False)
    failures = cache.failures.set_index("path")
    index = cache.index.set_index("path")
    for path, (action, reason, note) in EXPECTED.items():
        if action:
            assert failures.loc[path, "action"] == action, path
            assert reason in failures.loc[path, "reason"], (path, failures.loc[path, "reason"])
        else:
            assert path not in failures.index, (path, failures.loc[path].to_dict())
        if note is None:
            assert path not in index.index, path
        else:
            assert path in index.index, path
            assert index.loc[path, "note"].startswith(note), (path, index.loc[path, "note"])
    # The truncated clips keep what decodes, and failures.csv says so with reason "truncated".
    assert failures.loc["a/truncated.wav", "reason"].startswith("truncated")
    assert index.loc["a/truncated.wav", "duration_s"] == pytest.approx(1.5, abs=0.05)
    assert 0 < index.loc["a/truncated.flac", "duration_s"] < 2.9


def test_truncated_policy_skip(corpus, tmp_path):
    manifest = build_manifest("folder", corpus)
    manifest = manifest[manifest["path"].str.contains("truncated|rate_8k")]
    params = FeatureParams(**TINY_FEATURES, truncated_policy="skip")
    cache = build_cache(manifest, tmp_path / "cache", params, jobs=1, progress=False)
    assert list(cache.index["path"]) == ["b/rate_8k.wav"]
    assert sorted(cache.failures["path"]) == ["a/truncated.flac", "a/truncated.wav"]
    assert cache.failures["reason"].str.startswith("truncated").all()
    assert (cache.failures["action"] == "skipped").all()


def test_truncated_wav_is_an_error_by_default(tmp_path, tone_fn, write_audio):
    cut = _cut(write_audio(tmp_path / "cut.wav", tone_fn(3.0, sr=SR), sr=SR, subtype="PCM_16"))
    with pytest.raises(Tile2AudioError, match=r"declares 3.00 s but only 1.50 s"):
        load_audio(cut, SR)


def test_symlink_loop_lists_each_file_once(tmp_path, tone_fn, write_audio, caplog):
    for name in ("one", "two"):
        write_audio(tmp_path / "data" / "a" / f"{name}.wav", tone_fn(1.0, sr=SR), sr=SR)
    os.symlink(".", tmp_path / "data" / "a" / "loop")
    os.symlink(tmp_path / "data" / "a" / "one.wav", tmp_path / "data" / "a" / "alias.wav")
    with caplog.at_level(logging.WARNING, logger="tile2audio.datasets.folder"):
        df = build_manifest("folder", tmp_path / "data")
    assert sorted(df["path"]) == ["a/alias.wav", "a/two.wav"]  # alias.wav sorts before one.wav
    assert set(df["label"]) == {"a"}
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "a/loop" in messages and "a/one.wav" in messages


def test_permission_denied_says_so(tmp_path, tone_fn, write_audio, monkeypatch):
    path = write_audio(tmp_path / "locked.wav", tone_fn(1.0, sr=SR), sr=SR)
    real_open = open

    def deny(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    # Tests run as root here, where chmod 000 does not stop reads: deny the open instead.
    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(Tile2AudioError, match="Permission denied") as info:
        load_audio(path, SR)
    assert "not an audio file" not in str(info.value) and str(info.value).startswith(str(path))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("override", [
    "train.learning_rate=.nan", "tiles.tile_seconds=.inf", "loss.margin=.nan", "features.fmin=.nan",
    "sampler.gain_db=-.inf", "probe.c_grid=[1.0,.nan]", "features.top_db=.inf",
])
def test_non_finite_config_values_are_rejected(override):
    with pytest.raises(Tile2AudioError, match="finite") as info:
        load_experiment(None, [override])
    assert override.split("=")[0] in str(info.value)


def test_numeric_text_is_a_number():
    cfg = load_experiment(None, ["tiles.tile_seconds=1e-9", "tiles.tile_hop_seconds=5E-1", "train.learning_rate=3e-4"])
    assert cfg.tiles.tile_seconds == 1e-9 and cfg.tiles.tile_hop_seconds == 0.5
    assert cfg.train.learning_rate == 3e-4
    with pytest.raises(Tile2AudioError, match="must be a number"):
        load_experiment(None, ["train.learning_rate=fast"])


@pytest.mark.parametrize("override, key", [
    ("train.seed=-1", "train.seed"), ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps"),
    ("train.warmup_steps=-1", "train.warmup_steps"), ("probe.seed=-2", "probe.seed"),
])
def test_negative_counts_are_rejected(override, key):
    with pytest.raises(Tile2AudioError, match=rf"{key} must be >= 0"):
        load_experiment(None, [override])


@pytest.mark.parametrize("values, message", [
    (dict(fmin=4000.0), r"fmin \(4000.0\) must be below the Nyquist"),
    (dict(fmin=5000.0), r"fmin \(5000.0\) must be below the Nyquist"),
    (dict(fmin=3000.0, fmax=2000.0), r"fmin \(3000.0\) must be below features.fmax"),
    (dict(fmin=-10.0), r"fmin must be >= 0"),
    (dict(win_length=512), r"win_length \(512\) must not exceed features.n_fft \(256\)"),
    (dict(top_db=0.0), r"top_db must be > 0"),
    (dict(top_db=-80.0), r"top_db must be > 0"),
])
def test_feature_parameters_are_checked_at_start(values, message):
    with pytest.raises(Tile2AudioError, match=message):
        FeatureParams(**{**TINY_FEATURES, **values})


def test_empty_mel_bands_fail_once_at_start(tmp_path, tone_fn, write_audio):
    path = write_audio(tmp_path / "a.wav", tone_fn(1.0, sr=SR), sr=SR)
    manifest = pd.DataFrame({"clip_id": ["a"], "path": [str(path)]})
    for n_fft in (1, 16):  # n_fft=16 leaves 5 of 16 bands empty at 8 kHz
        params = FeatureParams(**{**TINY_FEATURES, "n_fft": n_fft, "hop_length": 16})
        with pytest.raises(Tile2AudioError, match="mel bands are empty"):
            build_cache(manifest, tmp_path / f"cache{n_fft}", params, jobs=1, progress=False)
        assert not (tmp_path / f"cache{n_fft}").exists()


# --------------------------------------------------------------------------- OS errors, one line, exit 2


@pytest.fixture
def one_clip_manifest(tmp_path, tone_fn, write_audio):
    path = write_audio(tmp_path / "audio" / "a.wav", tone_fn(1.0, sr=SR), sr=SR)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"clip_id": ["a"], "path": [str(path)], "root": [""], "label": [""], "split": [""],
                  "fold": [""], "group": [""]}).to_csv(manifest, index=False)
    return manifest


def _features_cli(manifest, out):
    sets = [a for k, v in TINY_FEATURES.items() for a in ("--set", f"features.{k}={v}")]
    return main(["-q", "features", str(manifest), "-o", str(out), "--jobs", "1", *sets])


def test_output_naming_a_file(one_clip_manifest, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("keep me")
    assert _features_cli(one_clip_manifest, out) == 2
    one_line_error(capsys, str(out), "existing file")
    assert out.read_text() == "keep me"


def test_output_folder_not_writable(one_clip_manifest, tmp_path, capsys, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    # As root a 0o555 folder is still writable, so the permission check is what is faked.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(out) else real_access(p, mode, **kw))
    assert _features_cli(one_clip_manifest, out) == 2
    one_line_error(capsys, str(out), "not writable")


def test_full_disk_during_features(one_clip_manifest, tmp_path, capsys, monkeypatch):
    def full(path, array):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "save_npy", full)
    assert _features_cli(one_clip_manifest, tmp_path / "cache") == 2
    one_line_error(capsys, "No space left on device", "shards")


@pytest.mark.parametrize("override, needle", [
    ("train.seed=-1", "train.seed must be >= 0"), ("tiles.tile_seconds=.inf", "tiles.tile_seconds must be a finite"),
])
def test_bad_training_values_on_the_cli(tiny_cache, tmp_path, capsys, override, needle):
    assert main(["-q", "train", "--cache", str(tiny_cache), "-o", str(tmp_path / "runs"), "--set", override]) == 2
    one_line_error(capsys, needle)
    assert not (tmp_path / "runs").exists()


def test_concurrent_features_runs_are_refused(one_clip_manifest, tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    with open(out / ".lock", "a+b") as holder:  # what a running build holds
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(Tile2AudioError, match="another process is writing this cache"):
            build_cache(one_clip_manifest, out, FeatureParams(**TINY_FEATURES), jobs=1, progress=False)
    cache = build_cache(one_clip_manifest, out, FeatureParams(**TINY_FEATURES), jobs=1, progress=False)
    assert len(cache.index) == 1


# --------------------------------------------------------------------------- training


def _cfg(*extra):
    return load_training(None, TINY_TRAIN + ["train.epochs=2", "train.steps_per_epoch=3", *extra])


class _Killed(BaseException):
    """Stands in for SIGKILL at a chosen point (nothing in the run may catch it)."""


@pytest.mark.parametrize("when", ["after", "before"])
def test_kill_around_the_epoch_checkpoint_keeps_every_log_row(tiny_cache, tmp_path, monkeypatch, when):
    import tile2audio.train as train_mod

    real = train_mod.save_checkpoint

    def killing(run_dir, model, optimizer, step, keep=2):
        if step == 3 and when == "before":
            raise _Killed
        out = real(run_dir, model, optimizer, step, keep)
        if step == 3:
            raise _Killed
        return out

    run = tmp_path / "run"
    monkeypatch.setattr(train_mod, "save_checkpoint", killing)
    with pytest.raises(_Killed):
        train_mod.train(tiny_cache, run, _cfg("train.checkpoint_every_steps=3"), exact=True, progress=False)
    monkeypatch.setattr(train_mod, "save_checkpoint", real)
    train_mod.train(tiny_cache, run, resume=True, exact=True, progress=False)
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [0, 1] and list(log["step"]) == [3, 6]


def test_nan_loss_stops_and_fails_the_run(tiny_cache, tmp_path, monkeypatch):
    import tensorflow as tf

    import tile2audio.losses as losses

    real = losses.compute_losses
    calls = tf.Variable(0, dtype=tf.int64, trainable=False)

    def poisoned(*args, **kwargs):
        out = dict(real(*args, **kwargs))
        calls.assign_add(1)
        out["loss"] = tf.where(calls > 4, tf.constant(np.nan, out["loss"].dtype), out["loss"])
        return out

    monkeypatch.setattr(losses, "compute_losses", poisoned)
    run = tmp_path / "run"
    with pytest.raises(Tile2AudioError, match=r"stopped at step 5: the loss is NaN.*step_000000003"):
        from tile2audio.train import train

        train(tiny_cache, run, _cfg("train.checkpoint_every_steps=3"), exact=True, progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and info["failed_step"] == 5
    assert not (run / "encoder.keras").exists()
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_000000003"]


def test_failed_checkpoint_write_leaves_no_temporary(tiny_cache, tmp_path, monkeypatch, capsys):
    import tile2audio.train as train_mod

    run = tmp_path / "run"
    stale = run / "checkpoints" / ".tmp_step_000000002_99999"
    stale.mkdir(parents=True)  # left by an earlier killed write
    (stale / "model.weights.h5").write_bytes(b"half")
    real = atomic.save_npz

    def full(path, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "save_npz", full)
    with pytest.raises(Tile2AudioError, match="cannot write the checkpoint at step 3: No space left"):
        train_mod.train(tiny_cache, run, _cfg(), exact=True, progress=False)
    assert not list((run / "checkpoints").glob(".tmp_step_*"))
    monkeypatch.setattr(atomic, "save_npz", real)
    train_mod.train(tiny_cache, run, resume=True, exact=True, progress=False)
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


# --------------------------------------------------------------------------- embedding


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    from tile2audio.train import train

    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2"])
    return train(tiny_cache, tmp_path_factory.mktemp("run") / "run", cfg, exact=True, progress=False)


def test_skip_existing_refuses_other_weights(tiny_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "emb"
    assert main(["-q", "embed", str(tiny_run), str(tiny_dataset), "-o", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in (out / "tiles").iterdir()}
    capsys.readouterr()
    code = main(["-q", "embed", str(tiny_run), str(tiny_dataset), "-o", str(out), "--weights", "init",
                 "--skip-existing"])
    assert code == 2
    one_line_error(capsys, "would mix encoders", "'trained'", "'init'")
    assert {p.name: p.read_bytes() for p in (out / "tiles").iterdir()} == before
    assert json.loads((out / "embed.json").read_text())["weights"] == "trained"
    # Without --skip-existing the folder is re-embedded with the init weights, all of it.
    assert main(["-q", "embed", str(tiny_run), str(tiny_dataset), "-o", str(out), "--weights", "init"]) == 0
    after = {p.name: p.read_bytes() for p in (out / "tiles").iterdir()}
    assert after.keys() == before.keys() and all(after[k] != before[k] for k in before)
    assert main(["-q", "embed", str(tiny_run), str(tiny_dataset), "-o", str(out), "--weights", "init",
                 "--skip-existing"]) == 0


def test_embed_refuses_non_finite_weights(tiny_run, tiny_cache, tmp_path):
    import keras

    from tile2audio.embed import embed
    from tile2audio.runs import load_encoder, save_keras_atomic

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    encoder = load_encoder(run)
    w = encoder.weights[0]
    w.assign(np.full(w.shape, np.nan, dtype=keras.backend.standardize_dtype(w.dtype)))
    save_keras_atomic(encoder, run / "encoder.keras")
    with pytest.raises(Tile2AudioError, match="non-finite"):
        embed(run, tiny_cache, tmp_path / "emb", progress=False)
    assert not (tmp_path / "emb").exists() or not list((tmp_path / "emb").rglob("*.npz"))


def test_truncated_encoder_file(tiny_run, tiny_cache, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _cut(run / "encoder.keras")
    assert main(["-q", "embed", str(run), str(tiny_cache), "-o", str(tmp_path / "emb")]) == 2
    one_line_error(capsys, str(run / "encoder.keras"), "truncated or corrupt")


@pytest.mark.parametrize("stage", ["train", "embed"])
def test_output_naming_a_file_in_later_stages(tiny_run, tiny_cache, tmp_path, capsys, stage):
    out = tmp_path / "taken"
    out.write_text("keep me")
    if stage == "train":
        argv = ["-q", "train", "--cache", str(tiny_cache), "-o", str(out), *[a for s in TINY_TRAIN for a in ("--set", s)]]
    else:
        argv = ["-q", "embed", str(tiny_run), str(tiny_cache), "-o", str(out)]
    assert main(argv) == 2
    one_line_error(capsys, str(out), "existing file")
    assert out.read_text() == "keep me"
