"""Shared test fixtures: audio made on the fly in tmp_path, never committed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


def tone(seconds: float, sr: int = 22050, freq: float = 440.0, amp: float = 0.3,
         channels: int = 1, seed: int = 0, noise: float = 0.0, chirp_to: float | None = None) -> np.ndarray:
    """A sine (or linear chirp to ``chirp_to``) plus optional white noise; shape (n,) or (n, channels)."""
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    if chirp_to is None:
        phase = 2 * np.pi * freq * t
    else:
        phase = 2 * np.pi * (freq * t + 0.5 * (chirp_to - freq) / max(seconds, 1e-9) * t**2)
    y = amp * np.sin(phase)
    if noise:
        y = y + noise * np.random.default_rng(seed).standard_normal(n)
    y = y.astype(np.float32)
    if channels > 1:
        y = np.stack([y * (1.0 - 0.1 * c) for c in range(channels)], axis=1)
    return y


@pytest.fixture
def write_audio():
    """Return ``write(path, y, sr=22050, subtype=None) -> Path``, creating parent folders."""

    def write(path: Path, y: np.ndarray, sr: int = 22050, subtype: str | None = None) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), y, sr, subtype=subtype)
        return path

    return write


@pytest.fixture
def tone_fn():
    """Return :func:`tone`, the signal generator shared by the tests."""
    return tone


TINY_FEATURES = dict(sample_rate=8000, n_fft=256, hop_length=128, n_mels=16)
#: Overrides that make any training config tiny enough for a test.
TINY_TRAIN = ["model.widths=[4,8]", "model.embedding_dim=8", "model.rnn_units=8", "model.resnet_width=4",
              "train.batch_size=8", "tiles.tile_seconds=0.5", "tiles.tile_hop_seconds=0.5",
              "tiles.neighbourhood_seconds=1.0"]


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Synthetic labelled audio (3 styles x 4 clips x 3 s at 8 kHz); returns the manifest path."""
    from tile2audio.synth import make_demo_dataset

    root = tmp_path_factory.mktemp("tiny_data")
    return make_demo_dataset(root, n_classes=3, clips_per_class=4, seconds=3.0, sample_rate=8000, seed=0,
                             progress=False)


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory) -> Path:
    """A small log-mel cache of :func:`tiny_dataset` (16 mels, 62.5 frames/s)."""
    from tile2audio.config import FeatureParams
    from tile2audio.features import build_cache

    out = tmp_path_factory.mktemp("tiny_cache") / "cache"
    build_cache(tiny_dataset, out, FeatureParams(**TINY_FEATURES), jobs=1, progress=False)
    return out


def pytest_configure(config):
    """Register the ``slow`` marker (real-data checks; they still run in the default suite)."""
    config.addinivalue_line("markers", "slow: takes a minute or more (real-data anchor checks)")


#: The real labelled recordings beside the checkout (absent on a user's fresh machine:
#: tests that need them skip). TILE2AUDIO_DATASETS overrides the location.
SHARED_DATASETS = Path(os.environ.get("TILE2AUDIO_DATASETS",
                                      Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def one_line_error(capsys, *needles):
    """The captured stderr, asserted to be one ``tile2audio: error:`` line holding every needle."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("tile2audio: error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err
