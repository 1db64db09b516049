"""Tests for tile2audio.audio: decoding, downmix, resampling, bad input, loop padding."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from tile2audio.audio import is_silent, load_audio, loop_pad
from tile2audio.errors import Tile2AudioError


@pytest.mark.parametrize(
    "sr, channels, seconds",
    [(22050, 1, 1.0), (44100, 2, 1.0), (48000, 6, 0.5), (16000, 1, 1.5)],
)
def test_decode_and_resample_shape(tmp_path, write_audio, tone_fn, sr, channels, seconds):
    path = write_audio(tmp_path / f"x{channels}.wav", tone_fn(seconds, sr=sr, channels=channels), sr=sr)
    y = load_audio(path, 22050)
    assert y.dtype == np.float32
    assert y.ndim == 1
    assert abs(len(y) - round(seconds * 22050)) <= 1
    assert np.isfinite(y).all()


def test_downmix_averages_channels(tmp_path, write_audio):
    n = 22050
    stereo = np.stack([np.full(n, 0.2, np.float32), np.full(n, -0.1, np.float32)], axis=1)
    path = write_audio(tmp_path / "dc.wav", stereo, subtype="FLOAT")
    y = load_audio(path, 22050)
    np.testing.assert_allclose(y, 0.05, atol=1e-6)


def test_channel_pick(tmp_path, write_audio, tone_fn):
    six = tone_fn(0.5, sr=48000, channels=6)  # channel c has amplitude 0.3 * (1 - 0.1 c)
    path = write_audio(tmp_path / "six.wav", six, sr=48000, subtype="FLOAT")
    peaks = [np.abs(load_audio(path, 48000, channel=c)).max() for c in (0, 5)]
    np.testing.assert_allclose(peaks, [0.3, 0.15], rtol=1e-3)
    with pytest.raises(Tile2AudioError, match="channel 6 requested but the file has 6"):
        load_audio(path, 22050, channel=6)


def test_resampled_tone_keeps_its_pitch(tmp_path, write_audio, tone_fn):
    path = write_audio(tmp_path / "a.wav", tone_fn(1.0, sr=44100, freq=1000.0), sr=44100)
    y = load_audio(path, 16000)
    spectrum = np.abs(np.fft.rfft(y))
    peak_hz = np.argmax(spectrum) * 16000 / len(y)
    assert abs(peak_hz - 1000.0) < 2.0


@pytest.mark.parametrize("fmt, ext", [("MP3", "mp3"), ("OGG", "ogg"), ("FLAC", "flac")])
def test_compressed_round_trip(tmp_path, tone_fn, fmt, ext):
    y = tone_fn(1.0, sr=22050, freq=440.0)
    path = tmp_path / f"t.{ext}"
    sf.write(str(path), y, 22050, format=fmt)
    out = load_audio(path, 22050)
    assert abs(len(out) - len(y)) <= 1
    # lossy codecs add delay/ringing; the level and the pitch survive
    assert np.sqrt(np.mean(out**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.1)
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * 22050 / len(out)
    assert abs(peak_hz - 440.0) < 3.0


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(Tile2AudioError, match="file not found") as info:
        load_audio(path, 22050)
    assert str(info.value).startswith(str(path))


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.touch()
    with pytest.raises(Tile2AudioError, match="zero-byte") as info:
        load_audio(path, 22050)
    assert str(info.value).startswith(str(path))


def test_text_file_named_ogg(tmp_path):
    path = tmp_path / "fake.ogg"
    path.write_text("this is not audio\n" * 20)
    with pytest.raises(Tile2AudioError, match="not an audio file or corrupt") as info:
        load_audio(path, 22050)
    assert str(info.value).startswith(str(path))


def test_truncated_mp3(tmp_path, tone_fn):
    good = tmp_path / "good.mp3"
    sf.write(str(good), tone_fn(2.0), 22050, format="MP3")
    data = good.read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(Tile2AudioError, match="truncated or corrupt") as info:
        load_audio(cut, 22050)
    assert str(info.value).startswith(str(cut))


def test_garbage_mp3(tmp_path):
    path = tmp_path / "noise.mp3"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(Tile2AudioError, match="not an audio file or corrupt"):
        load_audio(path, 22050)


def test_nan_samples_are_counted(tmp_path, write_audio, tone_fn):
    y = tone_fn(0.5, channels=2)
    y[10:17, 1] = np.nan
    y[20, 0] = np.inf
    path = write_audio(tmp_path / "nan.wav", y, subtype="FLOAT")
    with pytest.raises(Tile2AudioError, match="8 NaN or inf") as info:
        load_audio(path, 22050)
    assert str(info.value).startswith(str(path))


def test_no_samples(tmp_path, write_audio):
    path = write_audio(tmp_path / "none.wav", np.zeros(0, np.float32))
    with pytest.raises(Tile2AudioError, match="no audio samples"):
        load_audio(path, 22050)


def test_loop_pad_repeats_end_to_end():
    x = np.arange(3)
    np.testing.assert_array_equal(loop_pad(x, 8), [0, 1, 2, 0, 1, 2, 0, 1])
    frames = np.arange(10).reshape(5, 2)
    padded = loop_pad(frames, 12)
    assert padded.shape == (12, 2)
    np.testing.assert_array_equal(padded[5:10], frames)
    long = np.arange(6)
    assert loop_pad(long, 4) is long
    with pytest.raises(Tile2AudioError):
        loop_pad(np.zeros((0, 3)), 4)


def test_is_silent():
    assert is_silent(np.zeros(100, np.float32))
    assert is_silent(np.full(100, 1e-5, np.float32))
    assert not is_silent(np.full(100, 1e-3, np.float32))
    assert is_silent(np.full(100, 1e-3, np.float32), threshold_db=-40)
