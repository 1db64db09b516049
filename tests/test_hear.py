"""The HEAR 2021 API: a conformance test that follows hear-validator 2021.0.6's checks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import TINY_TRAIN
from tile2audio import hear
from tile2audio.config import FeatureParams, load_training
from tile2audio.errors import Tile2AudioError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hear_run(tiny_dataset, tmp_path_factory):
    """A tiny run at 16 kHz (a HEAR rate): 16 ms frames, 0.5 s tiles of 31 frames."""
    from tile2audio.features import build_cache
    from tile2audio.train import train

    root = tmp_path_factory.mktemp("hear")
    cache = build_cache(tiny_dataset, root / "cache", FeatureParams(sample_rate=16000, n_fft=512, hop_length=256,
                                                                   n_mels=16), jobs=1, progress=False)
    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2"])
    return train(cache.path, root / "run", cfg, exact=True, progress=False)


def _noise(n: int, seconds: float, sr: int, seed: int = 0) -> tf.Tensor:
    """White noise in [-1, 1], the validator's test signal."""
    rng = np.random.default_rng(seed)
    return tf.constant(rng.uniform(-1, 1, (n, int(seconds * sr))).astype(np.float32))


def test_module_attributes(hear_run):
    model = hear.load_model(str(hear_run))
    assert isinstance(model, tf.Module)
    assert model.sample_rate in (16000, 22050, 32000, 44100, 48000)
    assert type(model.sample_rate) is int
    assert type(model.timestamp_embedding_size) is int and model.timestamp_embedding_size == 8
    assert type(model.scene_embedding_size) is int and model.scene_embedding_size == 16  # meanstd


@pytest.mark.parametrize("seconds", [1.07, 1.98, 4.0])
def test_timestamp_embeddings_follow_the_validator(hear_run, seconds):
    model = hear.load_model(str(hear_run))
    audio = _noise(2, seconds, model.sample_rate, seed=int(seconds * 100))
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    assert emb.dtype == tf.float32 and ts.dtype == tf.float32
    emb, ts = emb.numpy(), ts.numpy()
    assert emb.ndim == 3 and emb.shape[0] == 2 and emb.shape[2] == model.timestamp_embedding_size
    assert ts.shape == emb.shape[:2] and ts.shape[1] > 1
    diff = np.diff(ts)
    avg = diff.mean()
    assert np.abs(diff - avg).max() <= 1.0  # evenly spaced within 1 ms
    assert avg <= 50.0  # HEAR's advice, met by the fine hop (2 frames = 32 ms here)
    length_ms = 1000 * seconds
    assert ts.min() >= 0 and ts.min() <= avg
    assert ts.max() <= length_ms  # never past the audio
    assert ts.max() >= length_ms - 2 * avg  # the validator's "embeddings for the end" check
    assert np.isfinite(emb).all()
    again, ts2 = hear.get_timestamp_embeddings(audio, model)
    np.testing.assert_array_equal(again.numpy(), emb)  # same audio, same embeddings
    np.testing.assert_array_equal(ts2.numpy(), ts)


def test_scene_embeddings_follow_the_validator_and_match_embed(hear_run, tmp_path, write_audio):
    from tile2audio.embed import embed

    model = hear.load_model(str(hear_run))
    audio = _noise(4, 2.74, model.sample_rate, seed=3)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.dtype == tf.float32 and scene.shape == (4, model.scene_embedding_size)
    np.testing.assert_array_equal(hear.get_scene_embeddings(audio, model).numpy(), scene.numpy())
    # A sound alone or in a batch gets the same embedding.
    np.testing.assert_allclose(hear.get_scene_embeddings(audio[1:2], model).numpy()[0], scene.numpy()[1],
                               rtol=1e-5, atol=1e-6)
    # The scene embedding is the probes' clip pooling, the same as `tile2audio embed`'s.
    wav = write_audio(tmp_path / "n.wav", audio.numpy()[0], sr=model.sample_rate, subtype="FLOAT")
    ref = embed(hear_run, [wav], progress=False).pooled("meanstd")[0]
    np.testing.assert_allclose(scene.numpy()[0], ref, rtol=1e-4, atol=1e-5)


def test_short_audio_is_looped_and_timestamps_stay_inside(hear_run):
    model = hear.load_model(str(hear_run / "encoder.keras"), hop_seconds=0.016)  # one frame
    audio = _noise(2, 0.2, model.sample_rate)  # shorter than one 0.5 s tile and min_seconds
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    ts = ts.numpy()
    assert ts.shape[1] >= 2 and ts.max() <= 200.0 and np.allclose(np.diff(ts), 16.0, atol=1e-3)
    assert np.isfinite(emb.numpy()).all()
    assert hear.get_scene_embeddings(audio, model).shape == (2, model.scene_embedding_size)


def test_init_weights_and_errors(hear_run, tmp_path):
    trained = hear.load_model(str(hear_run))
    rnd = hear.load_model(str(hear_run / "encoder_init.keras"))
    audio = _noise(1, 1.0, trained.sample_rate)
    assert not np.allclose(hear.get_scene_embeddings(audio, trained).numpy(),
                           hear.get_scene_embeddings(audio, rnd).numpy())
    with pytest.raises(Tile2AudioError, match="run directory"):
        hear.load_model("")
    with pytest.raises(Tile2AudioError, match="not a tile2audio run"):
        hear.load_model(str(tmp_path))
    with pytest.raises(Tile2AudioError, match="n_sounds"):
        hear.get_scene_embeddings(np.zeros(100, np.float32), trained)


@pytest.mark.skipif(shutil.which("hear-validator") is None,
                    reason="hear-validator not installed (pip install --no-deps --ignore-requires-python "
                           "hearvalidator==2021.0.6)")
def test_official_hear_validator(hear_run):
    done = subprocess.run(["hear-validator", "tile2audio.hear", "-m", str(hear_run)], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "Checking get_scene_embeddings" in done.stdout
