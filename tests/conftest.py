"""Shared test fixtures: audio made on the fly in tmp_path, never committed."""

from __future__ import annotations

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
