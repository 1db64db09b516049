"""Pool planning for the triplet sampler: which clips a worker reads and how they rotate.

Plain numpy, no TensorFlow. :class:`PoolPlan` turns a cache index into the worker's
load units (whole shards, or runs of clips when a shard exceeds the memory budget) and
packs them into pools round by round; :func:`load_pool` reads one pool's frames with the
tables the per-batch draws read (:class:`PoolArrays`). The other functions are the
pieces: eligible rows, group and label codes, sorted blocks, the loop padding of short
clips and the normalisation factors of the log-domain augmentation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from .audio import loop_pad
from .config import FeatureParams
from .datasets.schema import text_column
from .errors import Tile2AudioError
from .features import MIN_SCALE, STD_FLOOR

log = logging.getLogger(__name__)

__all__ = ["FeatureSource", "PoolArrays", "LoadUnit", "PoolRecord", "PoolPlan", "eligible_rows", "group_codes",
           "label_codes", "blocks", "load_pool", "pad_short", "band_normalisation", "clip_normalisation",
           "SilenceRule", "non_silent_starts"]

GIB = float(2**30)


@runtime_checkable
class FeatureSource(Protocol):
    """What the sampler reads from a cache (a :class:`~tile2audio.features.FeatureCache`, or a test's fake)."""

    index: pd.DataFrame
    params: FeatureParams
    stats: dict
    shards: list

    @property
    def frames_per_second(self) -> float: ...

    @property
    def n_mels(self) -> int: ...

    def shard_nbytes(self, name: str) -> int: ...

    def frames_block(self, clip_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...


class PoolArrays(NamedTuple):
    """One pool, as the loader (a ``py_function``) hands it to the per-batch sampler.

    ``frames`` is (n_frames, n_mels) in the pool dtype; every other field is one value
    per pool clip (``offsets`` ... ``l_rank``, ``s_clip``, ``o_clip``) or per block of
    the group / label tables (see :func:`blocks`).
    """

    frames: np.ndarray
    offsets: np.ndarray  # int32, first frame of each clip in ``frames``
    lengths: np.ndarray  # int32, frames of each clip (after looping short clips)
    rows: np.ndarray  # int32, row of each clip in cache.index
    groups: np.ndarray  # int32, group code of each clip
    g_order: np.ndarray  # int32, clips sorted by group
    g_start: np.ndarray  # int32, each clip's group block start in g_order
    g_count: np.ndarray  # int32, size of that block
    l_order: np.ndarray  # int32, clips sorted by label
    l_start: np.ndarray  # int32
    l_count: np.ndarray  # int32
    l_rank: np.ndarray  # int32, each clip's rank inside its label block
    # The manifest's own groups (speaker, artist, session), even when opposites do not exclude them:
    h_order: np.ndarray  # int32, clips sorted by manifest group
    h_start: np.ndarray  # int32
    h_count: np.ndarray  # int32
    h_rank: np.ndarray  # int32, each clip's rank inside its manifest-group block
    s_clip: np.ndarray  # float32, per-clip scale of the log-domain augmentation
    o_clip: np.ndarray  # float32, per-clip offset of the log-domain augmentation
    # The allowed (mostly non-silent) tile starts, empty unless sampler.skip_silence:
    ok_rank: np.ndarray  # int32, per clip (length + 1 entries from offset + clip position): allowed starts < p
    ok_starts: np.ndarray  # int32, every clip's allowed starts, ascending, clip after clip
    ok_offset: np.ndarray  # int32, each clip's first entry in ok_starts
    ok_count: np.ndarray  # int32, each clip's number of allowed starts (>= 1)


class SilenceRule(NamedTuple):
    """How :func:`non_silent_starts` marks silence (``sampler.silence_db`` etc.)."""

    silence_db: float  # a frame within this many dB of the clip's loudest frame is non-silent
    fraction: float  # a start is allowed when this share of its tile's frames is non-silent
    tile_frames: int
    band_affine: tuple  # per-band (scale, offset), float32 (M,), raw = normalised * scale + offset
    unit: float  # feature units per natural-log unit of power


@dataclass(frozen=True)
class LoadUnit:
    """A run of clips loaded together: a whole shard, or part of one."""

    shard: str
    rows: np.ndarray  # int64 row numbers in cache.index
    nbytes: int  # float32 bytes in memory


@dataclass(frozen=True)
class PoolRecord:
    """What one pool load held (for tests, logs and the memory budget).

    Attributes
    ----------
    pool : int
        Pool number (0, 1, ... across rounds).
    shards : tuple of str
        Shards (or parts of shards) in the pool.
    n_clips : int
        Clips in the pool.
    nbytes : int
        The pool's size as float32, the figure compared with ``sampler.memory_gb``.
    """

    pool: int
    shards: tuple[str, ...]
    n_clips: int
    nbytes: int


class PoolPlan:
    """A worker's load units and their seeded packing into pools within a memory budget.

    Parameters
    ----------
    cache : FeatureSource
        The cache (its ``shards``, ``shard_nbytes`` and ``n_mels``).
    index : pandas.DataFrame
        The cache index with rows numbered 0..n-1 (``clip_id``, ``shard``, ``n_frames``).
    rows : ndarray of int, shape (n,)
        Index rows the sampler may draw from (:func:`eligible_rows`).
    pad_frames : int
        Clips shorter than this are counted at their looped size (:func:`pad_short`).
    budget_nbytes : int
        Memory budget of one pool, float32 bytes.
    seed, worker_index, num_workers : int
        The stream's seed and this worker's position; a worker reads
        ``shards[worker_index::num_workers]``, or every ``num_workers``-th clip when there
        are fewer shards than workers.

    Attributes
    ----------
    units : list of LoadUnit
    total_nbytes : int
        This worker's data as float32.
    rotating : bool
        True when ``total_nbytes`` exceeds the budget, so pools rotate.
    """

    def __init__(self, cache: FeatureSource, index: pd.DataFrame, rows: np.ndarray, pad_frames: int,
                 budget_nbytes: int, seed: int, worker_index: int = 0, num_workers: int = 1) -> None:
        self.cache = cache
        self.index = index
        self.pad_frames = int(pad_frames)
        self.budget_nbytes = int(budget_nbytes)
        self.seed = int(seed)
        self.worker_index = int(worker_index)
        self.num_workers = int(num_workers)
        self._n_frames = index["n_frames"].to_numpy()
        self.units = self._worker_units(np.asarray(rows))
        self.total_nbytes = int(sum(u.nbytes for u in self.units))
        self.rotating = self.total_nbytes > self.budget_nbytes
        self._rounds: list[list[list[int]]] = []

    @property
    def rows(self) -> np.ndarray:
        """Every index row this worker reads, in unit order, int64 (n,)."""
        return np.concatenate([u.rows for u in self.units])

    def pool_units(self, pool: int) -> list[LoadUnit]:
        """The load units of pool number ``pool`` (every unit when not rotating)."""
        if not self.rotating:
            return list(self.units)
        r = 0
        while pool >= len(self._round(r)):
            pool -= len(self._round(r))
            r += 1
        return [self.units[i] for i in self._round(r)[pool]]

    def _clip_nbytes(self, rows: np.ndarray) -> np.ndarray:
        """float32 bytes of each clip once padded to one tile."""
        frames = np.maximum(self._n_frames[rows], self.pad_frames)
        return frames.astype(np.int64) * int(self.cache.n_mels) * 4

    def _worker_units(self, rows: np.ndarray) -> list[LoadUnit]:
        """This worker's shards (or clips) as load units, each within the budget if possible."""
        shards = [str(s) for s in self.cache.shards]
        shard_of = self.index["shard"].astype(str).to_numpy()
        split_clips = self.num_workers > 1 and len(shards) < self.num_workers
        if split_clips:
            rows = rows[self.worker_index::self.num_workers]
            mine = shards
        else:
            mine = shards[self.worker_index::self.num_workers]
        units = []
        for name in mine:
            r = rows[shard_of[rows] == name]
            if len(r) == 0:
                continue
            nbytes = int(self._clip_nbytes(r).sum())  # includes the loop padding of short clips
            if not split_clips:
                nbytes = max(nbytes, int(self.cache.shard_nbytes(name)))
            units.extend(self._split_unit(LoadUnit(name, r, nbytes)))
        if not units:
            raise Tile2AudioError(
                f"sampler worker {self.worker_index} of {self.num_workers} has no clips to sample from "
                f"({len(shards)} shard(s), {len(rows)} usable clip(s) in the cache)")
        return units

    def _split_unit(self, unit: LoadUnit) -> list[LoadUnit]:
        """Split a unit larger than the budget into runs of clips that fit."""
        if unit.nbytes <= self.budget_nbytes or len(unit.rows) == 1:
            if unit.nbytes > self.budget_nbytes:
                log.warning("clip %s alone is larger than sampler.memory_gb; loading it anyway",
                            self.index["clip_id"].iloc[int(unit.rows[0])])
            return [unit]
        parts, start, total = [], 0, 0
        for i, size in enumerate(self._clip_nbytes(unit.rows)):
            if total and total + size > self.budget_nbytes:
                parts.append(LoadUnit(unit.shard, unit.rows[start:i], int(total)))
                start, total = i, 0
            total += int(size)
        parts.append(LoadUnit(unit.shard, unit.rows[start:], int(total)))
        return parts

    def _round(self, r: int) -> list[list[int]]:
        """Pools (lists of unit numbers) of rotation round ``r``: a seeded shuffle packed greedily."""
        while len(self._rounds) <= r:
            k = len(self._rounds)
            rng = np.random.default_rng([self.seed & 0x7FFFFFFFFFFFFFFF, self.worker_index, k])
            pools, current, total = [], [], 0
            for i in rng.permutation(len(self.units)):
                size = self.units[i].nbytes
                if current and total + size > self.budget_nbytes:
                    pools.append(current)
                    current, total = [], 0
                current.append(int(i))
                total += size
            pools.append(current)
            self._rounds.append(pools)
        return self._rounds[r]


def load_pool(cache: FeatureSource, index: pd.DataFrame, units: list[LoadUnit], pool: int, *, pad_frames: int,
              groups: np.ndarray, labels: np.ndarray, dtype, augment: bool,
              silence: SilenceRule | None = None,
              manifest_groups: np.ndarray | None = None) -> tuple[PoolArrays, PoolRecord]:
    """Read one pool from the cache with its sampling tables.

    Parameters
    ----------
    units : list of LoadUnit
        The pool's units (:meth:`PoolPlan.pool_units`).
    pool : int
        Its number, for the record.
    pad_frames : int
        Clips shorter than this are looped up to it.
    groups, labels : ndarray of int32, shape (len(index),)
        Group and label codes of every index row (:func:`group_codes`, :func:`label_codes`).
    dtype : numpy dtype
        Dtype of the in-memory frames.
    augment : bool
        Whether the per-clip minmax factors are needed.
    silence : SilenceRule, optional
        Mark each clip's mostly non-silent tile starts (:func:`non_silent_starts`); the
        ``ok_*`` fields are empty without it.
    manifest_groups : ndarray of int32, shape (len(index),), optional
        The manifest's own group codes, for same-group opposites (the ``h_*`` tables);
        ``groups`` when not given (``groups`` is one code per clip when opposites do not
        exclude groups).

    Returns
    -------
    PoolArrays, PoolRecord
    """
    rows = np.concatenate([u.rows for u in units])
    clip_ids = index["clip_id"].iloc[rows].astype(str).tolist()
    frames, offsets, lengths = cache.frames_block(clip_ids)
    # Cast first: the float32 block is freed before padding copies anything.
    frames = np.asarray(frames).astype(dtype, copy=False)
    frames, offsets, lengths = pad_short(frames, np.asarray(offsets), np.asarray(lengths), pad_frames,
                                         int(cache.n_mels))
    if frames.shape[0] >= 2**31:
        raise Tile2AudioError("a sampler pool has more than 2**31 frames; lower sampler.memory_gb")
    pool_groups = groups[rows].astype(np.int32)
    g_order, g_start, g_count, _ = blocks(pool_groups)
    l_order, l_start, l_count, l_rank = blocks(labels[rows])
    h_order, h_start, h_count, h_rank = blocks((groups if manifest_groups is None else manifest_groups)[rows])
    s_clip, o_clip = clip_normalisation(index, cache.params.normalize, rows, augment or silence is not None)
    record = PoolRecord(pool, tuple(u.shard for u in units), len(rows), int(sum(u.nbytes for u in units)))
    i32 = np.int32
    if silence is None:
        ok = (np.zeros(0, i32),) * 4
    else:
        ok = non_silent_starts(frames, offsets, lengths, s_clip, o_clip, silence)
    arrays = PoolArrays(frames=frames, offsets=offsets.astype(i32), lengths=lengths.astype(i32),
                        rows=rows.astype(i32), groups=pool_groups, g_order=g_order, g_start=g_start,
                        g_count=g_count, l_order=l_order, l_start=l_start, l_count=l_count, l_rank=l_rank,
                        h_order=h_order, h_start=h_start, h_count=h_count, h_rank=h_rank,
                        s_clip=s_clip, o_clip=o_clip, ok_rank=ok[0], ok_starts=ok[1], ok_offset=ok[2],
                        ok_count=ok[3])
    return arrays, record


def eligible_rows(index: pd.DataFrame, labels: np.ndarray, mode: str, clip_fraction: float,
                  seed: int) -> np.ndarray:
    """Index rows the sampler may draw from, int64 (n,).

    Clips with no frames are left out; in ``supervised`` mode so are clips without a
    label (``labels`` -1), and at least two labels must remain. ``clip_fraction`` < 1
    keeps a seeded subset (learning curves; the probes still see every clip).
    """
    rows = np.flatnonzero(index["n_frames"].to_numpy() >= 1)
    if len(rows) < len(index):
        log.warning("sampler: skipping %d clip(s) with no frames", len(index) - len(rows))
    if mode == "supervised":
        labelled = labels[rows] >= 0
        if not labelled.any():
            raise Tile2AudioError(
                "sampler.mode 'supervised' needs labels, but no clip in the cache has one; "
                "use a label-free mode (tile2vec) or a manifest with a label column")
        if not labelled.all():
            log.warning("supervised sampler: leaving out %d clip(s) without a label", int((~labelled).sum()))
        rows = rows[labelled]
        if len(np.unique(labels[rows])) < 2:
            raise Tile2AudioError("sampler.mode 'supervised' needs at least two distinct labels")
    if clip_fraction < 1.0:
        keep = max(2, int(round(clip_fraction * len(rows))))
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=min(keep, len(rows)), replace=False))
        log.info("sampler: training on %d of the cache's clips (sampler.clip_fraction %.2f)", len(rows),
                 clip_fraction)
    return rows


def group_codes(index: pd.DataFrame) -> np.ndarray:
    """int32 group code per row, (n,); a row without group gets a code of its own."""
    groups = text_column(index, "group", strip=True)
    codes = np.empty(len(index), dtype=np.int64)
    named = groups != ""
    codes[named] = pd.factorize(groups[named])[0]
    n_named = int(codes[named].max()) + 1 if named.any() else 0
    codes[~named] = n_named + np.arange(int((~named).sum()))
    return codes.astype(np.int32)


def label_codes(index: pd.DataFrame) -> np.ndarray:
    """int32 label code per row, (n,); -1 where there is no label."""
    labels = text_column(index, "label", strip=True)
    codes = np.full(len(index), -1, dtype=np.int32)
    named = labels != ""
    codes[named] = pd.factorize(labels[named])[0]
    return codes


def blocks(codes: np.ndarray):
    """Sort clips by code: (order, block start, block size, rank of each clip), all int32 (C,)."""
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    start = np.searchsorted(ordered, codes, side="left")
    count = np.searchsorted(ordered, codes, side="right") - start
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes))
    return (order.astype(np.int32), start.astype(np.int32), count.astype(np.int32), rank.astype(np.int32))


def pad_short(frames: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, pad_frames: int, n_mels: int):
    """Loop clips shorter than ``pad_frames`` up to it (the front end's padding rule).

    Parameters
    ----------
    frames : ndarray, shape (rows, n_mels)
    offsets, lengths : ndarray of int, shape (n_clips,)

    Returns
    -------
    frames, offsets, lengths
        The same arrays (untouched when no clip is short), or new ones with every short
        clip looped.
    """
    if frames.ndim != 2 or frames.shape[1] != n_mels or len(offsets) != len(lengths):
        raise Tile2AudioError(
            f"cache.frames_block returned frames {frames.shape} for {len(lengths)} clips; "
            f"expected (rows, {n_mels})")
    if (lengths >= pad_frames).all():
        return frames, offsets, lengths
    pieces = [frames[o:o + n] if n >= pad_frames else loop_pad(frames[o:o + n], pad_frames)
              for o, n in zip(offsets.tolist(), lengths.tolist())]
    new_lengths = np.array([len(x) for x in pieces], dtype=np.int64)
    new_offsets = np.concatenate([[0], np.cumsum(new_lengths)[:-1]]).astype(np.int64)
    return np.concatenate(pieces, axis=0), new_offsets, new_lengths


def band_normalisation(cache: FeatureSource) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (scale, offset), each float32 (n_mels,), undoing the cache's normalisation: raw = x * scale + offset."""
    m = int(cache.n_mels)
    if cache.params.normalize == "standardize":
        std = np.asarray(cache.stats["std"], dtype=np.float32).reshape(-1)
        mean = np.asarray(cache.stats["mean"], dtype=np.float32).reshape(-1)
        if std.shape != (m,) or mean.shape != (m,):
            raise Tile2AudioError(f"cache stats have {std.shape} / {mean.shape} bands, expected ({m},)")
        return np.maximum(std, STD_FLOOR), mean
    return np.ones(m, np.float32), np.zeros(m, np.float32)


def clip_normalisation(index: pd.DataFrame, normalize: str, rows: np.ndarray,
                       augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-clip (scale, offset), each float32 (n,), undoing minmax normalisation (ones and zeros otherwise)."""
    n = len(rows)
    if normalize != "minmax" or not augment:
        return np.ones(n, np.float32), np.zeros(n, np.float32)
    lo = index["min"].to_numpy(dtype=np.float64)[rows]
    hi = index["max"].to_numpy(dtype=np.float64)[rows]
    return np.maximum(hi - lo, MIN_SCALE).astype(np.float32), lo.astype(np.float32)


def non_silent_starts(frames: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, s_clip: np.ndarray,
                      o_clip: np.ndarray, rule: SilenceRule):
    """Each clip's tile starts whose tile is mostly non-silent, as the sampler's lookup tables.

    A frame's level is its power summed over the mel bands, from the un-normalised
    log-mel; it is non-silent when within ``rule.silence_db`` dB of the clip's loudest
    frame. A start ``s`` (0 <= s <= length - T) is allowed when at least
    ``rule.fraction`` of frames ``s .. s + T - 1`` are non-silent. A clip with no allowed
    start (all silent, or too little sound for one tile) keeps every start. One numpy
    pass per clip (at pool load, never per tile).

    Parameters
    ----------
    frames : ndarray, shape (rows, M)
        The pool's normalised frames (clips already looped to one tile).
    offsets, lengths : ndarray of int, shape (C,)
    s_clip, o_clip : ndarray of float32, shape (C,)
        Per-clip normalisation (:func:`clip_normalisation`, minmax factors on).
    rule : SilenceRule

    Returns
    -------
    ok_rank : ndarray of int32, shape (max(offsets + lengths) + C,)
        Clip ``c``'s entries start at ``offsets[c] + c``: entry ``p`` (0 <= p <= length)
        counts the allowed starts below ``p``.
    ok_starts : ndarray of int32
        The allowed starts, ascending, clip after clip.
    ok_offset, ok_count : ndarray of int32, shape (C,)
        Each clip's first entry in ``ok_starts`` and how many it has (>= 1).
    """
    band_scale, band_offset = (np.asarray(v, np.float32) for v in rule.band_affine)
    t = int(rule.tile_frames)
    floor_ln = rule.silence_db * np.log(10.0) / 10.0
    size = int((offsets + lengths).max()) + len(offsets) if len(offsets) else 0
    ok_rank = np.zeros(size, np.int32)
    starts, counts = [], []
    for c, (o, n) in enumerate(zip(offsets.tolist(), lengths.tolist())):
        raw = frames[o:o + n].astype(np.float32) * (band_scale * s_clip[c]) + (band_offset + o_clip[c])
        ln = raw.astype(np.float64) / rule.unit
        top = ln.max(axis=1, keepdims=True)
        level = top[:, 0] + np.log(np.exp(ln - top).sum(axis=1))  # log of the power summed over bands
        loud = np.concatenate([[0], np.cumsum(level >= level.max() - floor_ln)])
        span = max(n - t, 0)
        s = np.arange(span + 1)
        ok = (loud[np.minimum(s + t, n)] - loud[s]) >= rule.fraction * min(t, n) - 1e-9
        if not ok.any():
            ok[:] = True
        allowed = np.flatnonzero(ok)
        rank = ok_rank[o + c:o + c + n + 1]  # a view: filled in place
        rank[1:span + 2] = np.cumsum(ok)
        rank[span + 2:] = len(allowed)
        starts.append(allowed)
        counts.append(len(allowed))
    counts = np.asarray(counts, np.int64)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    i32 = np.int32
    return ok_rank, np.concatenate(starts).astype(i32), first.astype(i32), counts.astype(i32)
