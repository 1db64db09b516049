"""Audio front end: decode, downmix, resample once, and the one padding rule.

Every stage that reads audio goes through :func:`load_audio`, so training and embedding
see the same samples for the same file and parameters.
"""

from __future__ import annotations

import logging
import os
import struct
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
# Frames per read when salvaging the start of a stream that breaks off part-way.
_READ_BLOCK = 4096


class TruncatedAudioWarning(UserWarning):
    """Issued by :func:`load_audio` (``truncated="keep"``) for a file shorter than its header says."""


def load_audio(path: str | os.PathLike, sample_rate: int, channel: int | None = None,
               *, truncated: str = "error") -> np.ndarray:
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
    truncated : ``error`` or ``keep``
        What to do with a file whose header promises more audio than the file holds (a
        cut-off download or copy): raise, or return the part that decodes and issue a
        :class:`TruncatedAudioWarning` whose message gives both durations. For WAV the
        header's data-chunk size is compared with the bytes in the file (libsndfile only
        reports the frames it can read); for other formats the header's frame count is
        compared with the frames that decode.

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
    if truncated not in ("error", "keep"):
        raise Tile2AudioError(f"load_audio: truncated must be 'error' or 'keep', got {truncated!r}")
    path = Path(path)
    _check_file(path)
    data, native_sr = _decode(path, truncated)
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
    try:
        # soundfile reports an unreadable file as "not an audio file"; say the real cause.
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise Tile2AudioError(f"{path}: cannot read the file: {exc.strerror or exc}") from exc


def _decode(path: Path, truncated: str = "error") -> tuple[np.ndarray, int]:
    """Decode with soundfile, else librosa/audioread; (frames, channels) float32 and rate."""
    try:
        with sf.SoundFile(str(path)) as fh:
            declared, sr, fmt = fh.frames, fh.samplerate, fh.format
            data = fh.read(dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        # A stream that breaks off part-way (a cut FLAC) fails the whole read; see what decodes.
        data = _decode_partial(path)
        if data is None:
            return _decode_fallback(path, exc)
    if fmt in ("WAV", "WAVEX"):
        declared = _wav_declared_frames(path, declared)
    _check_truncation(path, declared, data.shape[0], sr, truncated)
    return data, sr


def _decode_partial(path: Path) -> np.ndarray | None:
    """The frames that decode before a stream error, block by block; None if none do.

    Only used after a whole-file read failed: libsndfile's MP3 decoder gives wrong
    samples for small block reads, so a healthy file is always read in one call.
    """
    blocks = []
    try:
        with sf.SoundFile(str(path)) as fh:
            while True:
                block = fh.read(_READ_BLOCK, dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                blocks.append(block)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        log.debug("%s: decoding stopped after %d frames: %s", path, sum(map(len, blocks)), exc)
    return np.concatenate(blocks) if blocks else None


def _wav_declared_frames(path: Path, readable: int) -> int:
    """Frames the RIFF ``data`` chunk declares (``readable`` when the header cannot tell)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return readable  # RF64 / RIFX: libsndfile's count is all we have
            block_align = 0
            while True:
                chunk = fh.read(8)
                if len(chunk) < 8:
                    return readable
                cid, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if cid == b"fmt ":
                    fmt = fh.read(min(size, 16))
                    if len(fmt) >= 14:
                        block_align = struct.unpack("<H", fmt[12:14])[0]
                    fh.seek(size - len(fmt) + (size & 1), os.SEEK_CUR)
                elif cid == b"data":
                    # 0 and 0xFFFFFFFF mark a stream written without its final size.
                    if block_align <= 0 or size in (0, 0xFFFFFFFF):
                        return readable
                    return max(readable, size // block_align)
                else:
                    fh.seek(size + (size & 1), os.SEEK_CUR)
    except OSError:
        return readable


def _check_truncation(path: Path, declared: int, got: int, sr: int, truncated: str = "error") -> None:
    """Raise (or warn, ``truncated='keep'``) when fewer frames decode than the header promises."""
    if declared <= 0 or declared >= 2**62:  # unknown length (streams)
        return
    missing = declared - got
    if missing > max(_TRUNCATION_MIN_FRAMES, _TRUNCATION_TOLERANCE * declared):
        what = (f"the header declares {declared / sr:.2f} s but only {got / sr:.2f} s could be decoded")
        if truncated == "keep" and got > 0:
            warnings.warn(TruncatedAudioWarning(f"{path}: truncated: {what}; kept the decoded part"),
                          stacklevel=3)
            return
        raise Tile2AudioError(f"{path}: truncated or corrupt audio: {what}")


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
