"""Log-mel features and the sharded, resumable on-disk cache that training reads.

Layout of a cache directory (see ``docs/architecture.md``)::

    params.json     feature parameters, per-band statistics, build fingerprint
    index.csv       one row per cached clip: where its frames are and its metadata
    failures.csv    clips skipped (or kept with a warning) and why
    shards/*.npy    float16 (rows, n_mels) raw log-mel of consecutive clips
    chunks/         one JSON record per finished work unit, for resuming

The work unit is a chunk of consecutive manifest rows. A chunk writes its shard(s) and
then its record, every file atomically, so a build killed at any moment and started
again redoes only unfinished chunks and ends byte-identical to an uninterrupted build.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import librosa
import numpy as np
import pandas as pd
from joblib import Parallel, delayed
from threadpoolctl import ThreadpoolController
from tqdm.auto import tqdm

from . import atomic
from .audio import TruncatedAudioWarning, is_silent, load_audio, loop_pad
from .config import FeatureParams, to_dict
from .datasets.schema import MANIFEST_COLUMNS, fold_column, validate_manifest
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
INDEX_COLUMNS = [
    "clip_id", "shard", "offset", "n_frames", "duration_s", "min", "max",
    "label", "split", "fold", "group", "path", "root", "note",
]
FAILURE_COLUMNS = ["path", "clip_id", "reason", "action"]
#: Floor of a band's standard deviation under ``standardize`` (a constant band stays finite).
STD_FLOOR = 1e-3
#: Floor of a clip's max - min under ``minmax`` (a constant clip stays finite).
MIN_SCALE = 1e-6
_SILENCE_DB = -80.0
_MAX_OPEN_SHARDS = 64
_LOCK_NAME = ".lock"


# --------------------------------------------------------------------------- features


def log_mel(y: np.ndarray, params: FeatureParams) -> np.ndarray:
    """Log-mel spectrogram of a mono signal, time first.

    The same as ``librosa.feature.melspectrogram`` (power 2, Hann window, centred frames,
    Slaney mel filters) with ``params`` n_fft, hop_length, win_length, n_mels, fmin and
    fmax, then ``power_to_db(ref=1.0, top_db)`` (``log='db'``) or ``log(S + log_eps)``
    (``log='log'``). Not normalised. The mel filter bank is cached and the projection runs
    on one BLAS thread (much faster than a threaded BLAS for matrices this small).

    Parameters
    ----------
    y : np.ndarray
        float32, shape (n_samples,), at ``params.sample_rate``.
    params : FeatureParams

    Returns
    -------
    np.ndarray
        float32, shape (n_frames, n_mels), n_frames = 1 + n_samples // hop_length.
    """
    with warnings.catch_warnings():
        # librosa warns when a (skip-policy) short clip is below n_fft; centre padding copes.
        warnings.simplefilter("ignore", UserWarning)
        spec = librosa.stft(np.asarray(y, dtype=np.float32), n_fft=params.n_fft, hop_length=params.hop_length,
                            win_length=params.win_length, window="hann", center=True, pad_mode="constant")
    power = spec.real**2 + spec.imag**2
    basis = mel_basis(params)
    with _blas().limit(limits=1, user_api="blas"):
        mel = basis @ power
    if params.log == "db":
        out = librosa.power_to_db(mel, ref=1.0, top_db=params.top_db)
    else:
        out = np.log(mel + params.log_eps)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def mel_basis(params: FeatureParams) -> np.ndarray:
    """The mel filter bank of :func:`log_mel`: the front end's one definition of it.

    :func:`log_mel` projects the power spectrogram on it, and the exported model
    (:mod:`tile2audio.export`) stores it as a constant of its graph.

    Parameters
    ----------
    params : FeatureParams
        ``sample_rate``, ``n_fft``, ``n_mels``, ``fmin`` and ``fmax`` are used.

    Returns
    -------
    np.ndarray
        float32, shape (n_mels, 1 + n_fft // 2): ``librosa.filters.mel`` (Slaney). Cached:
        do not modify it in place.

    Raises
    ------
    Tile2AudioError
        When a band of the filter bank is empty (``n_fft`` too small for ``n_mels``).
    """
    return _mel_basis(params.sample_rate, params.n_fft, params.n_mels, params.fmin, params.fmax)


def stft_window(params: FeatureParams) -> np.ndarray:
    """The analysis window :func:`log_mel`'s ``librosa.stft(window="hann")`` applies to each frame.

    Parameters
    ----------
    params : FeatureParams
        ``n_fft`` and ``win_length`` are used.

    Returns
    -------
    np.ndarray
        float32, shape (n_fft,): a periodic Hann window of ``win_length`` samples (default
        ``n_fft``), zero-padded on both sides to ``n_fft`` (``librosa.util.pad_center``),
        as librosa builds it.
    """
    win = librosa.filters.get_window("hann", params.win_length or params.n_fft, fftbins=True)
    return librosa.util.pad_center(win, size=params.n_fft).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float | None) -> np.ndarray:
    """librosa's Slaney mel filter bank, float32 (n_mels, 1 + n_fft // 2), computed once; raise for empty bands."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # librosa's "Empty filters detected": we raise instead
        basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax).astype(np.float32)
    empty = int(np.count_nonzero(basis.max(axis=1) <= 0))
    if empty:
        # An empty band is a constant (-100 dB) feature in every frame of every clip.
        raise Tile2AudioError(
            f"features: {empty} of the {n_mels} mel bands are empty with n_fft={n_fft} at "
            f"sample_rate={sr} between fmin={fmin:g} and fmax={fmax if fmax is not None else sr / 2:g} Hz; "
            "raise features.n_fft, lower features.n_mels or widen fmin..fmax"
        )
    return basis


def check_params(params: FeatureParams) -> None:
    """Raise Tile2AudioError when ``params`` give a mel filter bank with empty bands.

    The other checks (frequency range, window, top_db) run when FeatureParams is made;
    this one needs librosa, so the feature stages call it once before the first clip.
    """
    mel_basis(params)


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """One controller for the process (scanning the loaded libraries takes a millisecond)."""
    return ThreadpoolController()


def normalize_frames(
    frames: np.ndarray,
    params: FeatureParams,
    stats: dict | None = None,
    min_max: tuple[float, float] | None = None,
) -> np.ndarray:
    """Normalise raw log-mel frames the way the cache does on read (``params.normalize``).

    Parameters
    ----------
    frames : np.ndarray
        Raw log-mel, shape (n_frames, n_mels).
    params : FeatureParams
        ``normalize`` picks the mode: ``none``; ``minmax`` (per clip to [0, 1]);
        ``standardize`` ((x - mean) / std per band, std floored at 1e-3).
    stats : dict, optional
        ``mean`` and ``std`` of shape (n_mels,) (a cache's ``stats`` or a run's
        ``features.json`` stats); required for ``standardize``.
    min_max : (float, float), optional
        The clip's raw minimum and maximum for ``minmax``; default those of ``frames``.

    Returns
    -------
    np.ndarray
        float32, shape (n_frames, n_mels).
    """
    x = np.asarray(frames, dtype=np.float32)
    if params.normalize == "none":
        return x
    if params.normalize == "minmax":
        lo, hi = (float(x.min()), float(x.max())) if min_max is None else (float(min_max[0]), float(min_max[1]))
        return (x - np.float32(lo)) / np.float32(max(hi - lo, MIN_SCALE))
    if not stats or "mean" not in stats or "std" not in stats:
        raise Tile2AudioError("normalize='standardize' needs the per-band mean and std of the training cache")
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.asarray(stats["std"], dtype=np.float32)
    if mean.shape != (x.shape[-1],) or std.shape != (x.shape[-1],):
        raise Tile2AudioError(f"standardize statistics have {mean.shape[0]} bands, the frames {x.shape[-1]}")
    return (x - mean) / np.maximum(std, np.float32(STD_FLOOR))


@dataclass
class _ClipResult:
    """Outcome of one clip: frames (None when skipped), original duration, note, issue."""

    frames: np.ndarray | None
    duration_s: float
    note: str = ""
    issue: str = ""
    action: str = ""


def _analyse_clip(path: Path, params: FeatureParams) -> _ClipResult:
    """Load, check and featurise one clip; raise Tile2AudioError when it is unusable."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TruncatedAudioWarning)
        y = load_audio(path, params.sample_rate, params.channel, truncated="keep")
    if params.max_seconds is not None:
        y = y[: max(1, int(round(params.max_seconds * params.sample_rate)))]
    duration = y.shape[0] / params.sample_rate
    notes: list[str] = []
    issues: list[str] = []
    for w in caught:
        if not issubclass(w.category, TruncatedAudioWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        # "truncated: the header declares ..." (the reason column starts with `truncated`)
        issue = _strip_path(str(w.message), str(path)).replace("; kept the decoded part", "")
        if params.truncated_policy == "skip":
            return _ClipResult(None, duration, "", issue, "skipped")
        issues.append(issue + ", kept the decoded part")
        notes.append("truncated")
    if is_silent(y, _SILENCE_DB):
        issues.append(f"silent (peak below {_SILENCE_DB:.0f} dBFS)")
        if params.silent_policy == "skip":
            return _ClipResult(None, duration, "", issues[0], "skipped")
        notes.append("silent")
    min_samples = int(round(params.min_seconds * params.sample_rate))
    if y.shape[0] < min_samples:
        issue = f"shorter than min_seconds ({duration:.2f} s < {params.min_seconds:.2f} s)"
        if params.short_policy == "skip":
            return _ClipResult(None, duration, "", "; ".join(issues + [issue]), "skipped")
        issues.append(issue + ", looped")
        notes.append(f"padded from {duration:.2f} s")
        y = loop_pad(y, min_samples)
    frames = log_mel(y, params)
    return _ClipResult(frames, duration, "; ".join(notes), "; ".join(issues), "kept" if issues else "")


def extract_clip(path: str | os.PathLike, params: FeatureParams = FeatureParams()) -> tuple[np.ndarray, str]:
    """Log-mel frames of one audio file, with the same checks as :func:`build_cache`.

    Parameters
    ----------
    path : str or os.PathLike
        Audio file.
    params : FeatureParams
        Feature parameters (use the cache's or the run's for embedding).

    Returns
    -------
    frames : np.ndarray
        float32, shape (n_frames, n_mels), raw (un-normalised) log-mel.
    note : str
        ``""``, ``"silent"``, ``"padded from 0.10 s"`` (or both, ``"; "``-joined).

    Raises
    ------
    Tile2AudioError
        When the file cannot be used (missing, corrupt, NaN samples, ...) or the
        silent/short policy says ``skip``.
    """
    path = Path(path)
    result = _analyse_clip(path, params)
    if result.action == "skipped":
        raise Tile2AudioError(f"{path}: skipped: {result.issue}")
    if result.issue:
        log.warning("%s: %s", path, result.issue)
    return result.frames, result.note


# --------------------------------------------------------------------------- manifest


def _normalise_manifest(df: pd.DataFrame) -> pd.DataFrame:
    """The schema columns of a manifest table (:func:`~tile2audio.datasets.schema.validate_manifest`; only
    ``clip_id`` and ``path`` are required, absent schema columns are empty)."""
    if len(df) == 0:
        raise Tile2AudioError("manifest has no rows")
    return validate_manifest(df, required=("clip_id", "path"))[list(MANIFEST_COLUMNS)]


def _read_manifest_csv(path: Path) -> pd.DataFrame:
    """Read and validate a manifest CSV (schema dtypes) with :mod:`tile2audio.datasets`."""
    from .datasets import read_manifest

    return read_manifest(path)


def _load_manifest(manifest: pd.DataFrame | str | os.PathLike, root: str | os.PathLike | None) -> pd.DataFrame:
    """The manifest with the effective root of every row and the resolved audio path."""
    df = manifest if isinstance(manifest, pd.DataFrame) else _read_manifest_csv(Path(manifest))
    df = _normalise_manifest(df)
    if root is not None:
        df["root"] = str(Path(root).expanduser().absolute())
    # absolute, so worker processes started from another working directory find the files
    df["_file"] = [str((Path(r) / p if r else Path(p)).absolute()) for r, p in zip(df["root"], df["path"])]
    return df


def _fingerprint(df: pd.DataFrame, params: FeatureParams, chunk_clips: int, max_shard_mb: float) -> str:
    """Hash of what determines the cache's bytes: manifest content, parameters, layout."""
    h = hashlib.sha256()
    h.update(df[list(MANIFEST_COLUMNS)].to_csv(index=False).encode("utf-8"))
    meta = {"version": CACHE_VERSION, "params": to_dict(params), "chunk_clips": chunk_clips,
            "max_shard_mb": max_shard_mb}
    h.update(json.dumps(meta, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


# --------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class _ChunkTask:
    """Everything a worker needs to build one chunk (picklable)."""

    index: int
    rows: tuple[tuple[int, str, str, str], ...]  # (manifest row, clip_id, path, file)
    out_dir: str
    params: dict
    max_shard_bytes: int


def _chunk_record_path(out_dir: Path, index: int) -> Path:
    """Where chunk ``index`` records that it is done."""
    return out_dir / "chunks" / f"chunk-{index:05d}.json"


def _run_chunk(task: _ChunkTask, on_clip: Callable[[], None] | None = None) -> dict:
    """Featurise one chunk, write its shard(s), then its record; return the record."""
    params = FeatureParams(**task.params)
    out_dir = Path(task.out_dir)
    kept: list[tuple[int, str, _ClipResult]] = []
    failures: list[dict] = []
    for row, clip_id, rel_path, file in task.rows:
        try:
            result = _analyse_clip(Path(file), params)
        except Tile2AudioError as exc:
            result = _ClipResult(None, 0.0, "", _strip_path(str(exc), file), "skipped")
        except Exception as exc:  # a library bug on one file must not lose the other clips
            result = _ClipResult(None, 0.0, "", f"unexpected {type(exc).__name__}: {exc}", "skipped")
        if result.action:
            failures.append({"path": rel_path, "clip_id": clip_id, "reason": result.issue, "action": result.action})
        if result.frames is not None:
            kept.append((row, clip_id, result))
        if on_clip is not None:
            on_clip()
    try:
        rows, band_sum, band_sumsq, count = _write_shards(kept, task, out_dir, params.n_mels)
        record = {"chunk": task.index, "rows": rows, "failures": failures,
                  "sum": band_sum, "sumsq": band_sumsq, "count": count}
        atomic.write_json(_chunk_record_path(out_dir, task.index), record)
    except OSError as exc:  # a full disk or a lost mount: finished chunks stay, rerun to resume
        raise _write_error(out_dir, exc) from exc
    return record


def _write_error(out_dir: Path, exc: OSError) -> Tile2AudioError:
    """A one-line error for a failed cache write (the file and the OS reason)."""
    where = exc.filename or out_dir
    return Tile2AudioError(f"{where}: cannot write the feature cache: {exc.strerror or exc}; "
                           "finished chunks are kept, free space and run again to resume")


def _strip_path(message: str, file: str) -> str:
    """Drop the leading '<path>: ' that audio errors carry (failures.csv has a path column)."""
    prefix = f"{file}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _write_shards(kept: list, task: _ChunkTask, out_dir: Path, n_mels: int) -> tuple[list, list, list, int]:
    """Write a chunk's clips as float16 shard parts no larger than the limit (one clip per part at least)."""
    parts: list[list] = [[]]
    part_bytes = 0
    for item in kept:
        nbytes = item[2].frames.shape[0] * n_mels * 2
        if parts[-1] and part_bytes + nbytes > task.max_shard_bytes:
            parts.append([])
            part_bytes = 0
        parts[-1].append(item)
        part_bytes += nbytes
    rows: list[dict] = []
    band_sum = np.zeros(n_mels, dtype=np.float64)
    band_sumsq = np.zeros(n_mels, dtype=np.float64)
    count = 0
    for p, items in enumerate(p for p in parts if p):
        name = f"c{task.index:05d}-{p:02d}"
        block = np.concatenate([r.frames for _, _, r in items], axis=0).astype(np.float16)
        atomic.save_npy(out_dir / "shards" / f"{name}.npy", block)
        wide = block.astype(np.float64)
        band_sum += wide.sum(axis=0)
        band_sumsq += np.square(wide).sum(axis=0)
        count += block.shape[0]
        offset = 0
        for row, clip_id, r in items:
            stored = block[offset:offset + r.frames.shape[0]]
            rows.append({"row": row, "clip_id": clip_id, "shard": name, "offset": offset,
                         "n_frames": int(r.frames.shape[0]), "duration_s": round(r.duration_s, 6),
                         "min": float(stored.min()), "max": float(stored.max()), "note": r.note})
            offset += r.frames.shape[0]
    return rows, band_sum.tolist(), band_sumsq.tolist(), count


def _read_record(out_dir: Path, index: int) -> dict | None:
    """A finished chunk's record, or None when the chunk still has to run."""
    path = _chunk_record_path(out_dir, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # cannot happen with atomic writes, but redoing the chunk is always safe
    return record if record.get("chunk") == index else None


def _run_chunks(tasks: list[_ChunkTask], jobs: int, bar: tqdm) -> Iterable[dict]:
    """Run tasks in-process (jobs=1) or on worker processes; yield records as chunks finish.

    Workers come from joblib's loky backend, which starts each one as a fresh interpreter
    (fork + exec) rather than a plain ``fork``: forking copies the parent's locks but not
    its threads, so with TensorFlow (or a BLAS pool, or a tqdm monitor thread) alive in
    the parent a forked child can block forever on a lock held at fork time. Unlike the
    stdlib 'spawn'/'forkserver' contexts, loky does not re-run the caller's ``__main__``
    (no ``if __name__ == "__main__"`` guard needed, works from stdin and notebooks), and it
    caps BLAS/OpenMP threads per worker so jobs x threads does not oversubscribe the cores.
    """
    if jobs == 1 or len(tasks) == 1:
        for task in tasks:
            yield _run_chunk(task, on_clip=lambda: bar.update(1))
        return
    sizes = {t.index: len(t.rows) for t in tasks}
    parallel = Parallel(n_jobs=min(jobs, len(tasks)), backend="loky", return_as="generator_unordered")
    for record in parallel(delayed(_run_chunk)(t) for t in tasks):
        bar.update(sizes[record["chunk"]])
        yield record


# --------------------------------------------------------------------------- build


def build_cache(
    manifest: pd.DataFrame | str | os.PathLike,
    out_dir: str | os.PathLike,
    params: FeatureParams = FeatureParams(),
    root: str | os.PathLike | None = None,
    jobs: int | None = None,
    chunk_clips: int = 32,
    max_shard_mb: float = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> "FeatureCache":
    """Compute the log-mel cache of every clip of a manifest (resumable, parallel).

    Parameters
    ----------
    manifest : DataFrame or path
        Manifest table or CSV (columns clip_id, path, root, label, split, fold, group).
    out_dir : path
        Cache directory; created if needed.
    params : FeatureParams
        Feature parameters; saved in ``params.json``.
    root : path, optional
        Data root that ``path`` is relative to; default each row's ``root`` column.
    jobs : int, optional
        Worker processes (default ``os.cpu_count()``); 1 runs in this process.
    chunk_clips : int
        Consecutive manifest rows per work unit (and per shard).
    max_shard_mb : float
        A chunk's shard is split into parts above this size (float16 MB).
    progress : bool
        Show a tqdm bar over clips.
    overwrite : bool
        Replace a cache built from another manifest or with other parameters.

    Returns
    -------
    FeatureCache
        The finished cache.

    Raises
    ------
    Tile2AudioError
        Bad manifest or arguments, an existing cache with another fingerprint (without
        ``overwrite``), or no clip at all could be cached. Unusable clips do not raise:
        they are listed in ``failures.csv``.
    """
    jobs = (os.cpu_count() or 1) if jobs is None else int(jobs)
    if jobs < 1 or chunk_clips < 1 or max_shard_mb <= 0:
        raise Tile2AudioError("build_cache: jobs and chunk_clips must be >= 1 and max_shard_mb > 0")
    df = _load_manifest(manifest, root)
    check_params(params)
    out_dir = atomic.ensure_dir(out_dir, "feature cache folder")
    fingerprint = _fingerprint(df, params, chunk_clips, max_shard_mb)
    with _cache_lock(out_dir):
        return _build_locked(df, out_dir, params, fingerprint, jobs, chunk_clips, max_shard_mb, progress,
                             overwrite)


@contextmanager
def _cache_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out_dir/.lock`` (a second builder fails at once)."""
    path = out_dir / _LOCK_NAME
    try:
        fh = open(path, "a+b")
    except OSError as exc:
        raise Tile2AudioError(f"{path}: cannot create the cache lock file: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise Tile2AudioError(f"{path}: cannot lock the cache: {exc.strerror or exc}") from exc
            raise Tile2AudioError(
                f"{out_dir}: another process is writing this cache (it holds {path}); "
                "wait for it to finish or use another output folder"
            ) from None
        yield  # the lock goes with the file descriptor, also when the process is killed
    finally:
        fh.close()


def _build_locked(df: pd.DataFrame, out_dir: Path, params: FeatureParams, fingerprint: str, jobs: int,
                  chunk_clips: int, max_shard_mb: float, progress: bool, overwrite: bool) -> "FeatureCache":
    """The body of :func:`build_cache`, run while holding the cache lock."""
    try:
        if _prepare_dir(out_dir, fingerprint, overwrite):
            return open_cache(out_dir)
    except OSError as exc:
        raise _write_error(out_dir, exc) from exc
    tasks = _make_tasks(df, out_dir, params, chunk_clips, int(max_shard_mb * 2**20))
    todo = [t for t in tasks if _read_record(out_dir, t.index) is None]
    done_clips = sum(len(t.rows) for t in tasks) - sum(len(t.rows) for t in todo)
    if done_clips:
        log.info("resuming %s: %d of %d chunks already done", out_dir, len(tasks) - len(todo), len(tasks))
    with tqdm(total=len(df), initial=done_clips, desc="log-mel", unit="clip", disable=not progress) as bar:
        for record in _run_chunks(todo, jobs, bar):
            _log_failures(record["failures"])
    records = [_read_record(out_dir, t.index) for t in tasks]
    if any(r is None for r in records):  # pragma: no cover - every chunk just wrote its record
        raise Tile2AudioError(f"{out_dir}: some chunk records are missing after the build; run again")
    try:
        _merge(records, df, out_dir, params, fingerprint)
    except OSError as exc:
        raise _write_error(out_dir, exc) from exc
    return open_cache(out_dir)


def _make_tasks(df: pd.DataFrame, out_dir: Path, params: FeatureParams, chunk_clips: int,
                max_shard_bytes: int) -> list[_ChunkTask]:
    """Split the manifest into chunks of consecutive rows."""
    rows = list(zip(range(len(df)), df["clip_id"], df["path"], df["_file"]))
    return [
        _ChunkTask(i // chunk_clips, tuple(rows[i:i + chunk_clips]), str(out_dir), to_dict(params), max_shard_bytes)
        for i in range(0, len(rows), chunk_clips)
    ]


def _prepare_dir(out_dir: Path, fingerprint: str, overwrite: bool) -> bool:
    """Check or claim ``out_dir`` for this fingerprint; True when the cache is already complete."""
    fp_path = out_dir / "chunks" / "fingerprint.json"
    existing = _existing_fingerprint(out_dir, fp_path)
    if existing is not None and existing != fingerprint:
        if not overwrite:
            raise Tile2AudioError(
                f"{out_dir} holds a cache built from another manifest or with other feature "
                "parameters; choose another directory or pass overwrite=True (--overwrite)"
            )
        _clear_cache(out_dir)
        existing = None
    elif existing == fingerprint and (out_dir / "params.json").is_file() and (out_dir / "index.csv").is_file():
        return True
    for sub in ("shards", "chunks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
        for stale in (out_dir / sub).glob(".*.tmp"):  # left by a killed atomic write
            stale.unlink(missing_ok=True)
    if existing is None:
        atomic.write_json(fp_path, {"fingerprint": fingerprint})
    return False


def _existing_fingerprint(out_dir: Path, fp_path: Path) -> str | None:
    """The fingerprint an existing cache directory was built with ("" if unknown), or None."""
    for path in (fp_path, out_dir / "params.json"):
        if path.is_file():
            try:
                return str(json.loads(path.read_text(encoding="utf-8")).get("fingerprint", ""))
            except (OSError, json.JSONDecodeError, AttributeError):
                return ""
    if (out_dir / "index.csv").exists() or (out_dir / "shards").is_dir():
        return ""
    return None


def _clear_cache(out_dir: Path) -> None:
    """Remove the files a cache consists of (and nothing else in the folder)."""
    for name in ("params.json", "index.csv", "failures.csv"):
        (out_dir / name).unlink(missing_ok=True)
    for sub, pattern in (("shards", "*.npy"), ("chunks", "*.json")):
        for f in (out_dir / sub).glob(pattern) if (out_dir / sub).is_dir() else ():
            f.unlink()


def _log_failures(failures: Sequence[dict]) -> None:
    """Log each skipped or kept-with-warning clip of a finished chunk."""
    for f in failures:
        log.warning("%s (%s): %s [%s]", f["path"], f["clip_id"], f["reason"], f["action"])


def _merge(records: list[dict], df: pd.DataFrame, out_dir: Path, params: FeatureParams, fingerprint: str) -> None:
    """Write index.csv, failures.csv and params.json from the chunk records, in chunk order."""
    rows = [r for rec in records for r in rec["rows"]]
    failures = pd.DataFrame([f for rec in records for f in rec["failures"]], columns=FAILURE_COLUMNS)
    atomic.write_csv(out_dir / "failures.csv", failures)
    if not rows:
        raise Tile2AudioError(
            f"no clip could be cached ({len(df)} in the manifest); see {out_dir / 'failures.csv'}"
        )
    index = pd.DataFrame(rows)
    meta = df.iloc[index["row"].to_numpy()].reset_index(drop=True)
    for col in ("label", "split", "fold", "group", "path", "root"):
        index[col] = meta[col].to_numpy() if col != "fold" else meta[col].array
    atomic.write_csv(out_dir / "index.csv", index[INDEX_COLUMNS])
    count = int(sum(rec["count"] for rec in records))
    total = np.sum([rec["sum"] for rec in records], axis=0)
    total_sq = np.sum([rec["sumsq"] for rec in records], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    atomic.write_json(out_dir / "params.json", {
        "version": CACHE_VERSION, "params": to_dict(params),
        "stats": {"mean": mean.tolist(), "std": std.tolist(), "n_frames": count},
        "fingerprint": fingerprint,
    })


# --------------------------------------------------------------------------- reading


class FeatureCache:
    """Read access to a finished log-mel cache (see :func:`open_cache`).

    Attributes
    ----------
    path : pathlib.Path
    params : FeatureParams
    stats : dict
        ``mean`` and ``std`` float32 (n_mels,), ``n_frames`` int.
    index : pandas.DataFrame
        One row per cached clip (columns ``INDEX_COLUMNS``); row numbers are clip numbers.
    failures : pandas.DataFrame
        path, clip_id, reason, action.
    frames_per_second : float
    n_mels : int
    shards : list of str
        Shard names, in cache order (files ``shards/<name>.npy``).
    """

    def __init__(self, path: Path, meta: dict, index: pd.DataFrame, failures: pd.DataFrame) -> None:
        self.path = path
        self.params = _params_from_dict(meta.get("params"), path)
        stats = meta.get("stats") or {}
        self.stats = {
            "mean": np.asarray(stats.get("mean", []), dtype=np.float32),
            "std": np.asarray(stats.get("std", []), dtype=np.float32),
            "n_frames": int(stats.get("n_frames", 0)),
        }
        self.index = index
        self.failures = failures
        self.frames_per_second = self.params.frames_per_second
        self.n_mels = self.params.n_mels
        self.shards = list(dict.fromkeys(index["shard"]))
        # Frames per shard, summed once: the sampler asks for every shard's size.
        self._shard_frames = {k: int(n) for k, n in index.groupby("shard", sort=False)["n_frames"].sum().items()}
        self._row = {cid: i for i, cid in enumerate(index["clip_id"])}
        self._shard_col = index["shard"].to_numpy()
        self._offset = index["offset"].to_numpy(dtype=np.int64)
        self._length = index["n_frames"].to_numpy(dtype=np.int64)
        self._min = index["min"].to_numpy(dtype=np.float32)
        self._max = index["max"].to_numpy(dtype=np.float32)
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.path)!r}, clips={len(self)}, n_mels={self.n_mels})"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = OrderedDict()  # memory maps are reopened lazily after unpickling
        return state

    def row(self, clip_id: str) -> int:
        """Row number of ``clip_id`` in :attr:`index`; Tile2AudioError if unknown."""
        try:
            return self._row[clip_id]
        except KeyError:
            raise Tile2AudioError(f"clip_id {clip_id!r} is not in the cache {self.path}") from None

    def frames(self, clip_id: str, raw: bool = False) -> np.ndarray:
        """Log-mel frames of one clip, read through a memory map.

        Parameters
        ----------
        clip_id : str
        raw : bool
            Skip the normalisation given by ``params.normalize``.

        Returns
        -------
        np.ndarray
            float32, shape (n_frames, n_mels).
        """
        return self._read(self.row(clip_id), raw)

    def frames_block(self, clip_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Normalised frames of several clips, concatenated in the given order.

        Parameters
        ----------
        clip_ids : sequence of str

        Returns
        -------
        frames : np.ndarray
            float32, shape (sum of n_frames, n_mels).
        offsets : np.ndarray
            int64, shape (n,): first row of each clip in ``frames``.
        lengths : np.ndarray
            int64, shape (n,): n_frames of each clip.
        """
        rows = np.array([self.row(c) for c in clip_ids], dtype=np.int64)
        lengths = self._length[rows] if len(rows) else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(rows) else lengths.copy()
        out = np.empty((int(lengths.sum()), self.n_mels), dtype=np.float32)
        for r, start, n in zip(rows, offsets, lengths):
            out[start:start + n] = self._read(int(r), raw=False)
        return out, offsets, lengths.astype(np.int64)

    def shard_nbytes(self, name: str) -> int:
        """Bytes of shard ``name`` as float32 in memory."""
        if name not in self._shard_frames:
            raise Tile2AudioError(f"shard {name!r} is not in the cache {self.path}")
        return self._shard_frames[name] * self.n_mels * 4

    def _read(self, row: int, raw: bool) -> np.ndarray:
        """Frames of index row ``row`` as float32, normalised unless ``raw``."""
        start, n = int(self._offset[row]), int(self._length[row])
        x = np.asarray(self._map(self._shard_col[row])[start:start + n], dtype=np.float32)
        if raw:
            return x
        return normalize_frames(x, self.params, self.stats, min_max=(self._min[row], self._max[row]))

    def _map(self, name: str) -> np.ndarray:
        """Memory map of one shard (a bounded number stay open)."""
        mm = self._maps.get(name)
        if mm is not None:
            self._maps.move_to_end(name)
            return mm
        path = self.path / "shards" / f"{name}.npy"
        try:
            mm = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise Tile2AudioError(f"cache shard {path} is missing or unreadable: {exc}") from exc
        rows = self._shard_frames[name]
        if mm.ndim != 2 or mm.shape[1] != self.n_mels or mm.shape[0] < rows:
            raise Tile2AudioError(
                f"cache shard {path} has shape {mm.shape}, expected ({rows}, {self.n_mels}); rebuild the cache"
            )
        self._maps[name] = mm
        if len(self._maps) > _MAX_OPEN_SHARDS:
            self._maps.popitem(last=False)
        return mm


def _params_from_dict(values: Any, path: Path) -> FeatureParams:
    """FeatureParams from params.json, with a clear error for unknown or bad keys."""
    if not isinstance(values, dict):
        raise Tile2AudioError(f"{path / 'params.json'} has no 'params' mapping; rebuild the cache")
    known = {f.name for f in dataclasses.fields(FeatureParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise Tile2AudioError(f"{path / 'params.json'} has unknown feature parameter(s) {unknown}")
    try:
        return FeatureParams(**values)
    except (TypeError, ValueError) as exc:
        raise Tile2AudioError(f"{path / 'params.json'} has bad feature parameters: {exc}") from exc


def _read_table(path: Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read a cache CSV with text columns as str ("" for missing); raise if malformed."""
    if not path.is_file():
        raise Tile2AudioError(f"{path} is missing; is {path.parent} a finished feature cache?")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise Tile2AudioError(f"{path} is not a readable CSV: {exc}") from exc
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise Tile2AudioError(f"{path} lacks column(s) {missing}; rebuild the cache")
    return df


def _typed_index(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """Convert index.csv's numeric columns; raise for malformed values."""
    try:
        for col in ("offset", "n_frames"):
            df[col] = df[col].astype(np.int64)
        for col in ("duration_s", "min", "max"):
            df[col] = df[col].astype(np.float64)
        df["fold"] = fold_column(df, str(path))
    except (ValueError, TypeError, Tile2AudioError) as exc:
        raise Tile2AudioError(f"{path} has malformed numeric columns: {exc}") from exc
    return df[INDEX_COLUMNS + [c for c in df.columns if c not in INDEX_COLUMNS]]


def open_cache(path: str | os.PathLike) -> FeatureCache:
    """Open a finished log-mel cache directory.

    Parameters
    ----------
    path : str or os.PathLike
        A directory written by :func:`build_cache`.

    Returns
    -------
    FeatureCache

    Raises
    ------
    Tile2AudioError
        Missing directory, missing or malformed ``params.json`` / ``index.csv``, an
        unsupported cache version, or shards named by the index missing on disk.
    """
    path = Path(path)
    if not path.is_dir():
        raise Tile2AudioError(f"feature cache not found: {path} is not a directory")
    meta_path = path / "params.json"
    if not meta_path.is_file():
        raise Tile2AudioError(f"{path} is not a finished feature cache (no params.json); run build_cache")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Tile2AudioError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        raise Tile2AudioError(f"{meta_path}: unsupported cache version; rebuild the cache")
    index = _typed_index(_read_table(path / "index.csv", INDEX_COLUMNS), path / "index.csv")
    failures_path = path / "failures.csv"
    failures = (_read_table(failures_path, FAILURE_COLUMNS) if failures_path.is_file()
                else pd.DataFrame(columns=FAILURE_COLUMNS, dtype=str))
    missing = [s for s in dict.fromkeys(index["shard"]) if not (path / "shards" / f"{s}.npy").is_file()]
    if missing:
        raise Tile2AudioError(f"{path}: shard file(s) missing: {', '.join(missing[:5])}; rebuild the cache")
    cache = FeatureCache(path, meta, index, failures)
    if cache.stats["mean"].shape != (cache.n_mels,) or cache.stats["std"].shape != (cache.n_mels,):
        raise Tile2AudioError(f"{meta_path}: stats do not match n_mels={cache.n_mels}; rebuild the cache")
    return cache
