"""Handcrafted baselines: MFCC statistics per clip (the anchor of the benchmark data sets)
and, with the optional ``opensmile`` package (``pip install -e ".[opensmile]"``), the
openSMILE eGeMAPSv02 (88-d) and ComParE_2016 (6373-d) functionals.

Per clip: 20 MFCC, their deltas (3-frame window, see :data:`DELTA_WIDTH`), spectral
contrast (7 bands) and zero-crossing rate, frame-wise with librosa's defaults otherwise
(n_fft 2048, hop 512, centred frames, 128 mel bands); then the mean
and the standard deviation of each of those 48 rows over the clip's frames: 96 numbers.
The probes standardise them and fit a logistic regression, which reproduces the anchors
of ``datasets/README.md`` (emotify30, urbansound_f12).

The random-weight encoder baseline needs no code here: training saves
``encoder_init.keras`` and ``tile2audio embed`` exports it with ``weights='init'``.

openSMILE baselines
    :func:`opensmile_matrix` runs openSMILE only in spawned worker processes, never in
    the calling process, even with ``jobs=1``: importing ``opensmile`` after TensorFlow
    in one process has crashed with ``malloc(): invalid size``, and the callers (the
    pipeline, a notebook) usually have TensorFlow loaded. The workers import neither
    TensorFlow nor Keras. Each kind has its own cache beside the MFCC one
    (``egemaps_stats.npz``, ``compare_stats.npz``), with the same rules. The decoding
    rate is the same as the MFCC baseline's (22050 Hz by default), so the three
    handcrafted sets see the same audio.

Decoding failures
    :func:`mfcc_matrix` never stops on one bad file: the clip gets a warning and a row of
    NaN (not cached, so it is retried next time). :func:`tile2audio.probes.run_probes`
    drops clips with non-finite features from every split for every entry, so all
    entries are still compared on the same clips.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import atomic
from .console import show_progress
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

N_MFCC = 20
N_FFT = 2048
HOP = 512
N_FEATURES = 96
#: Deltas over 3 frames (a central difference). This is what reproduces the published
#: anchors (emotify30 0.600 / 0.596, urbansound_f12 0.480 / 0.493); librosa's default
#: 9-frame window scores about 0.03 higher on both sets, so it is not the anchor's
#: feature set.
DELTA_WIDTH = 3
CACHE_VERSION = 2
_SAVE_EVERY_SECONDS = 60.0


def mfcc_statistics(y: np.ndarray, sr: int) -> np.ndarray:
    """MFCC / delta / spectral-contrast / ZCR mean and std of one clip.

    Parameters
    ----------
    y : np.ndarray, shape (n_samples,)
        Mono audio. Clips shorter than one FFT frame are looped up to ``n_fft`` samples.
    sr : int
        Sample rate in Hz.

    Returns
    -------
    np.ndarray, float32, shape (96,)
        The means of [20 MFCC, 20 deltas, 7 contrast bands, ZCR] (48), then their
        standard deviations over frames (48).
    """
    import librosa

    from .audio import loop_pad

    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1 or y.size == 0:
        raise Tile2AudioError(f"mfcc_statistics needs a non-empty mono signal, got shape {y.shape}")
    if not np.isfinite(y).all():
        raise Tile2AudioError("mfcc_statistics: the signal has NaN or inf samples")
    y = loop_pad(y, N_FFT)  # at least 5 centred frames, enough for the delta window
    # One STFT feeds both the mel spectrogram and the contrast (librosa would compute two).
    magnitude = np.abs(librosa.stft(y, n_fft=N_FFT, hop_length=HOP))
    mel_db = librosa.power_to_db(librosa.feature.melspectrogram(S=magnitude**2, sr=sr))
    mfcc = librosa.feature.mfcc(S=mel_db, n_mfcc=N_MFCC)
    delta = librosa.feature.delta(mfcc, width=DELTA_WIDTH)
    contrast = librosa.feature.spectral_contrast(S=magnitude, sr=sr)
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=N_FFT, hop_length=HOP)
    feats = np.vstack([mfcc, delta, contrast, zcr])
    return np.concatenate([feats.mean(axis=1), feats.std(axis=1)]).astype(np.float32)


def _decode(path: str, sample_rate: int, max_seconds: float | None) -> np.ndarray:
    """The file's samples, cut to its first ``max_seconds`` like the feature cache's (``features.max_seconds``)."""
    from .audio import load_audio

    y = load_audio(path, sample_rate)
    return y if max_seconds is None else y[: max(1, int(round(max_seconds * sample_rate)))]


def _clip_row(path: str, sample_rate: int, max_seconds: float | None = None) -> tuple[np.ndarray | None, str]:
    """Statistics of one file, or (None, reason); runs in a worker process."""
    try:
        return mfcc_statistics(_decode(path, sample_rate, max_seconds), sample_rate), ""
    except Tile2AudioError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a library error in one file must not stop the rest
        return None, f"{path}: {type(exc).__name__}: {exc}"


def _read_cache(cache_file: Path | None, sample_rate: int, version: int = CACHE_VERSION) -> dict[str, tuple[str, np.ndarray]]:
    """Cached rows ``clip_id -> (path, row)``; empty when absent, stale or unreadable."""
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            if int(z["version"]) != version or int(z["sample_rate"]) != sample_rate:
                log.info("baseline cache %s was made with other settings; recomputing", cache_file)
                return {}
            return {str(c): (str(p), r) for c, p, r in zip(z["clip_ids"], z["paths"], z["matrix"])}
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring unreadable baseline cache %s (%s)", cache_file, exc)
        return {}


def _write_cache(cache_file: Path, rows: dict[str, tuple[str, np.ndarray]], sample_rate: int,
                 n_features: int = N_FEATURES, version: int = CACHE_VERSION) -> None:
    """Save every finite cached row atomically."""
    good = {c: v for c, v in rows.items() if np.isfinite(v[1]).all()}
    ids = sorted(good)
    matrix = np.stack([good[c][1] for c in ids]) if ids else np.zeros((0, n_features), np.float32)
    atomic.save_npz(
        cache_file,
        clip_ids=np.array(ids, dtype=str),
        paths=np.array([good[c][0] for c in ids], dtype=str),
        matrix=matrix.astype(np.float32),
        sample_rate=np.array(sample_rate),
        version=np.array(version),
    )


def _compute(todo: list[tuple[str, str]], sample_rate: int, jobs: int, progress: bool, kind: str = "mfcc",
             max_seconds: float | None = None):
    """Yield (clip_id, path, row or None, reason) for every pending clip."""
    spec = KINDS[kind]
    bar = tqdm(total=len(todo), desc=f"{spec.title} baseline", unit="clip", disable=not show_progress(progress))
    try:
        if kind == "mfcc" and (jobs <= 1 or len(todo) < 2):
            for cid, path in todo:
                yield (cid, path, *_clip_row(path, sample_rate, max_seconds))
                bar.update()
            return
        # spawn: the parent may have imported tensorflow, which does not survive fork
        # (and openSMILE must never share a process with it; see the module docstring).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            chunk = max(1, min(16, len(todo) // (4 * jobs)))
            n = len(todo)
            if kind == "mfcc":
                results = pool.map(_clip_row, [p for _, p in todo], [sample_rate] * n, [max_seconds] * n,
                                   chunksize=chunk)
            else:
                results = pool.map(_smile_row, [p for _, p in todo], [sample_rate] * n, [kind] * n,
                                   [max_seconds] * n, chunksize=chunk)
            for (cid, path), (row, reason) in zip(todo, results):
                yield cid, path, row, reason
                bar.update()
    finally:
        bar.close()


def mfcc_matrix(
    paths: Sequence[str | os.PathLike],
    clip_ids: Sequence[str],
    cache_file: str | os.PathLike | None = None,
    sample_rate: int = 22050,
    jobs: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """MFCC statistics of many files, computed in parallel and cached.

    Parameters
    ----------
    paths : list of paths, one audio file per clip
    clip_ids : list of str, same length; the cache key
    cache_file : path of a ``.npz`` or None
        Holds ``clip_ids``, ``paths``, ``matrix`` (n, 96), ``sample_rate``, ``version``.
        Rows of clips already there (same path, same sample rate) are reused; new rows
        are added (the cache keeps clips of earlier calls too). Saved atomically, also
        every minute during a long computation.
    sample_rate : int
        Decoding rate (files are resampled once, by :func:`tile2audio.audio.load_audio`).
    jobs : int or None
        Worker processes (spawn context); None uses every CPU, 1 computes in-process.
    progress : bool
        Show a tqdm bar.

    Returns
    -------
    np.ndarray, float32, shape (n_clips, 96)
        Row i belongs to ``clip_ids[i]``. A file that cannot be decoded gets a warning
        and a row of NaN (see the module docstring).
    """
    return baseline_matrix("mfcc", paths, clip_ids, cache_file, sample_rate, jobs, progress)


def baseline_matrix(
    kind: str,
    paths: Sequence[str | os.PathLike],
    clip_ids: Sequence[str],
    cache_file: str | os.PathLike | None = None,
    sample_rate: int = 22050,
    jobs: int | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Features of one baseline kind for many files, in parallel and cached.

    Parameters
    ----------
    kind : ``mfcc``, ``egemaps`` or ``compare`` (see :data:`KINDS`)
    paths, clip_ids, cache_file, sample_rate, jobs, progress : see :func:`mfcc_matrix`
        For the openSMILE kinds ``jobs=1`` still means one worker process (never the
        calling process).
    max_seconds : float, optional
        Use only the first ``max_seconds`` of each file, as a cache built with
        ``features.max_seconds`` does (so that baselines see the same audio as the encoder).

    Returns
    -------
    np.ndarray, float32, shape (n_clips, KINDS[kind].dim)
    """
    if kind not in KINDS:
        raise Tile2AudioError(f"unknown baseline {kind!r}; known: {', '.join(KINDS)}")
    spec = KINDS[kind]
    if spec.needs_opensmile:
        require_opensmile(kind)
    paths = [str(p) for p in paths]
    clip_ids = [str(c) for c in clip_ids]
    if len(paths) != len(clip_ids):
        raise Tile2AudioError(f"{kind} baseline: {len(paths)} paths but {len(clip_ids)} clip ids")
    if len(set(clip_ids)) != len(clip_ids):
        raise Tile2AudioError(f"{kind} baseline: clip ids must be unique")
    cache_file = Path(cache_file) if cache_file is not None else None
    rows = _read_cache(cache_file, sample_rate, spec.version)
    todo = [(c, p) for c, p in zip(clip_ids, paths) if c not in rows or rows[c][0] != p]
    if todo:
        _fill(rows, todo, cache_file, sample_rate, jobs, progress, kind, max_seconds)
    nan = np.full(spec.dim, np.nan, dtype=np.float32)
    return np.stack([rows.get(c, ("", nan))[1] for c in clip_ids]).astype(np.float32)


def _fill(rows: dict, todo: list, cache_file: Path | None, sample_rate: int, jobs: int | None, progress: bool,
          kind: str = "mfcc", max_seconds: float | None = None) -> None:
    """Compute the pending rows into ``rows``, saving the cache now and then."""
    spec = KINDS[kind]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(todo)))
    failed, last_save = [], time.monotonic()
    save = lambda: _write_cache(cache_file, rows, sample_rate, spec.dim, spec.version)  # noqa: E731
    try:
        for cid, path, row, reason in _compute(todo, sample_rate, jobs, progress, kind, max_seconds):
            if row is None:
                log.warning("%s baseline: %s gets a row of NaN (%s)", spec.title, cid, reason)
                failed.append(cid)
                row = np.full(spec.dim, np.nan, dtype=np.float32)
            rows[cid] = (path, row)
            if cache_file is not None and time.monotonic() - last_save > _SAVE_EVERY_SECONDS:
                save()
                last_save = time.monotonic()
    except _TensorFlowInWorker as exc:
        raise Tile2AudioError(
            f"the {spec.title} worker processes import TensorFlow, and openSMILE must not share a process "
            "with it: spawned workers re-import the main script, so move its top-level `import tensorflow` "
            "(or keras) into a function or under `if __name__ == '__main__':`"
        ) from exc
    except BrokenProcessPool as exc:
        raise Tile2AudioError(
            f"a {spec.title} worker process died (out of memory, or a crash in a decoder); the rows "
            f"computed so far are {'cached in ' + str(cache_file) if cache_file else 'lost (no cache_file)'}. "
            "Rerun, with jobs=1 to find the file that crashes it"
        ) from exc
    finally:
        if cache_file is not None:
            save()
    if failed:
        log.warning("%s baseline: %d of %d clip(s) failed to decode: %s", spec.title, len(failed), len(todo),
                    ", ".join(failed[:10]) + (" ..." if len(failed) > 10 else ""))


def mfcc_embeddings(
    clips: pd.DataFrame,
    paths: Sequence[str | os.PathLike],
    cache_file: str | os.PathLike | None = None,
    sample_rate: int = 22050,
    jobs: int | None = None,
    progress: bool = True,
    name: str = "mfcc",
):
    """The MFCC baseline of a clip table as an :class:`~tile2audio.embed.EmbeddingSet`.

    Parameters
    ----------
    clips : DataFrame with ``clip_id`` (and ``label``, ``split``, ``fold``, ``group``)
    paths : the audio file of each row of ``clips``
    cache_file, sample_rate, jobs, progress : see :func:`mfcc_matrix`
    name : display name

    Returns
    -------
    EmbeddingSet
        ``kind='mfcc'``, label-free, 96-dimensional, one "tile" per clip.
    """
    return baseline_embeddings("mfcc", clips, paths, cache_file, sample_rate, jobs, progress, name)


def baseline_embeddings(
    kind: str,
    clips: pd.DataFrame,
    paths: Sequence[str | os.PathLike],
    cache_file: str | os.PathLike | None = None,
    sample_rate: int = 22050,
    jobs: int | None = None,
    progress: bool = True,
    name: str | None = None,
    max_seconds: float | None = None,
):
    """One baseline kind of a clip table as an :class:`~tile2audio.embed.EmbeddingSet`.

    Parameters
    ----------
    kind : ``mfcc``, ``egemaps`` or ``compare``
    clips, paths, cache_file, sample_rate, jobs, progress : see :func:`mfcc_embeddings`
    name : display name (default: :attr:`BaselineKind.title`)
    max_seconds : crop of each file, see :func:`baseline_matrix` (the cache's ``features.max_seconds``)

    Returns
    -------
    EmbeddingSet
        ``kind`` is the baseline kind, label-free, one "tile" per clip,
        ``KINDS[kind].dim`` dimensions.
    """
    from .embed import from_clip_matrix

    matrix = baseline_matrix(kind, paths, clips["clip_id"].astype(str).tolist(), cache_file=cache_file,
                             sample_rate=sample_rate, jobs=jobs, progress=progress, max_seconds=max_seconds)
    return from_clip_matrix(clips, matrix, name=name or KINDS[kind].title, kind=kind)


# --------------------------------------------------------------------------- openSMILE


class BaselineKind(NamedTuple):
    """A handcrafted baseline: ``title`` (display name), ``dim``, ``cache_name`` (the
    ``.npz`` in a feature cache), ``version`` (of the cached rows) and whether it needs
    the optional ``opensmile`` package."""

    title: str
    dim: int
    cache_name: str
    version: int
    needs_opensmile: bool


#: The baseline kinds ``probe.baselines`` may name.
KINDS: dict[str, BaselineKind] = {
    "mfcc": BaselineKind("MFCC statistics", N_FEATURES, "mfcc_stats.npz", CACHE_VERSION, False),
    "egemaps": BaselineKind("eGeMAPSv02", 88, "egemaps_stats.npz", 1, True),
    "compare": BaselineKind("ComParE_2016", 6373, "compare_stats.npz", 1, True),
}
_SMILE_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}
_smiles: dict = {}  # one opensmile.Smile per kind and worker process


def opensmile_available() -> bool:
    """True when the ``opensmile`` package is installed (checked without importing it)."""
    return importlib.util.find_spec("opensmile") is not None


def require_opensmile(kind: str) -> None:
    """Raise a one-line error naming the install command when ``opensmile`` is missing."""
    if not opensmile_available():
        raise Tile2AudioError(
            f"the {kind} baseline needs the opensmile package: pip install -e \".[opensmile]\" "
            "(or pip install opensmile), or drop it from probe.baselines"
        )


def resolve_baselines(kinds: Sequence[str] | None) -> list[str]:
    """The baseline kinds to compute for a ``probe.baselines`` setting.

    Parameters
    ----------
    kinds : list of str or None
        None (the default) means every kind available here: ``mfcc``, plus ``egemaps``
        and ``compare`` when ``opensmile`` is installed.

    Returns
    -------
    list of str
        In :data:`KINDS` order.

    Raises
    ------
    Tile2AudioError
        For an openSMILE kind when ``opensmile`` is not installed.
    """
    if kinds is None:
        return [k for k, spec in KINDS.items() if not spec.needs_opensmile or opensmile_available()]
    for k in kinds:
        if k not in KINDS:
            raise Tile2AudioError(f"unknown baseline {k!r} in probe.baselines; known: {', '.join(KINDS)}")
        if KINDS[k].needs_opensmile:
            require_opensmile(k)
    return [k for k in KINDS if k in kinds]


def opensmile_functionals(y: np.ndarray, sr: int, kind: str = "egemaps") -> np.ndarray:
    """openSMILE functionals of one clip; call it only in a process without TensorFlow.

    Parameters
    ----------
    y : np.ndarray, shape (n_samples,)
        Mono audio. Clips shorter than 0.5 s are looped up to 0.5 s (the padding rule
        of the other features; openSMILE's functionals need a few frames).
    sr : int
        Sample rate in Hz.
    kind : ``egemaps`` (eGeMAPSv02, 88 values) or ``compare`` (ComParE_2016, 6373)

    Returns
    -------
    np.ndarray, float32, shape (KINDS[kind].dim,)

    Raises
    ------
    Tile2AudioError
        When TensorFlow is loaded in this process (see the module docstring), or for
        an empty or non-finite signal.
    """
    from .audio import loop_pad

    if kind not in _SMILE_SETS:
        raise Tile2AudioError(f"unknown openSMILE baseline {kind!r}; known: {', '.join(_SMILE_SETS)}")
    if "tensorflow" in sys.modules:
        raise Tile2AudioError("openSMILE must not run in a process that has imported TensorFlow; "
                              "use opensmile_matrix, which runs it in worker processes")
    y = np.asarray(y, dtype=np.float32)
    if y.ndim != 1 or y.size == 0:
        raise Tile2AudioError(f"openSMILE needs a non-empty mono signal, got shape {y.shape}")
    if not np.isfinite(y).all():
        raise Tile2AudioError("openSMILE: the signal has NaN or inf samples")
    if kind not in _smiles:
        import opensmile

        _smiles[kind] = opensmile.Smile(feature_set=getattr(opensmile.FeatureSet, _SMILE_SETS[kind]),
                                        feature_level=opensmile.FeatureLevel.Functionals)
    row = _smiles[kind].process_signal(loop_pad(y, int(0.5 * sr)), sr).to_numpy(dtype=np.float32)[0]
    if row.shape != (KINDS[kind].dim,):
        raise Tile2AudioError(f"openSMILE {_SMILE_SETS[kind]} gave {row.shape[0]} values, expected {KINDS[kind].dim}")
    return row


class _TensorFlowInWorker(RuntimeError):
    """A worker process has TensorFlow loaded (its parent's main script imports it)."""


def _smile_row(path: str, sample_rate: int, kind: str, max_seconds: float | None = None) -> tuple[np.ndarray | None, str]:
    """openSMILE functionals of one file, or (None, reason); runs in a worker process."""
    if "tensorflow" in sys.modules:  # stops the whole extraction, not one clip (see _fill)
        raise _TensorFlowInWorker(f"worker {os.getpid()} has imported TensorFlow")
    try:
        return opensmile_functionals(_decode(path, sample_rate, max_seconds), sample_rate, kind), ""
    except Tile2AudioError as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a library error in one file must not stop the rest
        return None, f"{path}: {type(exc).__name__}: {exc}"


def opensmile_matrix(
    paths: Sequence[str | os.PathLike],
    clip_ids: Sequence[str],
    kind: str = "egemaps",
    cache_file: str | os.PathLike | None = None,
    sample_rate: int = 22050,
    jobs: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """openSMILE functionals of many files, in worker processes, cached.

    Safe to call from a process that has imported TensorFlow: openSMILE runs only in
    spawned workers that import neither TensorFlow nor Keras.

    Parameters
    ----------
    kind : ``egemaps`` or ``compare``
    paths, clip_ids, cache_file, sample_rate, jobs, progress : see :func:`mfcc_matrix`

    Returns
    -------
    np.ndarray, float32, shape (n_clips, 88) for egemaps, (n_clips, 6373) for compare
    """
    if kind not in _SMILE_SETS:
        raise Tile2AudioError(f"unknown openSMILE baseline {kind!r}; known: {', '.join(_SMILE_SETS)}")
    return baseline_matrix(kind, paths, clip_ids, cache_file, sample_rate, jobs, progress)
