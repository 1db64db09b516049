"""Embeddings: run a trained encoder over clips and store tile and clip embeddings.

Output directory (see docs/architecture.md)::

    emb/
      embed.json            run_dir, weights (trained | init), kind, dim, features, tiles
      clips.csv             clip_id, file, n_tiles, label, split, fold, group, path
      clip_embeddings.npz   mean (n_clips, D), meanstd (n_clips, 2D), max (n_clips, D)
      embed_fingerprint.json  run, weights, encoder hash (and cache content) of the tile files
      tiles/<file>.npz      embeddings (n_tiles, D), timestamps (n_tiles, 2)

Per-clip files are written as soon as a clip is embedded (atomically), so an
interrupted run restarted with ``skip_existing=True`` only embeds what is missing.
``embed_fingerprint.json`` names the run, the weights and a hash of the encoder file
the tile files were made with, and for a feature cache its ``content_fingerprint``
(tile files of a cache rebuilt since are embedded again): ``skip_existing`` keeps tile
files only when it matches, and refuses a folder made with another encoder (a run without ``skip_existing`` first
removes tile files of another encoder, so the folder never mixes two).
"""

from __future__ import annotations

import hashlib
import os
import json
import logging
import re
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from . import atomic
from .audio import loop_pad
from .console import show_progress
from .datasets.schema import text_column
from .errors import Tile2AudioError
from .runs import open_run, read_run
from .tiles import tile_starts, tile_timestamps

log = logging.getLogger(__name__)

POOLINGS = ("mean", "meanstd", "max")
#: Clips :func:`embed` decodes ahead of the encoder (in one background thread).
PREFETCH_CLIPS = 4
CLIP_COLUMNS = ["clip_id", "file", "n_tiles", "label", "split", "fold", "group", "path"]


def safe_file_name(clip_id: str) -> str:
    """A file-system-safe, collision-resistant stem for a clip id."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "__", clip_id).strip("._") or "clip"
    if stem != clip_id:
        stem = f"{stem}-{hashlib.sha1(clip_id.encode()).hexdigest()[:8]}"
    return stem[:150]


def pool_tiles(embeddings: np.ndarray) -> dict[str, np.ndarray]:
    """Pool one clip's tile embeddings.

    Parameters
    ----------
    embeddings : np.ndarray, shape (n_tiles, D)

    Returns
    -------
    dict
        ``mean`` (D,), ``meanstd`` (2D,) the mean then the std over tiles, ``max`` (D,).
    """
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or e.shape[0] == 0:
        raise Tile2AudioError(f"cannot pool embeddings of shape {e.shape}: need (n_tiles >= 1, D)")
    mean = e.mean(axis=0)
    return {"mean": mean, "meanstd": np.concatenate([mean, e.std(axis=0)]), "max": e.max(axis=0)}


@dataclass
class EmbeddingSet:
    """Embeddings of a set of clips, as written by :func:`embed` (or built in memory).

    Attributes
    ----------
    clips : pandas.DataFrame
        One row per clip: ``clip_id, file, n_tiles, label, split, fold, group, path``.
    arrays : dict of np.ndarray
        Pooled clip matrices: ``mean`` (n_clips, D), ``meanstd`` (n_clips, 2D), ``max``.
    meta : dict
        ``embed.json``: ``name``, ``kind`` (trained, random, mfcc, supervised, other),
        ``label_free``, ``dim``, ``run_dir``, ``weights``.
    path : Path or None
        The directory it was loaded from (tile files are read from ``path/tiles``).
    tile_arrays : dict
        In-memory tile embeddings ``clip_id -> (embeddings, timestamps)`` for sets that
        were not written to disk.
    """

    clips: pd.DataFrame
    arrays: dict
    meta: dict
    path: Path | None = None
    tile_arrays: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Display name of the embedding (run name, ``random``, ``mfcc`` ...)."""
        return str(self.meta.get("name", "embedding"))

    @property
    def kind(self) -> str:
        """``trained``, ``random``, ``mfcc``, ``supervised`` or ``other``."""
        return str(self.meta.get("kind", "other"))

    @property
    def label_free(self) -> bool:
        """False for embeddings trained with label-aware triplets."""
        return bool(self.meta.get("label_free", True))

    @property
    def label_free_result(self) -> bool:
        """True when results of this embedding count as label-free: ``label_free`` and not of kind ``supervised``."""
        return self.label_free and self.kind != "supervised"

    def pooled(self, pooling: str = "mean") -> np.ndarray:
        """The clip-level matrix for ``pooling`` (``mean``, ``meanstd`` or ``max``), (n_clips, D')."""
        if pooling not in self.arrays:
            raise Tile2AudioError(
                f"embedding set {self.name!r} has no {pooling!r} pooling; it has {sorted(self.arrays)}"
            )
        return self.arrays[pooling]

    def tiles(self, clip_id: str) -> tuple[np.ndarray, np.ndarray]:
        """Tile embeddings (n_tiles, D) and timestamps (n_tiles, 2) of one clip."""
        if clip_id in self.tile_arrays:
            return self.tile_arrays[clip_id]
        rows = self.clips.index[self.clips["clip_id"] == clip_id]
        if len(rows) == 0:
            raise Tile2AudioError(f"no clip {clip_id!r} in embedding set {self.name!r}")
        return self._tile_file(self.clips.loc[rows[0], "file"])

    def _tile_file(self, file: str) -> tuple[np.ndarray, np.ndarray]:
        """Tile embeddings and timestamps from ``tiles/<file>.npz``."""
        if self.path is None:
            raise Tile2AudioError(f"embedding set {self.name!r} holds no tile embeddings")
        with np.load(self.path / "tiles" / f"{file}.npz", allow_pickle=False) as z:
            return z["embeddings"], z["timestamps"]

    def tile_matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """All tile embeddings stacked, with the clip row (in :attr:`clips`) of each tile.

        Returns
        -------
        X : np.ndarray, shape (n_tiles_total, D)
        clip_rows : np.ndarray of int, shape (n_tiles_total,)
        """
        blocks, rows = [], []
        # Row by row, not through tiles(clip_id): that looks each id up in the whole table.
        for i, (clip_id, file) in enumerate(zip(self.clips["clip_id"], self.clips["file"])):
            e = self.tile_arrays[clip_id][0] if clip_id in self.tile_arrays else self._tile_file(file)[0]
            blocks.append(e)
            rows.append(np.full(len(e), i, dtype=np.int64))
        return np.concatenate(blocks), np.concatenate(rows)


def from_clip_matrix(
    clips: pd.DataFrame, matrix: np.ndarray, name: str, kind: str = "other", label_free: bool = True
) -> EmbeddingSet:
    """An in-memory :class:`EmbeddingSet` from a clip-level matrix (e.g. MFCC statistics).

    Parameters
    ----------
    clips : DataFrame with at least ``clip_id`` (and ``label``, ``split``, ``fold``, ``group``)
    matrix : np.ndarray, shape (n_clips, D); used for every pooling name
    """
    matrix = np.asarray(matrix, dtype=np.float32)
    if matrix.ndim != 2 or len(matrix) != len(clips):
        raise Tile2AudioError(f"matrix of shape {matrix.shape} does not match {len(clips)} clips")
    clips = _clip_table(clips)
    tiles = {cid: (matrix[i : i + 1], np.zeros((1, 2))) for i, cid in enumerate(clips["clip_id"])}
    # One matrix serves every pooling name, so tables say "clip" rather than a pooling.
    meta = {"name": name, "kind": kind, "label_free": label_free, "dim": int(matrix.shape[1]), "pooling": "clip"}
    return EmbeddingSet(clips=clips, arrays={p: matrix for p in POOLINGS}, meta=meta, tile_arrays=tiles)


def _clip_table(clips: pd.DataFrame) -> pd.DataFrame:
    """Normalise a clip table to :data:`CLIP_COLUMNS` (missing columns empty)."""
    out = clips.reset_index(drop=True).copy()
    for col in CLIP_COLUMNS:
        if col not in out.columns:
            out[col] = "" if col != "n_tiles" else 1
    if (out["file"] == "").all():
        out["file"] = [safe_file_name(c) for c in out["clip_id"]]
    out["fold"] = pd.array(pd.to_numeric(out["fold"].replace("", None), errors="coerce"), dtype="Int64")
    for col in ("label", "split", "group", "path"):
        out[col] = text_column(out, col)
    return out[CLIP_COLUMNS + [c for c in out.columns if c not in CLIP_COLUMNS]]


def write_clip_level(out_dir: Path, clips: pd.DataFrame, meta: dict) -> EmbeddingSet:
    """Pool every clip's tile file in ``out_dir/tiles`` and write the clip-level files.

    Parameters
    ----------
    out_dir : Path
    clips : DataFrame with ``CLIP_COLUMNS`` (``n_tiles`` is recomputed)
    meta : dict written as ``embed.json``
    """
    out_dir = Path(out_dir)
    clips = _clip_table(clips)
    pooled: dict[str, list] = {p: [] for p in POOLINGS}
    n_tiles = []
    for file in clips["file"]:
        with np.load(out_dir / "tiles" / f"{file}.npz", allow_pickle=False) as z:
            e = z["embeddings"]
        n_tiles.append(len(e))
        for k, v in pool_tiles(e).items():
            pooled[k].append(v)
    clips["n_tiles"] = n_tiles
    arrays = {k: np.stack(v) if v else np.zeros((0, 0), np.float32) for k, v in pooled.items()}
    atomic.save_npz(out_dir / "clip_embeddings.npz", **arrays)
    atomic.write_csv(out_dir / "clips.csv", clips)
    atomic.write_json(out_dir / "embed.json", meta)
    return EmbeddingSet(clips=clips, arrays=arrays, meta=meta, path=out_dir)


def load_embeddings(path: str | Path) -> EmbeddingSet:
    """Open an embedding directory written by :func:`embed`.

    Raises
    ------
    Tile2AudioError
        When the directory or one of its files is missing or malformed.
    """
    path = Path(path)
    needed = ["embed.json", "clips.csv", "clip_embeddings.npz"]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise Tile2AudioError(
            f"{path} is not a complete embedding directory (missing {', '.join(missing)}); "
            "run `tile2audio embed` first"
        )
    try:
        meta = json.loads((path / "embed.json").read_text(encoding="utf-8"))
        clips = pd.read_csv(path / "clips.csv", dtype=str, keep_default_na=False)
        with np.load(path / "clip_embeddings.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise Tile2AudioError(f"cannot read embedding directory {path}: {exc}") from exc
    if not isinstance(meta, dict):
        raise Tile2AudioError(f"{path / 'embed.json'}: expected a JSON object, got a JSON {type(meta).__name__}; "
                              "the file was edited or overwritten: embed again")
    if "n_tiles" not in clips.columns:
        raise Tile2AudioError(f"{path / 'clips.csv'} has no n_tiles column; embed again")
    n_tiles = pd.to_numeric(clips["n_tiles"], errors="coerce")
    bad = ~(n_tiles.notna() & (n_tiles == n_tiles.round()) & (n_tiles >= 0))
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise Tile2AudioError(f"{path / 'clips.csv'}: n_tiles must be a whole number, got "
                              f"{clips['n_tiles'].iloc[first]!r} for clip {clips['clip_id'].iloc[first]!r} "
                              f"(row {first + 2}); the file was edited: embed again")
    clips["n_tiles"] = n_tiles.astype(int)
    clips = _clip_table(clips)
    for k, v in arrays.items():
        if len(v) != len(clips):
            raise Tile2AudioError(f"{path}/clip_embeddings.npz[{k}] has {len(v)} rows for {len(clips)} clips")
    return EmbeddingSet(clips=clips, arrays=arrays, meta=meta, path=path)


# --------------------------------------------------------------------------- computing


def _encoder_fingerprint(run_dir: Path, weights: str) -> dict:
    """What identifies the encoder that makes a folder's tile files: run, weights, file hash."""
    name = "encoder_init.keras" if weights == "init" else "encoder.keras"
    h = hashlib.sha256()
    with open(run_dir / name, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return {"run_dir": str(run_dir.resolve()), "weights": weights, "encoder_sha256": h.hexdigest()}


def _same_encoder(a: dict, b: dict) -> bool:
    """True when two ``embed_fingerprint.json`` contents differ at most in the cache they embedded."""
    return {k: v for k, v in a.items() if k != "cache"} == {k: v for k, v in b.items() if k != "cache"}


def _claim_tiles(out: Path, fingerprint: dict, skip_existing: bool) -> None:
    """Check (``skip_existing``) or write ``embed_fingerprint.json`` so tile files never mix encoders."""
    tiles = out / "tiles"
    marker = out / "embed_fingerprint.json"
    old = None
    if marker.is_file():
        try:
            old = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
    existing = list(tiles.glob("*.npz")) if tiles.is_dir() else []
    if old == fingerprint:
        return
    if existing and isinstance(old, dict) and _same_encoder(old, fingerprint):
        log.info("%s: the feature cache changed since its %d tile file(s) were made; embedding every clip again",
                 out, len(existing))
    elif skip_existing and existing:
        if old is None:
            raise Tile2AudioError(
                f"{out}: --skip-existing cannot tell which encoder made the {len(existing)} tile file(s) "
                "there (no embed_fingerprint.json); embed without --skip-existing or into another folder"
            )
        raise Tile2AudioError(
            f"{out}: --skip-existing would mix encoders: its tile files were made with run "
            f"{old.get('run_dir')} weights {old.get('weights')!r}, this is run {fingerprint['run_dir']} "
            f"weights {fingerprint['weights']!r}; embed without --skip-existing or into another folder"
        )
    for f in existing:  # another encoder's tiles: this run replaces them all
        f.unlink()
    atomic.write_json(marker, fingerprint)


def _check_finite_weights(encoder, run_dir: Path, weights: str) -> None:
    """Raise when any encoder weight is NaN or infinite (a diverged run): its embeddings are NaN."""
    bad = [w.path if hasattr(w, "path") else w.name for w in encoder.weights
           if not np.all(np.isfinite(np.asarray(w.numpy())))]
    if bad:
        raise Tile2AudioError(
            f"{run_dir}: the {weights} encoder has non-finite (NaN or inf) weights in {len(bad)} "
            f"variable(s), e.g. {bad[0]}; the run diverged: retrain it with a lower train.learning_rate"
        )


def embed_frames(encoder, frames: np.ndarray, geometry, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Embed one clip's normalised log-mel frames tile by tile: :func:`tile2audio.tiles.cut_tiles`, batched.

    The same as :func:`embed_many` with one clip: tiles are cut ``batch_size`` at a time
    (memory bounded on hour-long clips) and run through the encoder's compiled forward pass.

    Parameters
    ----------
    encoder : keras.Model
        Maps (B, T, M, 1) to (B, D).
    frames : np.ndarray, shape (n_frames, n_mels)
    geometry : tile2audio.tiles.TileGeometry
    batch_size : int
        Tiles per forward pass.

    Returns
    -------
    embeddings : np.ndarray, shape (n_tiles, D)
    timestamps : np.ndarray, shape (n_tiles, 2), start and end in seconds
    """
    for _, e, ts in embed_many(encoder, [(0, frames)], geometry, batch_size):
        return e, ts
    raise Tile2AudioError("embed_frames: nothing was embedded")  # pragma: no cover - one clip in, one out


_FORWARD: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _forward(encoder):
    """The encoder's inference call as one ``tf.function`` (cached per encoder): no eager per-layer dispatch."""
    fn = _FORWARD.get(encoder)
    if fn is None:
        import tensorflow as tf

        fn = tf.function(lambda x: encoder(x, training=False), reduce_retracing=True)
        _FORWARD[encoder] = fn
    return fn


def embed_many(encoder, clips: Iterable, geometry, batch_size: int = 128) -> Iterator[tuple]:
    """Embed many clips with full batches: tiles of consecutive clips share a forward pass.

    Per-clip batches waste the encoder on short clips (a 3 s clip at a 0.75 s hop gives
    4 tiles); here tiles are gathered across clips until ``batch_size`` of them are
    waiting, every batch but the last is full, and each clip is yielded as soon as its
    last tile is embedded. Memory stays bounded: tiles are cut from a clip's frames
    ``batch_size`` at a time (an hour-long clip never holds all its tiles at once), so
    at most about two batches of tiles, the frames of the clips in flight and their
    (n_tiles, D) outputs are held.

    Parameters
    ----------
    encoder : keras.Model
        Maps (B, T, M, 1) to (B, D).
    clips : iterable of (key, frames)
        ``frames`` float32 (n_frames, n_mels), normalised; ``key`` is returned as given.
    geometry : tile2audio.tiles.TileGeometry
    batch_size : int
        Tiles per forward pass.

    Yields
    ------
    (key, embeddings (n_tiles, D), timestamps (n_tiles, 2))
        In the order of ``clips``; the tiles are those of :func:`tile2audio.tiles.cut_tiles`.
    """
    if batch_size < 1:
        raise Tile2AudioError(f"batch_size must be >= 1, got {batch_size}")
    forward = _forward(encoder)
    T = geometry.tile_frames
    offsets = np.arange(T, dtype=np.int64)
    waiting: list[tuple[int, np.ndarray]] = []  # (clip slot, tiles), not yet run
    n_waiting = 0
    open_clips: dict[int, list] = {}  # slot -> [key, timestamps, pieces, tiles still to come]
    order: list[int] = []

    def run_batch() -> None:
        nonlocal n_waiting
        if not waiting:
            return
        batch = np.concatenate([t for _, t in waiting])
        if n_waiting < batch_size:
            # Pad the last batch: one input shape, so a clip's embeddings do not depend on
            # which clips shared its batch (kernels picked per batch size round differently).
            batch = np.concatenate([batch, np.zeros((batch_size - n_waiting,) + batch.shape[1:], batch.dtype)])
        out = np.asarray(forward(batch[..., None]), dtype=np.float32)
        i = 0
        for slot, t in waiting:
            entry = open_clips[slot]
            entry[2].append(out[i:i + len(t)])
            entry[3] -= len(t)
            i += len(t)
        waiting.clear()
        n_waiting = 0

    def finished() -> Iterator[tuple]:
        while order and open_clips[order[0]][3] == 0:
            key, ts, pieces, _ = open_clips.pop(order.pop(0))
            yield key, np.concatenate(pieces), ts

    for slot, (key, frames) in enumerate(clips):
        frames = np.asarray(frames, dtype=np.float32)
        if frames.ndim != 2 or frames.shape[0] < 1 or frames.shape[1] < 1:
            raise Tile2AudioError(f"embed: frames of shape (n_frames, n_mels) expected, got {frames.shape}")
        n_frames = frames.shape[0]
        starts = tile_starts(n_frames, T, geometry.hop_frames)
        ts = tile_timestamps(starts, n_frames, T, geometry.frames_per_second)
        if n_frames < T:
            frames = loop_pad(frames, T)
        open_clips[slot] = [key, ts, [], len(starts)]
        order.append(slot)
        i = 0
        while i < len(starts):
            # Fill the batch in flight exactly: every forward pass but the last is full.
            part = starts[i:i + batch_size - n_waiting]
            waiting.append((slot, frames[part[:, None] + offsets[None, :]]))
            n_waiting += len(part)
            i += len(part)
            if n_waiting >= batch_size:
                run_batch()
        yield from finished()
    run_batch()
    yield from finished()


def _clip_sources(paths, root=None):
    """Yield (kind, object) for a manifest CSV, a cache directory, audio folders or audio files."""
    from .features import open_cache

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and _is_cache_dir(paths[0]):
        return "cache", open_cache(paths[0])
    if len(paths) == 1 and paths[0].suffix.lower() == ".csv":
        from .datasets import read_manifest, resolve_paths

        df = read_manifest(paths[0])
        df = df.assign(path=[str(p) for p in resolve_paths(df, root)])
        return "manifest", df
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise Tile2AudioError(f"not found: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    caches = [str(p) for p in paths if _is_cache_dir(p)]
    if caches:
        raise Tile2AudioError(f"a feature cache can only be embedded on its own: {', '.join(caches[:3])}")
    files = [p for p in paths if not p.is_dir()]
    parts = [pd.DataFrame({"clip_id": [p.stem if len({q.stem for q in files}) == len(files) else str(p) for p in files],
                           "path": [str(p) for p in files]})]
    folders = [p for p in paths if p.is_dir()]
    for folder in folders:
        parts.append(_folder_clips(folder, prefix=len(paths) > 1))
    clips = pd.concat(parts, ignore_index=True)
    dup = clips["clip_id"][clips["clip_id"].duplicated()]
    if len(dup):
        raise Tile2AudioError(f"the inputs give clip ids twice: {', '.join(dup.unique()[:5])}; embed them separately")
    return "files", clips


def _is_cache_dir(path: Path) -> bool:
    """True for a feature cache written by build_cache (a plain folder of audio is not one)."""
    return path.is_dir() and (path / "index.csv").is_file() and (path / "params.json").is_file()


def _folder_clips(folder: Path, prefix: bool) -> pd.DataFrame:
    """Every audio file under ``folder`` (recursive, the folder loader's extensions).

    The clip id is the path relative to the folder without its extension (prefixed by
    the folder's name when several inputs are embedded together); the label is the
    parent folder's name, as ``tile2audio manifest folder`` gives it.
    """
    from .datasets import build_manifest, resolve_paths

    df = build_manifest("folder", folder)
    df = df.assign(path=[str(p) for p in resolve_paths(df)])
    if prefix:
        df["clip_id"] = folder.name + "/" + df["clip_id"].astype(str)
    return df


def embed(
    run_dir: str | os.PathLike,
    paths,
    out_dir: str | os.PathLike | None = None,
    *,
    weights: str = "trained",
    skip_existing: bool = False,
    batch_size: int = 128,
    root: str | os.PathLike | None = None,
    name: str | None = None,
    progress: bool = True,
) -> EmbeddingSet:
    """Embed clips with a run's encoder.

    Parameters
    ----------
    run_dir : path
        A run directory from :func:`tile2audio.train.train`.
    paths : path or list of paths
        A manifest CSV, a feature cache directory, or audio files and folders of audio
        (searched recursively for every audio extension of the folder loader; clip id =
        relative path without extension, label = parent folder name). Raw audio goes
        through the run's own feature parameters and normalisation statistics.
    out_dir : path, optional
        Write the embedding directory here (see module docstring). Without it the
        embeddings are returned in memory only.
    weights : ``trained`` or ``init``
        ``init`` embeds with the run's initial random weights (the random baseline).
    skip_existing : bool
        Keep tile files already in ``out_dir`` (resume an interrupted run).
    batch_size : int
        Tiles per forward pass.
    root : path, optional
        Data root overriding a manifest's ``root`` column.
    name : str, optional
        Display name in reports (default: the run directory's name, plus ``(random)``).

    Returns
    -------
    EmbeddingSet
        ``.pooled("mean")`` is the (n_clips, D) clip matrix; ``.tiles(clip_id)`` gives
        (n_tiles, D) embeddings and (n_tiles, 2) timestamps.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise Tile2AudioError(f"--batch-size (embed batch_size) must be a positive whole number of tiles, "
                              f"got {batch_size!r}")
    from tqdm.auto import tqdm

    from .features import extract_clip, normalize_frames

    run_dir = Path(run_dir)
    info = read_run(run_dir)
    run = open_run(run_dir)
    config, feat, params, stats, geometry = run.config, run.feature_file, run.features, run.stats, run.geometry
    encoder = run.encoder(weights)
    _check_finite_weights(encoder, run_dir, weights)
    kind = "random" if weights == "init" else ("trained" if info.get("label_free", True) else "supervised")
    meta = {
        "name": name or (run_dir.name + (" (random)" if weights == "init" else "")),
        "kind": kind, "label_free": bool(info.get("label_free", True)) or weights == "init",
        "run_dir": str(run_dir.resolve()), "weights": weights,
        "dim": int(encoder.output_shape[-1]), "features": feat["params"],
        "tiles": {"tile_seconds": config.tiles.tile_seconds, "tile_hop_seconds": config.tiles.tile_hop_seconds},
    }
    source, obj = _clip_sources(paths, root)
    if source == "cache":
        if obj.params != params:
            raise Tile2AudioError(
                f"the cache {obj.path} was made with other feature parameters than run {run_dir}; "
                "embed its manifest or audio files instead (they go through the run's parameters)"
            )
        clips = obj.index.copy()
    else:
        clips = obj.copy()
    clips = clips.reset_index(drop=True)
    clips["file"] = [safe_file_name(c) for c in clips["clip_id"]]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        atomic.ensure_dir(out, "embedding folder")
        marker = _encoder_fingerprint(run_dir, weights)
        if source == "cache":  # tile files of a cache rebuilt since (changed audio) are stale
            marker["cache"] = obj.content_fingerprint
        _claim_tiles(out, marker, skip_existing)
    tile_arrays: dict = {}
    keep = []

    def frames_of(i: int, row) -> np.ndarray | None:
        try:
            # The run's statistics, not the cache's: a run embeds other data the way it trained.
            raw = obj.frames(row["clip_id"], raw=True) if source == "cache" else extract_clip(row["path"], params)[0]
            return normalize_frames(raw, params, stats)
        except Tile2AudioError as exc:
            log.warning("skipping %s: %s", row["clip_id"], exc)
            return None

    def todo() -> Iterator[tuple[int, np.ndarray]]:
        rows = []
        for i, row in clips.iterrows():
            target = out / "tiles" / f"{row['file']}.npz" if out is not None else None
            if target is not None and skip_existing and target.is_file():
                keep.append(i)
                bar.update()
            else:
                rows.append((i, row))
        # Decode and featurise the next clips in a thread while the encoder runs (librosa
        # and soundfile release the GIL); a few clips ahead at most, so memory stays bounded.
        with ThreadPoolExecutor(max_workers=1) as pool:
            ahead: deque = deque()
            for i, row in rows:
                ahead.append((i, pool.submit(frames_of, i, row)))
                if len(ahead) > PREFETCH_CLIPS:
                    yield from _ready(ahead.popleft())
            while ahead:
                yield from _ready(ahead.popleft())

    def _ready(item) -> Iterator[tuple[int, np.ndarray]]:
        i, future = item
        frames = future.result()
        if frames is None:
            bar.update()
        else:
            yield i, frames

    try:
        with tqdm(total=len(clips), desc="embed", unit="clip", disable=not show_progress(progress)) as bar:
            for i, e, ts in embed_many(encoder, todo(), geometry, batch_size):
                if out is not None:
                    atomic.save_npz(out / "tiles" / f"{clips.at[i, 'file']}.npz", embeddings=e.astype(np.float32),
                                    timestamps=ts)
                else:
                    tile_arrays[clips.at[i, "clip_id"]] = (e, ts)
                keep.append(i)
                bar.update()
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the tile files written so far are complete
        if out is None:
            raise
        raise KeyboardInterrupt(
            f"{len(keep)} of {len(clips)} clips embedded into {out}; rerun the same command with "
            "--skip-existing to embed only the rest") from exc
    keep.sort()
    clips = clips.loc[keep].reset_index(drop=True)
    if not len(clips):
        raise Tile2AudioError("no clip could be embedded")
    if out is not None:
        return write_clip_level(out, clips, meta)
    pooled = [pool_tiles(tile_arrays[c][0]) for c in clips["clip_id"]]
    arrays = {p: np.stack([x[p] for x in pooled]) for p in POOLINGS}
    clips["n_tiles"] = [len(tile_arrays[c][0]) for c in clips["clip_id"]]
    return EmbeddingSet(clips=_clip_table(clips), arrays=arrays, meta=meta, tile_arrays=tile_arrays)
