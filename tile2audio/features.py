"""Log-mel features and the sharded, resumable on-disk cache that training reads.

Layout of a cache directory (see ``docs/architecture.md``)::

    params.json     feature parameters, per-band statistics, build and content fingerprints
    index.csv       one row per cached clip: where its frames are, its metadata, its source's
                    size, mtime and content hash
    shards.json     each shard's rows, bytes and blake2b checksum, and its clips' ranges
    failures.csv    clips skipped (or kept with a warning) and why
    shards/*.npy    float16 (rows, n_mels) raw log-mel of consecutive clips
    chunks/         one JSON record per finished work unit, for resuming and repairing

The work unit is a chunk of consecutive manifest rows. A chunk writes its shard(s) and
then its record, every file atomically, so a build killed at any moment and started
again redoes only unfinished chunks and ends byte-identical to an uninterrupted build.
The chunk records are the build's ground truth: a rerun verifies each finished chunk
against its shards' checksums and its sources' sizes and mtimes, redoes what no longer
matches, and rewrites the merged files from the records. :func:`open_cache` checks the
merged files against ``shards.json`` (sizes, clip ranges, shard names inside the cache),
so a damaged cache is one clear error in every later stage, never wrong frames.
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
import re
import signal
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
from .console import show_progress
from .datasets.schema import MANIFEST_COLUMNS, fold_column, validate_manifest
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

CACHE_VERSION = 2
#: Versions :func:`open_cache` reads: 1 predates shards.json and the source columns.
_READABLE_VERSIONS = (1, 2)
# The shards' bytes are made as in version 1, so a version-1 cache keeps its build
# fingerprint: a rerun upgrades it (redoing its chunks) instead of asking for --overwrite.
_SHARD_FORMAT = 1
#: Each cached clip's source file when it was read: bytes, mtime (ns), blake2b of its content.
SOURCE_COLUMNS = ["source_size", "source_mtime_ns", "source_hash"]
_V1_INDEX_COLUMNS = [
    "clip_id", "shard", "offset", "n_frames", "duration_s", "min", "max",
    "label", "split", "fold", "group", "path", "root", "note",
]
INDEX_COLUMNS = _V1_INDEX_COLUMNS + SOURCE_COLUMNS
FAILURE_COLUMNS = ["path", "clip_id", "reason", "action"]
#: Floor of a band's standard deviation under ``standardize`` (a constant band stays finite).
STD_FLOOR = 1e-3
#: Floor of a clip's max - min under ``minmax`` (a constant clip stays finite).
MIN_SCALE = 1e-6
_SILENCE_DB = -80.0
_MAX_OPEN_SHARDS = 64
_LOCK_NAME = ".lock"
# What a shard name may be: a plain file name, so shards/<name>.npy stays inside the cache.
_SHARD_NAME = re.compile(r"[A-Za-z0-9_-]+")
_FAILURE_LINES = 10  # problems logged one per line; the rest as a count


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
    df["_file"] = [os.path.abspath(os.path.join(r, p) if r else p)
                   for r, p in zip(df["root"].tolist(), df["path"].tolist())]
    return df


def _fingerprint(df: pd.DataFrame, params: FeatureParams, chunk_clips: int, max_shard_mb: float) -> str:
    """Hash of what determines the cache's bytes: manifest content, parameters, layout."""
    h = hashlib.sha256()
    h.update(df[list(MANIFEST_COLUMNS)].to_csv(index=False).encode("utf-8"))
    meta = {"version": _SHARD_FORMAT, "params": to_dict(params), "chunk_clips": chunk_clips,
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


def _source_stat(file: str | os.PathLike) -> tuple[int, int]:
    """(size, mtime in ns) of a source file, (-1, -1) when it cannot be stat'ed (missing)."""
    try:
        st = os.stat(file)
    except OSError:
        return -1, -1
    return int(st.st_size), int(st.st_mtime_ns)


def _file_hash(path: str | os.PathLike) -> str:
    """blake2b (128-bit) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run_chunk(task: _ChunkTask, on_clip: Callable[[], None] | None = None) -> dict:
    """Featurise one chunk, write its shard(s), then its record; return the record."""
    params = FeatureParams(**task.params)
    out_dir = Path(task.out_dir)
    kept: list[tuple[int, str, _ClipResult, dict]] = []
    failures: list[dict] = []
    for row, clip_id, rel_path, file in task.rows:
        # Stat before reading: a file changed while it is read differs from the record next time.
        size, mtime = _source_stat(file)
        source = {"source_size": size, "source_mtime_ns": mtime}
        try:
            result = _analyse_clip(Path(file), params)
            if result.frames is not None:
                source["source_hash"] = _file_hash(file)
        except Tile2AudioError as exc:
            result = _ClipResult(None, 0.0, "", _strip_path(str(exc), file), "skipped")
        except OSError as exc:  # the file vanished or became unreadable after decoding
            result = _ClipResult(None, 0.0, "", f"cannot read: {exc.strerror or exc}", "skipped")
        except Exception as exc:  # a library bug on one file must not lose the other clips
            result = _ClipResult(None, 0.0, "", f"unexpected {type(exc).__name__}: {exc}", "skipped")
        if result.action:
            failures.append({"path": rel_path, "clip_id": clip_id, "reason": result.issue, "action": result.action,
                             "source_size": size, "source_mtime_ns": mtime})
        if result.frames is not None:
            kept.append((row, clip_id, result, source))
        if on_clip is not None:
            on_clip()
    try:
        rows, shards, band_sum, band_sumsq, count = _write_shards(kept, task, out_dir, params.n_mels)
        record = {"chunk": task.index, "rows": rows, "failures": failures, "shards": shards,
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


def _write_shards(kept: list, task: _ChunkTask, out_dir: Path,
                  n_mels: int) -> tuple[list, dict, list, list, int]:
    """Write a chunk's clips as float16 shard parts no larger than the limit (one clip per part at least).

    Returns the index rows, the shard table (rows, bytes and blake2b of each written
    file), the per-band sums and sums of squares, and the frame count.
    """
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
    shards: dict[str, dict] = {}
    band_sum = np.zeros(n_mels, dtype=np.float64)
    band_sumsq = np.zeros(n_mels, dtype=np.float64)
    count = 0
    for p, items in enumerate(p for p in parts if p):
        name = f"c{task.index:05d}-{p:02d}"
        block = np.concatenate([r.frames for _, _, r, _ in items], axis=0).astype(np.float16)
        path = out_dir / "shards" / f"{name}.npy"
        atomic.save_npy(path, block)
        # The checksum of the bytes on disk, read back: what a later run verifies.
        shards[name] = {"rows": int(block.shape[0]), "bytes": path.stat().st_size, "blake2b": _file_hash(path)}
        wide = block.astype(np.float64)
        band_sum += wide.sum(axis=0)
        band_sumsq += np.square(wide).sum(axis=0)
        count += block.shape[0]
        offset = 0
        for row, clip_id, r, source in items:
            stored = block[offset:offset + r.frames.shape[0]]
            rows.append({"row": row, "clip_id": clip_id, "shard": name, "offset": offset,
                         "n_frames": int(r.frames.shape[0]), "duration_s": round(r.duration_s, 6),
                         "min": float(stored.min()), "max": float(stored.max()), "note": r.note,
                         "source_size": source["source_size"], "source_mtime_ns": source["source_mtime_ns"],
                         "source_hash": source.get("source_hash", "")})
            offset += r.frames.shape[0]
    return rows, shards, band_sum.tolist(), band_sumsq.tolist(), count


def _read_record(out_dir: Path, index: int) -> dict | None:
    """A finished chunk's record, or None when the chunk still has to run."""
    path = _chunk_record_path(out_dir, index)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # cannot happen with atomic writes, but redoing the chunk is always safe
    ok = (isinstance(record, dict) and record.get("chunk") == index
          and isinstance(record.get("rows"), list) and isinstance(record.get("failures"), list))
    return record if ok else None


def _plain_name(name: Any) -> bool:
    """True for a shard name that is a plain file name inside ``shards/`` (no separator, no dot start)."""
    return isinstance(name, str) and bool(_SHARD_NAME.fullmatch(name))


def _ranges_problem(entries: Iterable[tuple[str, str, int, int]], shard_rows: dict[str, int],
                    exact: bool) -> str | None:
    """What is wrong with clips' (clip_id, shard, offset, n_frames) ranges, or None.

    Each clip once, inside its shard, no two clips overlapping; with ``exact`` the
    clips of a shard also cover it without a gap (what a build writes).
    """
    seen: set[str] = set()
    by_shard: dict[str, list] = {}
    for clip_id, shard, offset, n in entries:
        if clip_id in seen:
            return f"clip {clip_id!r} is listed twice"
        seen.add(clip_id)
        if shard not in shard_rows:
            return f"clip {clip_id!r} points at shard {shard!r}, which the cache does not record"
        if offset < 0 or n < 1 or offset + n > shard_rows[shard]:
            return (f"clip {clip_id!r} points at rows {offset}..{offset + n} of shard {shard}, "
                    f"which has {shard_rows[shard]} rows")
        by_shard.setdefault(shard, []).append((offset, n, clip_id))
    for shard, items in by_shard.items():
        items.sort()
        end, previous = 0, None
        for offset, n, clip_id in items:
            if offset < end:
                return f"clips {previous!r} and {clip_id!r} overlap in shard {shard}"
            if exact and offset > end:
                return f"rows {end}..{offset} of shard {shard} belong to no clip"
            end, previous = offset + n, clip_id
        if exact and end != shard_rows[shard]:
            return f"rows {end}..{shard_rows[shard]} of shard {shard} belong to no clip"
    return None


#: Why a finished chunk is redone, in the order the summary line names them.
_REDO_KINDS = {"damaged": "damaged", "changed": "with changed audio", "retry": "with failed clips whose files changed",
               "old": "made by an older tile2audio without checksums"}


def _record_problem(out_dir: Path, record: dict, task: _ChunkTask) -> tuple[str, str] | None:
    """(kind, detail) when a finished chunk must be redone (:data:`_REDO_KINDS`), else None.

    Checks the chunk's shard files against the sizes and checksums written with them,
    its clips' ranges, and the size and mtime of every source file (kept or failed).
    """
    shards = record.get("shards")
    if not isinstance(shards, dict):
        return "old", f"chunk {task.index}"
    files = {clip_id: file for _, clip_id, _, file in task.rows}
    try:
        listed = [r["clip_id"] for r in record["rows"]] + [f["clip_id"] for f in record["failures"]]
        if set(listed) != set(files):  # a clip kept with a warning is in both lists
            return "damaged", f"chunk {task.index}'s record does not list its manifest rows"
        for name, info in shards.items():
            if not _plain_name(name):
                return "damaged", f"chunk {task.index}'s record names shard {name!r} outside shards/"
            path = out_dir / "shards" / f"{name}.npy"
            size = _source_stat(path)[0]
            if size < 0:
                return "damaged", f"shard {name}.npy is missing"
            if size != info["bytes"]:
                return "damaged", f"shard {name}.npy has {size} bytes, {info['bytes']} were written"
            if _file_hash(path) != info["blake2b"]:
                return "damaged", f"shard {name}.npy does not match its checksum"
        problem = _ranges_problem(((r["clip_id"], r["shard"], int(r["offset"]), int(r["n_frames"]))
                                   for r in record["rows"]), {k: int(v["rows"]) for k, v in shards.items()}, exact=True)
        if problem:
            return "damaged", f"chunk {task.index}'s record: {problem}"
        for r in record["rows"]:
            if _source_stat(files[r["clip_id"]]) != (r.get("source_size"), r.get("source_mtime_ns")):
                return "changed", repr(r["clip_id"])
        for f in record["failures"]:
            if _source_stat(files[f["clip_id"]]) != (f.get("source_size"), f.get("source_mtime_ns")):
                return "retry", f"{f['clip_id']!r}: {f['reason']}"
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return "damaged", f"chunk {task.index}'s record is malformed ({type(exc).__name__}: {exc})"
    return None


def _run_chunks(tasks: list[_ChunkTask], jobs: int, bar: tqdm) -> Iterator[dict]:
    """Run tasks in-process (jobs=1) or on worker processes; yield records as chunks finish.

    Workers come from joblib's loky backend, which starts each one as a fresh interpreter
    (fork + exec) rather than a plain ``fork``: forking copies the parent's locks but not
    its threads, so with TensorFlow (or a BLAS pool, or a tqdm monitor thread) alive in
    the parent a forked child can block forever on a lock held at fork time. Unlike the
    stdlib 'spawn'/'forkserver' contexts, loky does not re-run the caller's ``__main__``
    (no ``if __name__ == "__main__"`` guard needed, works from stdin and notebooks), and it
    caps BLAS/OpenMP threads per worker so jobs x threads does not oversubscribe the cores.
    Closing this generator early (an exception or an interrupt in the caller) closes
    joblib's, which kills the workers: none is left writing into the cache.
    """
    if not tasks:
        return
    if jobs == 1 or len(tasks) == 1:
        for task in tasks:
            yield _run_chunk(task, on_clip=lambda: bar.update(1))
        return
    sizes = {t.index: len(t.rows) for t in tasks}
    parallel = Parallel(n_jobs=min(jobs, len(tasks)), backend="loky", return_as="generator_unordered")
    results = parallel(delayed(_run_chunk)(t) for t in tasks)
    try:
        for record in results:
            bar.update(sizes[record["chunk"]])
            yield record
    finally:
        results.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does.

    The default SIGTERM action ends the process at once: no cleanup runs, the loky
    workers are orphaned and go on writing chunks. Off the main thread (where handlers
    cannot be set) the block runs unchanged.
    """
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back; use the default.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _remove_temporaries(out_dir: Path) -> None:
    """Remove the temporary files a killed atomic write leaves in the cache's folders."""
    for sub in ("shards", "chunks"):
        for stale in (out_dir / sub).glob(".*.tmp") if (out_dir / sub).is_dir() else ():
            stale.unlink(missing_ok=True)


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
    refuse_outside_root: bool = False,
) -> "FeatureCache":
    """Compute the log-mel cache of every clip of a manifest (resumable, parallel, self-checking).

    A rerun on a finished cache checks it instead of trusting it: every shard against
    the size and blake2b checksum written with it, every clip's frame range, and every
    source file's size and mtime. A chunk with a damaged shard or record, a clip whose
    audio changed, or a failed clip whose file changed since (appeared, was replaced) is
    redone, with one line saying why; an edited ``index.csv`` is rewritten from the chunk
    records. Nothing is written when nothing changed.

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
        Show a tqdm bar over clips (on a terminal only).
    overwrite : bool
        Rebuild from scratch: replaces a cache built from another manifest or with other
        parameters, and a damaged one; failed clips are all retried.
    refuse_outside_root : bool
        Raise when a manifest path (``../`` or absolute) lies outside its row's data
        root; by default such paths are read with one warning giving their count.

    Returns
    -------
    FeatureCache
        The finished cache.

    Raises
    ------
    Tile2AudioError
        Bad manifest or arguments, a data root that does not exist, paths outside the
        root with ``refuse_outside_root``, an existing cache with another fingerprint
        (without ``overwrite``), or no clip at all could be cached. Unusable clips do not
        raise: they are listed in ``failures.csv``. Missing files are summarised in one
        warning (count and examples).
    """
    jobs = (os.cpu_count() or 1) if jobs is None else int(jobs)
    if jobs < 1 or chunk_clips < 1 or max_shard_mb <= 0:
        raise Tile2AudioError("build_cache: jobs and chunk_clips must be >= 1 and max_shard_mb > 0")
    df = _load_manifest(manifest, root)
    _check_containment(df, refuse_outside_root)
    missing = _check_sources(df)
    check_params(params)
    out_dir = atomic.ensure_dir(out_dir, "feature cache folder")
    fingerprint = _fingerprint(df, params, chunk_clips, max_shard_mb)
    # SIGTERM (a scheduler's stop, `kill`) is handled as Ctrl-C: workers stopped, temporaries removed.
    with _cache_lock(out_dir), _sigterm_as_interrupt():
        return _build_locked(df, out_dir, params, fingerprint, jobs, chunk_clips, max_shard_mb, progress,
                             overwrite, missing)


def _examples(items: Sequence[str], n: int = 3) -> str:
    """``a, b, c`` or ``a, b, c, ...``: a few items of a long list for a one-line message."""
    return ", ".join(str(x) for x in items[:n]) + (", ..." if len(items) > n else "")


def _check_containment(df: pd.DataFrame, refuse: bool) -> None:
    """Warn once (or raise, with ``refuse``) about manifest paths outside their row's data root."""
    outside = []
    for root, path, file in zip(df["root"].tolist(), df["path"].tolist(), df["_file"].tolist()):
        if not root:
            continue  # no root: the path is the file, there is nothing to stay inside
        base = os.path.normpath(os.path.abspath(root))
        full = os.path.normpath(file)
        if full != base and not full.startswith(base.rstrip(os.sep) + os.sep):
            outside.append(path)
    if not outside:
        return
    if refuse:
        raise Tile2AudioError(
            f"{len(outside)} manifest path(s) lie outside their data root, e.g. {_examples(outside)}; "
            "fix the manifest, or build without refuse_outside_root (--refuse-outside-root)"
        )
    log.warning("features: %d manifest path(s) lie outside their data root (e.g. %s); they are read anyway, "
                "refuse_outside_root=True (--refuse-outside-root) refuses them", len(outside), _examples(outside))


def _check_sources(df: pd.DataFrame) -> set[str]:
    """Raise for a data root that does not exist or when no file exists; warn once about missing files.

    Returns the clip ids of the missing files (the failure log does not repeat them).
    """
    roots = [r for r, p in zip(df["root"].tolist(), df["path"].tolist()) if r and not os.path.isabs(p)]
    gone = [r for r in dict.fromkeys(roots) if not os.path.isdir(r)]
    if gone:
        n = sum(r in set(gone) for r in roots)
        raise Tile2AudioError(
            f"data root {gone[0]} does not exist ({n} clip(s) of the manifest are under "
            f"{'it' if len(gone) == 1 else f'it and {len(gone) - 1} other missing root(s)'}); "
            "pass the right root (--root DIR, build_cache(root=...)) or fix the manifest's root column"
        )
    exists = np.array([os.path.exists(f) for f in df["_file"].tolist()], dtype=bool)
    paths = list(df["path"][~exists])
    if len(paths) == len(df):  # nothing to cache: stop before touching the output folder
        raise Tile2AudioError(
            f"no clip could be cached: none of the {len(df)} audio file(s) of the manifest exist "
            f"(e.g. {_examples(paths)}); check its paths and its data root"
        )
    if paths:
        log.warning("features: %d of %d audio file(s) do not exist (e.g. %s); they are skipped and listed "
                    "in failures.csv", len(paths), len(df), _examples(paths))
    return set(df["clip_id"][~exists])


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
                  chunk_clips: int, max_shard_mb: float, progress: bool, overwrite: bool,
                  missing: set[str]) -> "FeatureCache":
    """The body of :func:`build_cache`, run while holding the cache lock."""
    try:
        _prepare_dir(out_dir, fingerprint, overwrite)
    except OSError as exc:
        raise _write_error(out_dir, exc) from exc
    tasks = _make_tasks(df, out_dir, params, chunk_clips, int(max_shard_mb * 2**20))
    todo, problems, resumed = [], [], 0
    for t in tasks:
        record = _read_record(out_dir, t.index)
        problem = None if record is None else _record_problem(out_dir, record, t)
        if record is None or problem:
            todo.append(t)
        if problem:
            problems.append(problem)
        elif record is not None:
            resumed += 1
    _log_redo(out_dir, problems, len(tasks))
    if resumed and len(todo) > len(problems):
        log.info("resuming %s: %d of %d chunks already done", out_dir, resumed, len(tasks))
    done_clips = sum(len(t.rows) for t in tasks) - sum(len(t.rows) for t in todo)
    failures: list[dict] = []
    chunks = None
    try:
        with tqdm(total=len(df), initial=done_clips, desc="log-mel", unit="clip",
                  disable=not show_progress(progress)) as bar:
            chunks = _run_chunks(todo, jobs, bar)
            for record in chunks:
                failures += record["failures"]
    except KeyboardInterrupt:
        if chunks is not None:
            chunks.close()  # stops the workers before their temporaries are removed
        _remove_temporaries(out_dir)
        raise
    _log_failures(out_dir, failures, missing)
    records = [_read_record(out_dir, t.index) for t in tasks]
    if any(r is None for r in records):  # pragma: no cover - every chunk just wrote its record
        raise Tile2AudioError(f"{out_dir}: some chunk records are missing after the build; run again")
    try:
        rewritten = _merge(records, df, out_dir, params, fingerprint)
    except OSError as exc:
        raise _write_error(out_dir, exc) from exc
    if rewritten and not todo:
        log.warning("%s: %s did not match the chunk records (edited or damaged); rewrote %s from them",
                    out_dir, " and ".join(rewritten), "it" if len(rewritten) == 1 else "them")
    return open_cache(out_dir)


def _log_redo(out_dir: Path, problems: list[tuple[str, str]], n_chunks: int) -> None:
    """One line naming why finished chunks are redone (count per kind, an example of each)."""
    if not problems:
        return
    parts = []
    for kind, label in _REDO_KINDS.items():
        details = [d for k, d in problems if k == kind]
        if details:
            parts.append(f"{len(details)} {label} (e.g. {details[0]})" if kind != "old" else f"{len(details)} {label}")
    log.warning("%s: redoing %d of %d chunk(s): %s", out_dir, len(problems), n_chunks, "; ".join(parts))


def _make_tasks(df: pd.DataFrame, out_dir: Path, params: FeatureParams, chunk_clips: int,
                max_shard_bytes: int) -> list[_ChunkTask]:
    """Split the manifest into chunks of consecutive rows."""
    rows = list(zip(range(len(df)), df["clip_id"], df["path"], df["_file"]))
    return [
        _ChunkTask(i // chunk_clips, tuple(rows[i:i + chunk_clips]), str(out_dir), to_dict(params), max_shard_bytes)
        for i in range(0, len(rows), chunk_clips)
    ]


def _prepare_dir(out_dir: Path, fingerprint: str, overwrite: bool) -> None:
    """Check or claim ``out_dir`` for this fingerprint; with ``overwrite`` clear any cache there first."""
    fp_path = out_dir / "chunks" / "fingerprint.json"
    existing = _existing_fingerprint(out_dir, fp_path)
    if existing is not None and (overwrite or existing != fingerprint):
        if not overwrite:
            raise Tile2AudioError(
                f"{out_dir} holds a cache built from another manifest or with other feature "
                "parameters; choose another directory or pass overwrite=True (--overwrite)"
            )
        log.info("%s: overwrite: rebuilding the cache from scratch", out_dir)
        _clear_cache(out_dir)
        existing = None
    for sub in ("shards", "chunks"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    _remove_temporaries(out_dir)
    if existing is None:
        atomic.write_json(fp_path, {"fingerprint": fingerprint})


def _existing_fingerprint(out_dir: Path, fp_path: Path) -> str | None:
    """The fingerprint an existing cache directory was built with ("" if unknown), or None."""
    for path in (fp_path, out_dir / "params.json"):
        if path.is_file():
            try:
                return str(json.loads(path.read_text(encoding="utf-8")).get("fingerprint", ""))
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                return ""
    if (out_dir / "index.csv").exists() or (out_dir / "shards").is_dir():
        return ""
    return None


def _clear_cache(out_dir: Path) -> None:
    """Remove the files a cache consists of (and nothing else in the folder)."""
    for name in ("params.json", "index.csv", "failures.csv", "shards.json"):
        (out_dir / name).unlink(missing_ok=True)
    for sub, pattern in (("shards", "*.npy"), ("chunks", "*.json")):
        for f in (out_dir / sub).glob(pattern) if (out_dir / sub).is_dir() else ():
            f.unlink()


def _log_failures(out_dir: Path, failures: Sequence[dict], announced: set[str]) -> None:
    """Log the clips this run skipped or kept with a warning: a few lines, then a count.

    Missing files were announced up front in one line and are not repeated.
    """
    rest = [f for f in failures if f["clip_id"] not in announced]
    for f in rest[:_FAILURE_LINES]:
        log.warning("%s (%s): %s [%s]", f["path"], f["clip_id"], f["reason"], f["action"])
    if len(rest) > _FAILURE_LINES:
        log.warning("... and %d more clip(s) skipped or kept with a warning; see %s",
                    len(rest) - _FAILURE_LINES, out_dir / "failures.csv")


def _group_copies(index: pd.DataFrame) -> pd.DataFrame:
    """Put clips with byte-identical source files into one group (warning once).

    Copies are joined with every clip sharing a group with any of them (a union of
    groups), so no probe split can hold a copy on each side. The joined group keeps the
    one group name its clips had, or is named ``a+b`` after several, or
    ``same-audio:<first clip_id>`` when none had one. Returns the index with the new
    ``group`` column.
    """
    hashes = index["source_hash"].astype(str)
    copied = hashes[(hashes != "") & hashes.duplicated(keep=False)]
    if copied.empty:
        return index
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    groups = index["group"].astype(str).to_numpy()
    dup_hashes = set(copied)
    for i, (h, g) in enumerate(zip(hashes, groups)):
        if h in dup_hashes:
            parent[find(("row", i))] = find(("hash", h))
        if g:
            parent[find(("row", i))] = find(("group", g))
    members: dict = {}
    for i in range(len(index)):
        members.setdefault(find(("row", i)), []).append(i)
    touched = {find(("hash", h)) for h in dup_hashes}
    new = groups.copy()
    for comp in touched:
        rows = members[comp]
        names = sorted({groups[i] for i in rows if groups[i]})
        if len(names) == 1:
            new[rows] = names[0]
        else:
            new[rows] = "+".join(names) if names else f"same-audio:{index['clip_id'].iloc[rows[0]]}"
    first = index.groupby(hashes.where(hashes != ""), sort=False)["clip_id"].first()
    pairs = [f"{c!r} = {first[h]!r}" for c, h in zip(index["clip_id"], hashes) if h in dup_hashes and first[h] != c]
    log.warning("features: %d clip(s) have the same audio file content as another clip (e.g. %s); each set of "
                "copies is kept in one group (index.csv `group`) so probe splits never part them",
                len(pairs), _examples(pairs, 2))
    out = index.copy()
    out["group"] = new
    return out


def _merge(records: list[dict], df: pd.DataFrame, out_dir: Path, params: FeatureParams, fingerprint: str) -> list[str]:
    """Write index.csv, failures.csv, shards.json and params.json from the chunk records, in chunk order.

    Only files whose bytes differ from what is on disk are written (a clean rerun
    changes nothing); returns the names of existing files that had to be rewritten.
    Shard files no record names (left by a redone chunk) are removed.
    """
    rows = [r for rec in records for r in rec["rows"]]
    failures = pd.DataFrame([{k: f[k] for k in FAILURE_COLUMNS} for rec in records for f in rec["failures"]],
                            columns=FAILURE_COLUMNS)
    texts = {"failures.csv": failures.to_csv(index=False)}
    if not rows:
        _write_changed(out_dir, texts)
        raise Tile2AudioError(
            f"no clip could be cached ({len(df)} in the manifest); see {out_dir / 'failures.csv'}"
        )
    index = pd.DataFrame(rows)
    meta = df.iloc[index["row"].to_numpy()].reset_index(drop=True)
    for col in ("label", "split", "fold", "group", "path", "root"):
        index[col] = meta[col].to_numpy() if col != "fold" else meta[col].array
    index = _group_copies(index[INDEX_COLUMNS])
    texts["index.csv"] = index.to_csv(index=False)
    shards = {name: {**info, "clips": [[r["clip_id"], r["offset"], r["n_frames"]] for r in rec["rows"]
                                       if r["shard"] == name]}
              for rec in records for name, info in rec["shards"].items()}
    texts["shards.json"] = json.dumps({"version": 1, "shards": shards}, indent=1) + "\n"
    count = int(sum(rec["count"] for rec in records))
    total = np.sum([rec["sum"] for rec in records], axis=0)
    total_sq = np.sum([rec["sumsq"] for rec in records], axis=0)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    content = hashlib.blake2b(digest_size=16)
    for part in (fingerprint, texts["shards.json"],
                 index.drop(columns=["source_size", "source_mtime_ns"]).to_csv(index=False)):
        content.update(part.encode("utf-8"))
    texts["params.json"] = json.dumps({
        "version": CACHE_VERSION, "params": to_dict(params),
        "stats": {"mean": mean.tolist(), "std": std.tolist(), "n_frames": count},
        "fingerprint": fingerprint, "content": content.hexdigest(),
    }, indent=2) + "\n"
    # params.json last: a cache is finished when it is there and matches the rest.
    rewritten = _write_changed(out_dir, texts)
    for f in (out_dir / "shards").glob("*.npy"):
        if f.stem not in shards:
            f.unlink()
    return rewritten


def _write_changed(out_dir: Path, texts: dict[str, str]) -> list[str]:
    """Write each text whose file differs (atomically, in order); names of existing files rewritten."""
    rewritten = []
    for name, text in texts.items():
        path = out_dir / name
        try:
            old = path.read_bytes() if path.is_file() else None
        except OSError:
            old = b""
        if old == text.encode("utf-8"):
            continue
        if old is not None:
            rewritten.append(name)
        atomic.write_text(path, text)
    return rewritten


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
    content_fingerprint : str
        Hash of everything a reader gets from the cache (build fingerprint, shard
        checksums, clip ranges, index metadata and source content hashes; not source
        mtimes): it changes whenever a rebuild changes any frame or clip. Also in
        ``params.json`` (``content``) and so in a run's ``features.json``; keys stored
        embeddings of the cache (``embed_fingerprint.json``). Version-1 caches give their
        build fingerprint.
    """

    def __init__(self, path: Path, meta: dict, index: pd.DataFrame, failures: pd.DataFrame) -> None:
        self.path = path
        self.content_fingerprint = str(meta.get("content") or meta.get("fingerprint") or "")
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
            raise _damaged(self.path, f"shard {name}.npy is missing or unreadable ({exc})") from exc
        rows = self._shard_frames[name]
        if mm.ndim != 2 or mm.shape[1] != self.n_mels or mm.shape[0] < rows:
            raise _damaged(self.path, f"shard {name}.npy has shape {mm.shape}, expected ({rows}, {self.n_mels})")
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
        for col in ("offset", "n_frames", "source_size", "source_mtime_ns"):
            df[col] = df[col].astype(np.int64)
        for col in ("duration_s", "min", "max"):
            df[col] = df[col].astype(np.float64)
        df["fold"] = fold_column(df, str(path))
    except (ValueError, TypeError, Tile2AudioError) as exc:
        raise Tile2AudioError(f"{path} has malformed numeric columns: {exc}") from exc
    return df[INDEX_COLUMNS + [c for c in df.columns if c not in INDEX_COLUMNS]]


def _damaged(path: Path, problem: str) -> Tile2AudioError:
    """The one-line error for a cache that fails its checks: the problem and the fix."""
    return Tile2AudioError(
        f"{path}: the feature cache is damaged: {problem}; rerun the `tile2audio features` command that built "
        "it to repair it (with --overwrite to rebuild it from scratch)"
    )


def _shard_table(path: Path) -> dict | str:
    """``shards.json``'s table {name: {rows, bytes, blake2b, clips}}, or what is wrong with it."""
    file = path / "shards.json"
    try:
        table = json.loads(file.read_text(encoding="utf-8"))["shards"]
        for name, info in table.items():
            info["rows"], info["bytes"], info["blake2b"] = int(info["rows"]), int(info["bytes"]), str(info["blake2b"])
            info["clips"] = [(str(c), int(o), int(n)) for c, o, n in info["clips"]]
    except FileNotFoundError:
        return "shards.json is missing"
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        return f"shards.json is unreadable or malformed ({type(exc).__name__}: {exc})"
    return table


def _cache_problem(path: Path, index: pd.DataFrame, version: int, checksums: bool) -> str | None:
    """What is wrong with a cache's merged files and shards, or None (see :func:`open_cache`)."""
    names = list(dict.fromkeys(index["shard"]))
    outside = [s for s in names if not _plain_name(s)]
    if outside:
        return f"index.csv names shard {outside[0]!r}, which is not a file inside {path / 'shards'} (not read)"
    entries = list(zip(index["clip_id"], index["shard"], index["offset"].tolist(), index["n_frames"].tolist()))
    if version == 1:  # no shards.json: the structure is all there is to check
        missing = [s for s in names if not (path / "shards" / f"{s}.npy").is_file()]
        if missing:
            return f"shard file(s) missing: {_examples(missing)}"
        rows = {}
        for s in names:
            try:
                rows[s] = int(np.load(path / "shards" / f"{s}.npy", mmap_mode="r", allow_pickle=False).shape[0])
            except (OSError, ValueError, IndexError) as exc:
                return f"shard {s}.npy is unreadable ({exc})"
        problem = _ranges_problem(entries, rows, exact=False)
        return f"index.csv: {problem}" if problem else None
    table = _shard_table(path)
    if isinstance(table, str):
        return table
    outside = [s for s in table if not _plain_name(s)]
    if outside:
        return f"shards.json names shard {outside[0]!r}, which is not a file inside {path / 'shards'} (not read)"
    missing = [s for s in table if not (path / "shards" / f"{s}.npy").is_file()]
    if missing:
        return f"shard file(s) missing: {_examples(missing)}"
    for s, info in table.items():
        size = _source_stat(path / "shards" / f"{s}.npy")[0]
        if size != info["bytes"]:
            return f"shard {s}.npy has {size} bytes, {info['bytes']} were written (truncated or replaced)"
    problem = _ranges_problem(entries, {s: info["rows"] for s, info in table.items()}, exact=False)
    if problem:
        return f"index.csv: {problem}"
    recorded = {c: (s, o, n) for s, info in table.items() for c, o, n in info["clips"]}
    listed = {c: (s, int(o), int(n)) for c, s, o, n in entries}
    lost = [c for c in recorded if c not in listed]
    if lost:
        return f"index.csv lacks {len(lost)} clip(s) that shards.json records (e.g. {_examples(lost)})"
    extra = [c for c in listed if c not in recorded]
    if extra:
        return f"index.csv lists {len(extra)} clip(s) that shards.json does not record (e.g. {_examples(extra)})"
    for c, (s, o, n) in listed.items():
        if recorded[c] != (s, o, n):
            rs, ro, rn = recorded[c]
            return (f"index.csv puts clip {c!r} at rows {o}..{o + n} of shard {s}, "
                    f"where shards.json records rows {ro}..{ro + rn} of shard {rs}")
    if checksums:
        for s, info in table.items():
            if _file_hash(path / "shards" / f"{s}.npy") != info["blake2b"]:
                return f"shard {s}.npy does not match its checksum (changed on disk)"
    return None


def open_cache(path: str | os.PathLike, checksums: bool = False) -> FeatureCache:
    """Open a finished log-mel cache directory, after checking that it is intact.

    Every open checks that each shard named by ``index.csv`` is a file inside the
    cache's ``shards/`` folder with the size recorded in ``shards.json`` when it was
    written, and that each clip's frame range is the recorded one (no clip missing,
    listed twice, overlapping another or pointing outside its shard). The checksums
    are read only with ``checksums=True`` (every ``tile2audio features`` run checks them).

    Parameters
    ----------
    path : str or os.PathLike
        A directory written by :func:`build_cache`.
    checksums : bool
        Also compare every shard's blake2b checksum (reads all shards).

    Returns
    -------
    FeatureCache

    Raises
    ------
    Tile2AudioError
        Missing directory, missing or malformed ``params.json`` / ``index.csv``, an
        unsupported cache version, or a damaged cache (one line naming the problem
        and the fix: rerun ``tile2audio features``).
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
    if not isinstance(meta, dict) or meta.get("version") not in _READABLE_VERSIONS:
        raise Tile2AudioError(f"{meta_path}: unsupported cache version; rebuild the cache")
    version = int(meta["version"])
    table = _read_table(path / "index.csv", INDEX_COLUMNS if version >= 2 else _V1_INDEX_COLUMNS)
    for col in SOURCE_COLUMNS:
        if col not in table.columns:  # a version-1 cache did not record its sources
            table[col] = "" if col == "source_hash" else "-1"
    index = _typed_index(table, path / "index.csv")
    failures_path = path / "failures.csv"
    failures = (_read_table(failures_path, FAILURE_COLUMNS) if failures_path.is_file()
                else pd.DataFrame(columns=FAILURE_COLUMNS, dtype=str))
    problem = _cache_problem(path, index, version, checksums)
    if problem:
        raise _damaged(path, problem)
    cache = FeatureCache(path, meta, index, failures)
    if cache.stats["mean"].shape != (cache.n_mels,) or cache.stats["std"].shape != (cache.n_mels,):
        raise Tile2AudioError(f"{meta_path}: stats do not match n_mels={cache.n_mels}; rebuild the cache")
    return cache
