"""Audio front end: decode, downmix, resample once, and the one padding rule.

Every stage that reads audio goes through :func:`load_audio`, so training and embedding
see the same samples for the same file and parameters.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import Tile2AudioError

log = logging.getLogger(__name__)

#: soxr quality used for every resampling (librosa's ``res_type='soxr_hq'``).
RESAMPLE_QUALITY = "soxr_hq"

# A decoded stream shorter than its header's frame count by more than this fraction (or
# at least ``_TRUNCATION_MIN_FRAMES``) is a truncated file, not a rounding difference.
_TRUNCATION_TOLERANCE = 0.01
_TRUNCATION_MIN_FRAMES = 4096


def load_audio(path: str | os.PathLike, sample_rate: int, channel: int | None = None) -> np.ndarray:
    """Decode an audio file to mono float32 at ``sample_rate``.

    WAV, FLAC, OGG and MP3 are decoded with soundfile (libsndfile); librosa/audioread is
    tried only for files soundfile cannot open. Channels are averaged into one (or
    ``channel`` picks one), then the signal is resampled once with soxr (``soxr_hq``).

    Parameters
    ----------
    path : str or os.PathLike
        The audio file.
    sample_rate : int
        Target sample rate in Hz.
    channel : int or None
        Keep only this channel (0-based) instead of averaging all of them.

    Returns
    -------
    np.ndarray
        float32, shape (n_samples,).

    Raises
    ------
    Tile2AudioError
        The message starts with the path and names the reason: file not found, zero-byte
        file, not an audio file or corrupt (including a truncated stream), channel out of
        range, NaN or inf samples (with their count), or no samples.
    """
    path = Path(path)
    _check_file(path)
    data, native_sr = _decode(path)
    if data.shape[0] == 0:
        raise Tile2AudioError(f"{path}: the file holds no audio samples")
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise Tile2AudioError(f"{path}: {bad} NaN or inf sample(s) out of {data.size}; the file is corrupt")
    y = _to_mono(data, channel, path)
    return resample(y, native_sr, sample_rate)


def resample(y: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample a mono signal with soxr (``soxr_hq``); a no-op at the same rate.

    Parameters
    ----------
    y : np.ndarray
        Shape (n_samples,).
    orig_sr, target_sr : int
        Sample rates in Hz.

    Returns
    -------
    np.ndarray
        float32, shape (round(n_samples * target_sr / orig_sr),).
    """
    y = np.ascontiguousarray(y, dtype=np.float32)
    if int(orig_sr) == int(target_sr):
        return y
    return np.asarray(soxr.resample(y, int(orig_sr), int(target_sr), quality=RESAMPLE_QUALITY), dtype=np.float32)


def loop_pad(x: np.ndarray, length: int) -> np.ndarray:
    """Repeat ``x`` end to end along axis 0 until it has ``length`` rows.

    This is the package's one padding rule, used for clips shorter than
    ``FeatureParams.min_seconds`` (on samples) and by the segmenter for clips shorter than
    one tile (on spectrogram frames). Looping keeps the clip's spectral statistics and
    texture; zero padding would instead teach the encoder that silence is part of the
    sound and make short clips look alike.

    Parameters
    ----------
    x : np.ndarray
        Shape (n, ...) with n >= 1.
    length : int
        Rows wanted.

    Returns
    -------
    np.ndarray
        Shape (max(n, length), ...); ``x`` itself when it is already long enough.
    """
    x = np.asarray(x)
    n = x.shape[0]
    if n >= length:
        return x
    if n == 0:
        raise Tile2AudioError("loop_pad: cannot loop an empty array")
    reps = -(-int(length) // n)
    return np.concatenate([x] * reps, axis=0)[:length]


def is_silent(y: np.ndarray, threshold_db: float = -80.0) -> bool:
    """True when the signal is all zero or its peak is below ``threshold_db`` dBFS.

    Parameters
    ----------
    y : np.ndarray
        Samples, any shape, full scale 1.0.
    threshold_db : float
        Peak level (dB re full scale) under which the clip counts as silent.
    """
    if y.size == 0:
        return True
    peak = float(np.max(np.abs(y)))
    return peak <= 10.0 ** (threshold_db / 20.0)


# --------------------------------------------------------------------------- helpers


def _check_file(path: Path) -> None:
    """Raise for a missing, non-regular or empty file."""
    if not path.exists():
        raise Tile2AudioError(f"{path}: file not found")
    if not path.is_file():
        raise Tile2AudioError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise Tile2AudioError(f"{path}: zero-byte file")


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """Decode with soundfile, else librosa/audioread; (frames, channels) float32 and rate."""
    try:
        with sf.SoundFile(str(path)) as fh:
            declared = fh.frames
            data = fh.read(dtype="float32", always_2d=True)
            sr = fh.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        return _decode_fallback(path, exc)
    _check_truncation(path, declared, data.shape[0], sr)
    return data, sr


def _check_truncation(path: Path, declared: int, got: int, sr: int) -> None:
    """Raise when fewer frames decode than the header promises (a cut-off download)."""
    if declared <= 0 or declared >= 2**62:  # unknown length (streams)
        return
    missing = declared - got
    if missing > max(_TRUNCATION_MIN_FRAMES, _TRUNCATION_TOLERANCE * declared):
        raise Tile2AudioError(
            f"{path}: truncated or corrupt audio: the header declares {declared / sr:.2f} s "
            f"but only {got / sr:.2f} s could be decoded"
        )


def _decode_fallback(path: Path, first_error: Exception) -> tuple[np.ndarray, int]:
    """Try librosa/audioread for formats libsndfile cannot open; raise if that fails too."""
    try:
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y, sr = librosa.load(str(path), sr=None, mono=False, dtype=np.float32)
    except Exception as exc:  # audioread raises many unrelated types (NoBackendError, EOFError, ...)
        raise Tile2AudioError(
            f"{path}: not an audio file or corrupt (libsndfile: {_sndfile_reason(first_error)}; "
            f"audioread: {str(exc).strip() or type(exc).__name__})"
        ) from exc
    y = np.asarray(y, dtype=np.float32)
    data = y[:, None] if y.ndim == 1 else y.T
    log.debug("%s: decoded with audioread (soundfile could not open it)", path)
    return np.ascontiguousarray(data), int(sr)


def _sndfile_reason(exc: Exception) -> str:
    """libsndfile's reason, minus its misleading 'does not exist' for undecodable MP3 data."""
    reason = str(exc).split(":", 1)[-1].strip().rstrip(".") or type(exc).__name__
    if "does not exist" in reason:  # the file exists (checked earlier); mpg123 found no frames
        return "no decodable audio frames"
    return reason


def _to_mono(data: np.ndarray, channel: int | None, path: Path) -> np.ndarray:
    """Average the channels of (frames, channels) data, or pick one."""
    n_channels = data.shape[1]
    if channel is not None:
        if not 0 <= channel < n_channels:
            raise Tile2AudioError(
                f"{path}: channel {channel} requested but the file has {n_channels} channel(s)"
            )
        return np.ascontiguousarray(data[:, channel])
    if n_channels == 1:
        return data[:, 0]
    return data.mean(axis=1, dtype=np.float32)
