"""Triplet sampler: (anchor, neighbour, opposite) log-mel tiles as a seeded ``tf.data`` stream.

Design
------
The normalised frames of a *pool* of clips are held in memory as one tensor
``frames (rows, n_mels)`` (float16 by default, cast to float32 after the gather) with
per-clip ``offsets`` and ``lengths``. Clips shorter than one tile are looped
(:func:`tile2audio.audio.loop_pad`) to one tile when the pool is loaded.

Each batch is drawn in the graph, with no Python per triplet: batch ``step`` uses the
stateless random ops seeded by ``fold_in((seed, step), worker_index)``, picks clip
positions and tile starts for the whole batch with a few vector ops, and cuts every tile
with one ``tf.gather`` of ``(3B, T)`` row numbers. The same seed therefore gives the
same triplets, and ``dataset(start_step=k)`` continues exactly as batch ``k`` of
``dataset(0)`` (the trainer resumes with it).

Memory: when this worker's part of the cache (as float32) is larger than
``sampler.memory_gb`` GiB, the pool rotates: the worker's shards are shuffled (a new
seeded permutation each round), packed greedily into pools within the budget (a shard
larger than the budget is split into runs of clips) and each pool serves
``sampler.rotate_steps`` batches before the next one is loaded. Pools are loaded by a
``tf.py_function`` (Python once per pool, not per triplet) and passed to the per-batch
function as tensors, never as graph constants. A worker of a multi-worker run reads
``shards[worker_index::num_workers]`` (or every ``num_workers``-th clip when there are
fewer shards than workers).

Modes (``SamplerConfig.mode``)
-------------------------------
``tile2vec``
    Anchor clip uniform over the pool, anchor start uniform; neighbour start within
    ``neighbourhood_frames`` of the anchor start and at least ``min_gap_frames`` away
    (anchor starts are drawn only where such a neighbour exists, when the clip allows);
    opposite: a random tile of another clip of another group (slices of one source
    recording are never opposites; a clip without group is its own group).
``tile2vec-distant``
    As ``tile2vec``, but with probability ``distant_prob`` the opposite is a tile of the
    anchor's own clip starting at least ``distant_min_seconds`` (default twice the
    neighbourhood, and always more than the neighbourhood) from the anchor, when the clip
    is long enough; otherwise another clip as above.
``sampler.positive: view`` (with ``tile2vec`` modes)
    Anchor and positive are two independent uniform crops of the same clip (clips shorter
    than two tiles are looped to two tiles, so the crops are time shifts through the
    loop), each augmented on its own: the positive is never the anchor's identical audio.
``sampler.exclude_group_opposites: false``
    Every clip is its own group: opposites and in-batch negatives then only avoid the
    anchor's clip, and other clips of its speaker or artist serve as hard negatives.
``supervised``
    Neighbour: a random tile of another clip with the anchor's label (the same clip when
    the label has one clip); opposite: a random tile of a clip with another label.
    Clips without a label are left out.

Augmentation (``sampler.augment``) is applied in the graph to each of the three tiles
independently, from its own stateless seed, so turning it on never changes which tiles
are drawn. Features are normalised log-mel, so every operation is done on the
un-normalised log values (using the cache's normalisation: per-band mean/std, or per-clip
min/max): a gain of ``g`` dB is an additive offset of ``g`` dB (``g ln10/10`` for natural
log features), mixing adds the powers of two tiles (``logaddexp`` of the log values,
the other tile scaled by ``mix_gain_db``), and SpecAugment masks set time / mel bands to
the tile's mean value. ``top_db`` clipping is not re-applied after a gain or a mix. The
element-wise part runs as one XLA-compiled function (about 2x faster on CPU than separate
ops).

Errors: the first pool is loaded when :meth:`TripletSampler.dataset` is called, so a
broken cache raises :class:`~tile2audio.errors.Tile2AudioError` there; a later pool that
fails to load surfaces as a ``tf.errors`` exception carrying the same message.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import tensorflow as tf

from .audio import loop_pad
from .augment import band_mask, gain_mask, log_unit, mix_gain_mask
from .config import FeatureParams, SamplerConfig, TileConfig, TrainingConfig, frames_for
from .datasets.schema import text_column
from .draws import inside_block_excluding, other_clip, outside_block, randint, two_segments
from .errors import Tile2AudioError
from .features import MIN_SCALE, STD_FLOOR
from .rules import choose_training
from .tiles import TileGeometry

log = logging.getLogger(__name__)

__all__ = ["TripletSampler", "FeatureSource", "PoolArrays"]

_GIB = float(2**30)
_NO_END = 2**62  # "infinite" step range; never reached
_N_UNIFORMS = 8  # uniforms per triplet for the index draws (fixed, so modes stay comparable)

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
    the group / label tables (see :func:`_blocks`).
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
    s_clip: np.ndarray  # float32, per-clip scale of the log-domain augmentation
    o_clip: np.ndarray  # float32, per-clip offset of the log-domain augmentation


#: The tf dtype of every PoolArrays field but ``frames`` (whose dtype is the pool dtype).
_POOL_DTYPES = {name: (tf.float32 if name in ("s_clip", "o_clip") else tf.int32) for name in PoolArrays._fields[1:]}


@dataclass(frozen=True)
class _Unit:
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


class TripletSampler:
    """Seeded, vectorised ``tf.data`` source of Tile2Vec triplets from a feature cache.

    Parameters
    ----------
    cache : FeatureSource
        An open cache (:func:`tile2audio.features.open_cache`) or anything with the
        :class:`FeatureSource` interface. Uses ``index``
        (``clip_id``, ``shard``, ``n_frames``, ``label``, ``group``; ``min``/``max`` for
        ``minmax`` features with augmentation), ``params``, ``stats``,
        ``frames_per_second``, ``n_mels``, ``shards``, ``shard_nbytes`` and
        ``frames_block``.
    tiles : TileConfig
        Tile, neighbourhood and minimum-gap lengths.
    sampler : SamplerConfig
        Mode, memory budget, rotation and augmentation settings.
    batch_size : int
        Triplets per batch (this worker's share).
    seed : int
        Seed of the whole stream.
    worker_index, num_workers : int
        This worker's position in a multi-worker run.
    pool_dtype : str
        ``"float16"`` (default: half the memory traffic; the cache itself is float16)
        or ``"float32"`` for the in-memory frames.

    Attributes
    ----------
    geometry : TileGeometry
    tile_shape : tuple
        ``(T, M, 1)``.
    rotating : bool
        True when the worker's data exceeds ``sampler.memory_gb`` and pools rotate.
    total_nbytes, budget_nbytes : int
        This worker's data as float32, and the budget, in bytes.
    loaded_pools : list of PoolRecord
        Every pool loaded so far, in order.
    """

    def __init__(self, cache: FeatureSource, tiles: TileConfig, sampler: SamplerConfig, batch_size: int, seed: int,
                 worker_index: int = 0, num_workers: int = 1, pool_dtype: str = "float16") -> None:
        _check_args(batch_size, seed, worker_index, num_workers, pool_dtype)
        if tiles.is_auto or sampler.is_auto:
            # Standalone use (the trainer resolves first and records the values chosen).
            resolved, _ = choose_training(TrainingConfig(tiles=tiles, sampler=sampler), cache.index,
                                          cache.frames_per_second)
            tiles, sampler = resolved.tiles, resolved.sampler
        self.cache = cache
        self.tiles = tiles
        self.config = sampler
        self.view = sampler.positive == "view"
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.worker_index = int(worker_index)
        self.num_workers = int(num_workers)
        self.pool_dtype = tf.as_dtype(pool_dtype)
        self.geometry = TileGeometry.from_config(tiles, cache.frames_per_second)
        self.n_mels = int(cache.n_mels)
        self.distant_frames = self._distant_frames()
        index = _checked_index(cache.index)
        self._index = index
        # Without exclusion every clip is its own group, for the opposites and the loss's negatives alike.
        self._group_codes = (_group_codes(index) if sampler.exclude_group_opposites
                             else np.arange(len(index), dtype=np.int32))
        self._label_codes = _label_codes(index)
        rows = self._eligible_rows(index)
        self.budget_nbytes = int(sampler.memory_gb * _GIB)
        self._units = self._worker_units(rows)
        self.total_nbytes = int(sum(u.nbytes for u in self._units))
        self.rotating = self.total_nbytes > self.budget_nbytes
        self._check_enough_clips()
        self._band_affine = self._band_normalisation()
        self._rounds: list[list[list[int]]] = []
        self._preloaded: dict[int, PoolArrays] = {}
        self.loaded_pools: list[PoolRecord] = []
        if self.rotating:
            log.info("sampler worker %d: %.2f GiB of features > budget %.2f GiB: rotating pools every %d steps",
                     self.worker_index, self.total_nbytes / _GIB, sampler.memory_gb, sampler.rotate_steps)

    # ------------------------------------------------------------------ public API

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """Shape of one tile, ``(T, M, 1)``."""
        return (self.geometry.tile_frames, self.n_mels, 1)

    @property
    def worker_shards(self) -> list[str]:
        """Names of the shards this worker reads (whole or, with few shards, in part)."""
        return sorted({u.shard for u in self._units})

    def dataset(self, start_step: int = 0, with_indices: bool = False) -> tf.data.Dataset:
        """The infinite stream of triplet batches, starting at batch ``start_step``.

        Parameters
        ----------
        start_step : int
            Global step of the first batch; ``dataset(k)`` yields exactly batches
            ``k, k+1, ...`` of ``dataset(0)``.
        with_indices : bool
            Also return ``anchor_start``, ``neighbour_start``, ``opposite_start`` (tile
            start frames) and ``neighbour_clip`` (index row), int32 (B,); for tests.

        Returns
        -------
        tf.data.Dataset
            Dicts with ``anchor``, ``neighbour``, ``opposite`` float32 (B, T, M, 1);
            ``anchor_clip``, ``opposite_clip`` int32 (B,) (rows of ``cache.index``);
            ``anchor_group``, ``opposite_group`` int32 (B,) (group codes).
        """
        start_step = int(start_step)
        if start_step < 0:
            raise Tile2AudioError(f"start_step must be >= 0, got {start_step}")
        steps = self.config.rotate_steps
        first = start_step // steps if self.rotating else 0
        # Load the first pool now, so a broken cache fails here with a clear error.
        self._preloaded = {first: self._pool_arrays(first)}
        pools = tf.data.Dataset.range(first, _NO_END if self.rotating else 1)
        pools = pools.map(self._load_pool_op)

        def batches(p, pool):
            if self.rotating:
                lo, hi = tf.maximum(p * steps, start_step), (p + 1) * steps
            else:
                lo, hi = tf.constant(start_step, tf.int64), tf.constant(_NO_END, tf.int64)
            return tf.data.Dataset.range(lo, hi).map(
                lambda step: self._sample_batch(step, pool, with_indices),
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

        # flat_map releases a pool before loading the next: one pool in memory at a time.
        return pools.flat_map(batches).prefetch(tf.data.AUTOTUNE)

    # ------------------------------------------------------------------ setup helpers

    def _distant_frames(self) -> int:
        """Minimum anchor/opposite start distance in distant mode (beyond the neighbourhood)."""
        seconds = self.config.distant_min_seconds
        if seconds is None:
            seconds = 2.0 * self.tiles.neighbourhood_seconds
        frames = frames_for(seconds, self.geometry.frames_per_second)
        return max(frames, self.geometry.neighbourhood_frames + 1)

    def _eligible_rows(self, index: pd.DataFrame) -> np.ndarray:
        """Index rows this sampler may draw from (labelled clips only in supervised mode)."""
        rows = np.flatnonzero(index["n_frames"].to_numpy() >= 1)
        if len(rows) < len(index):
            log.warning("sampler: skipping %d clip(s) with no frames", len(index) - len(rows))
        if self.config.mode == "supervised":
            labelled = self._label_codes[rows] >= 0
            if not labelled.any():
                raise Tile2AudioError(
                    "sampler.mode 'supervised' needs labels, but no clip in the cache has one; "
                    "use a label-free mode (tile2vec) or a manifest with a label column")
            if not labelled.all():
                log.warning("supervised sampler: leaving out %d clip(s) without a label", int((~labelled).sum()))
            rows = rows[labelled]
            if len(np.unique(self._label_codes[rows])) < 2:
                raise Tile2AudioError("sampler.mode 'supervised' needs at least two distinct labels")
        if self.config.clip_fraction < 1.0:
            # A seeded subset of the clips (for learning curves); the probes still see every clip.
            keep = max(2, int(round(self.config.clip_fraction * len(rows))))
            rows = np.sort(np.random.default_rng(self.seed).choice(rows, size=min(keep, len(rows)), replace=False))
            log.info("sampler: training on %d of the cache's clips (sampler.clip_fraction %.2f)", len(rows),
                     self.config.clip_fraction)
        return rows

    def _clip_nbytes(self, rows: np.ndarray) -> np.ndarray:
        """float32 bytes of each clip once padded to one tile."""
        frames = np.maximum(self._index["n_frames"].to_numpy()[rows], self.geometry.tile_frames)
        return frames.astype(np.int64) * self.n_mels * 4

    def _worker_units(self, rows: np.ndarray) -> list[_Unit]:
        """This worker's shards (or clips) as load units, each within the budget if possible."""
        shards = [str(s) for s in self.cache.shards]
        shard_of = self._index["shard"].astype(str).to_numpy()
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
            units.extend(self._split_unit(_Unit(name, r, nbytes)))
        if not units:
            raise Tile2AudioError(
                f"sampler worker {self.worker_index} of {self.num_workers} has no clips to sample from "
                f"({len(shards)} shard(s), {len(rows)} usable clip(s) in the cache)")
        return units

    def _split_unit(self, unit: _Unit) -> list[_Unit]:
        """Split a unit larger than the budget into runs of clips that fit."""
        if unit.nbytes <= self.budget_nbytes or len(unit.rows) == 1:
            if unit.nbytes > self.budget_nbytes:
                log.warning("clip %s alone is larger than sampler.memory_gb; loading it anyway",
                            self._index["clip_id"].iloc[int(unit.rows[0])])
            return [unit]
        sizes = self._clip_nbytes(unit.rows)
        parts, start, total = [], 0, 0
        for i, size in enumerate(sizes):
            if total and total + size > self.budget_nbytes:
                parts.append(_Unit(unit.shard, unit.rows[start:i], int(total)))
                start, total = i, 0
            total += int(size)
        parts.append(_Unit(unit.shard, unit.rows[start:], int(total)))
        return parts

    def _check_enough_clips(self) -> None:
        """Raise when the mode cannot form triplets from this worker's clips; warn when it barely can."""
        rows = np.concatenate([u.rows for u in self._units])
        if len(rows) < 2:
            raise Tile2AudioError(
                f"the triplet sampler needs at least two clips (worker {self.worker_index} has {len(rows)})")
        supervised = self.config.mode == "supervised"
        codes = self._label_codes if supervised else self._group_codes
        if len(np.unique(codes[rows])) < 2:
            what = "label" if supervised else "group"
            log.warning("all clips of worker %d share one %s: opposites will come from other clips "
                        "of the same %s", self.worker_index, what, what)

    def _band_normalisation(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-band (scale, offset) undoing the cache's normalisation: raw = x * scale + offset."""
        m = self.n_mels
        if self.cache.params.normalize == "standardize":
            stats = self.cache.stats
            std = np.asarray(stats["std"], dtype=np.float32).reshape(-1)
            mean = np.asarray(stats["mean"], dtype=np.float32).reshape(-1)
            if std.shape != (m,) or mean.shape != (m,):
                raise Tile2AudioError(f"cache stats have {std.shape} / {mean.shape} bands, expected ({m},)")
            return np.maximum(std, STD_FLOOR), mean
        return np.ones(m, np.float32), np.zeros(m, np.float32)

    # ------------------------------------------------------------------ pools

    def _round_units(self, r: int) -> list[list[int]]:
        """Pools (lists of unit numbers) of rotation round ``r``: a seeded shuffle packed greedily."""
        while len(self._rounds) <= r:
            k = len(self._rounds)
            rng = np.random.default_rng([self.seed & 0x7FFFFFFFFFFFFFFF, self.worker_index, k])
            pools, current, total = [], [], 0
            for i in rng.permutation(len(self._units)):
                size = self._units[i].nbytes
                if current and total + size > self.budget_nbytes:
                    pools.append(current)
                    current, total = [], 0
                current.append(int(i))
                total += size
            pools.append(current)
            self._rounds.append(pools)
        return self._rounds[r]

    def _pool_units(self, pool: int) -> list[int]:
        """Unit numbers of pool number ``pool`` (all units when not rotating)."""
        if not self.rotating:
            return list(range(len(self._units)))
        r = 0
        while pool >= len(self._round_units(r)):
            pool -= len(self._round_units(r))
            r += 1
        return self._round_units(r)[pool]

    def _load_pool_op(self, p: tf.Tensor):
        """Graph op: load pool ``p`` with a py_function; returns (p, dict of tensors)."""
        dtypes = [self.pool_dtype] + [_POOL_DTYPES[name] for name in PoolArrays._fields[1:]]
        out = tf.py_function(lambda q: self._pool_arrays_once(int(q)), [p], Tout=dtypes)
        frames = out[0]
        frames.set_shape([None, self.n_mels])
        pool = {"frames": frames}
        for name, t in zip(PoolArrays._fields[1:], out[1:]):
            t.set_shape([None])
            pool[name] = t
        return p, pool

    def _pool_arrays_once(self, p: int) -> list[np.ndarray]:
        """Pool ``p``'s arrays, taking the eagerly preloaded first pool when it is there."""
        arrays = self._preloaded.pop(p, None)
        return list(arrays if arrays is not None else self._pool_arrays(p))

    def _pool_arrays(self, p: int) -> PoolArrays:
        """Load pool ``p`` from the cache: frames, per-clip offsets/lengths and sampling tables."""
        units = [self._units[i] for i in self._pool_units(p)]
        rows = np.concatenate([u.rows for u in units])
        clip_ids = self._index["clip_id"].iloc[rows].astype(str).tolist()
        frames, offsets, lengths = self.cache.frames_block(clip_ids)
        # Cast first: the float32 block is freed before padding copies anything.
        frames = np.asarray(frames).astype(self.pool_dtype.as_numpy_dtype, copy=False)
        frames, offsets, lengths = self._pad_short(frames, np.asarray(offsets), np.asarray(lengths))
        if frames.shape[0] >= 2**31:
            raise Tile2AudioError("a sampler pool has more than 2**31 frames; lower sampler.memory_gb")
        groups = self._group_codes[rows]
        g_order, g_start, g_count, _ = _blocks(groups)
        l_order, l_start, l_count, l_rank = _blocks(self._label_codes[rows])
        s_clip, o_clip = self._clip_normalisation(rows)
        record = PoolRecord(p, tuple(u.shard for u in units), len(rows), int(sum(u.nbytes for u in units)))
        self._warn_if_uniform(record, l_count if self.config.mode == "supervised" else g_count)
        self.loaded_pools.append(record)
        log.debug("sampler worker %d loaded pool %d: %d clips, %.1f MiB", self.worker_index, p,
                  record.n_clips, record.nbytes / 2**20)
        i32 = np.int32
        return PoolArrays(frames=frames, offsets=offsets.astype(i32), lengths=lengths.astype(i32),
                          rows=rows.astype(i32), groups=groups.astype(i32), g_order=g_order, g_start=g_start,
                          g_count=g_count, l_order=l_order, l_start=l_start, l_count=l_count, l_rank=l_rank,
                          s_clip=s_clip, o_clip=o_clip)

    def _warn_if_uniform(self, record: PoolRecord, block_count: np.ndarray) -> None:
        """Warn when a rotating pool has one group (label) only, so opposites share it."""
        if self.rotating and len(block_count) and block_count[0] == len(block_count):
            what = "label" if self.config.mode == "supervised" else "group"
            log.warning("sampler pool %d (shards %s) holds a single %s: its opposites share the anchor's %s; "
                        "raise sampler.memory_gb or mix groups across shards", record.pool,
                        ", ".join(record.shards), what, what)

    def _pad_short(self, frames: np.ndarray, offsets: np.ndarray, lengths: np.ndarray):
        """Loop clips shorter than one tile up to one tile (two with view positives: the front end's padding rule).

        With view positives a clip is looped to two tiles, so that two crops of a clip
        shorter than a tile are time shifts of it through the loop, not the same frames.
        """
        t = self.geometry.tile_frames * (2 if self.view else 1)
        if frames.ndim != 2 or frames.shape[1] != self.n_mels or len(offsets) != len(lengths):
            raise Tile2AudioError(
                f"cache.frames_block returned frames {frames.shape} for {len(lengths)} clips; "
                f"expected (rows, {self.n_mels})")
        if (lengths >= t).all():
            return frames, offsets, lengths
        pieces = [frames[o:o + n] if n >= t else loop_pad(frames[o:o + n], t)
                  for o, n in zip(offsets.tolist(), lengths.tolist())]
        new_lengths = np.array([len(x) for x in pieces], dtype=np.int64)
        new_offsets = np.concatenate([[0], np.cumsum(new_lengths)[:-1]]).astype(np.int64)
        return np.concatenate(pieces, axis=0), new_offsets, new_lengths

    def _clip_normalisation(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-clip (scale, offset) undoing minmax normalisation (ones and zeros otherwise)."""
        n = len(rows)
        if self.cache.params.normalize != "minmax" or not self.config.augment:
            return np.ones(n, np.float32), np.zeros(n, np.float32)
        lo = self._index["min"].to_numpy(dtype=np.float64)[rows]
        hi = self._index["max"].to_numpy(dtype=np.float64)[rows]
        return np.maximum(hi - lo, MIN_SCALE).astype(np.float32), lo.astype(np.float32)

    # ------------------------------------------------------------------ graph: one batch

    def _sample_batch(self, step: tf.Tensor, pool: dict, with_indices: bool) -> dict:
        """Graph function: batch number ``step`` drawn from ``pool``."""
        key = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(self.seed, tf.int64), step]), self.worker_index)
        keys = tf.random.experimental.stateless_split(key, 2)
        u = tf.random.stateless_uniform([_N_UNIFORMS, self.batch_size], seed=keys[0], dtype=tf.float64)
        if self.config.mode == "supervised":
            clips, starts = self._draw_supervised(u, pool)
        else:
            clips, starts = self._draw_tile2vec(u, pool, self.config.mode == "tile2vec-distant")
        tiles = self._gather_tiles(pool, clips, starts)
        if self.config.augment:
            tiles = self._augment(tiles, clips, pool, keys[1])
        return self._assemble(tiles, clips, starts, pool, with_indices)

    def _draw_tile2vec(self, u: tf.Tensor, pool: dict, distant: bool):
        """Clip positions and starts (each (3B,)) for tile2vec / tile2vec-distant."""
        g = self.geometry
        n_clips = tf.size(pool["offsets"])
        a = randint(u[0], n_clips)
        span = tf.gather(pool["lengths"], a) - g.tile_frames
        if self.view:
            # Two independent crops of the clip (each augmented on its own when augment is on).
            a_s, n_s = randint(u[1], span + 1), randint(u[2], span + 1)
        else:
            a_s = self._anchor_start(u[1], span)
            n_s = self._neighbour_start(u[2], a_s, span)
        o, found = outside_block(u[3], tf.gather(pool["g_start"], a), tf.gather(pool["g_count"], a),
                                  n_clips, pool["g_order"])
        o = tf.where(found, o, other_clip(u[3], a, n_clips))
        o_s = randint(u[4], tf.gather(pool["lengths"], o) - g.tile_frames + 1)
        if distant:
            d = self.distant_frames
            far, far_ok = two_segments(u[6], 0, a_s - d, a_s + d, span)
            same = (u[5] < self.config.distant_prob) & far_ok
            o = tf.where(same, a, o)
            o_s = tf.where(same, far, o_s)
        return tf.concat([a, a, o], 0), tf.concat([a_s, n_s, o_s], 0)

    def _anchor_start(self, u: tf.Tensor, span: tf.Tensor) -> tf.Tensor:
        """Anchor starts, uniform over the starts that leave room for a neighbour >= min gap away."""
        gap = self.geometry.min_gap_frames
        start, ok = two_segments(u, 0, span - gap, tf.maximum(gap, span - gap + 1), span)
        return tf.where(ok, start, randint(u, span + 1))

    def _neighbour_start(self, u: tf.Tensor, a_s: tf.Tensor, span: tf.Tensor) -> tf.Tensor:
        """Neighbour starts within the neighbourhood and >= min gap from the anchor (farthest if impossible)."""
        gap, hood = self.geometry.min_gap_frames, self.geometry.neighbourhood_frames
        lo = tf.maximum(a_s - hood, 0)
        hi = tf.minimum(a_s + hood, span)
        start, ok = two_segments(u, lo, a_s - gap, a_s + max(gap, 1), hi)
        farthest = tf.where(a_s - lo >= hi - a_s, lo, hi)
        return tf.where(ok, start, farthest)

    def _draw_supervised(self, u: tf.Tensor, pool: dict):
        """Clip positions and starts (each (3B,)) for the supervised mode."""
        t = self.geometry.tile_frames
        n_clips = tf.size(pool["offsets"])
        a = randint(u[0], n_clips)
        a_s = randint(u[1], tf.gather(pool["lengths"], a) - t + 1)
        l_start, l_count = tf.gather(pool["l_start"], a), tf.gather(pool["l_count"], a)
        n, found = inside_block_excluding(u[2], l_start, l_count, tf.gather(pool["l_rank"], a), pool["l_order"])
        n = tf.where(found, n, a)
        n_s = randint(u[3], tf.gather(pool["lengths"], n) - t + 1)
        o, found = outside_block(u[4], l_start, l_count, n_clips, pool["l_order"])
        o = tf.where(found, o, other_clip(u[4], a, n_clips))
        o_s = randint(u[5], tf.gather(pool["lengths"], o) - t + 1)
        return tf.concat([a, n, o], 0), tf.concat([a_s, n_s, o_s], 0)

    def _gather_tiles(self, pool: dict, clips: tf.Tensor, starts: tf.Tensor) -> tf.Tensor:
        """Cut tiles (n,) clips x starts -> float32 (n, T, M) with one gather."""
        first = tf.gather(pool["offsets"], clips) + starts
        rows = first[:, None] + tf.range(self.geometry.tile_frames, dtype=tf.int32)[None, :]
        return tf.cast(tf.gather(pool["frames"], rows), tf.float32)

    def _assemble(self, tiles, clips, starts, pool, with_indices: bool) -> dict:
        """Split the (3B, T, M) tiles into the batch dict."""
        b = self.batch_size
        tiles = tf.ensure_shape(tiles, [3 * b, self.geometry.tile_frames, self.n_mels])[..., None]
        a_c, n_c, o_c = tf.split(clips, 3)
        out = {
            "anchor": tiles[:b], "neighbour": tiles[b:2 * b], "opposite": tiles[2 * b:],
            "anchor_clip": tf.gather(pool["rows"], a_c), "opposite_clip": tf.gather(pool["rows"], o_c),
            "anchor_group": tf.gather(pool["groups"], a_c), "opposite_group": tf.gather(pool["groups"], o_c),
        }
        if with_indices:
            a_s, n_s, o_s = tf.split(starts, 3)
            out.update(anchor_start=a_s, neighbour_start=n_s, opposite_start=o_s,
                       neighbour_clip=tf.gather(pool["rows"], n_c))
        return out

    # ------------------------------------------------------------------ graph: augmentation

    def _augment(self, tiles: tf.Tensor, clips: tf.Tensor, pool: dict, key: tf.Tensor) -> tf.Tensor:
        """Mix, gain and SpecAugment masks, per tile, in the un-normalised log domain."""
        cfg = self.config
        n, t, m = 3 * self.batch_size, self.geometry.tile_frames, self.n_mels
        keys = tf.random.experimental.stateless_split(key, 3)
        u = tf.random.stateless_uniform([4, n], seed=keys[0], dtype=tf.float64)
        scale, offset = self._affine(pool, clips)
        gain_db = tf.cast((2.0 * u[3] - 1.0) * cfg.gain_db, tf.float32)[:, None, None]
        gain = gain_db * (math.log(10.0) / 10.0 * self._log_unit()) / scale
        keep_t = 1.0 - tf.cast(band_mask(keys[1], cfg.time_masks, n, t, cfg.time_mask_fraction), tf.float32)
        keep_f = 1.0 - tf.cast(band_mask(keys[2], cfg.freq_masks, n, m, cfg.freq_mask_fraction), tf.float32)
        keep_t, keep_f = keep_t[:, :, None], keep_f[:, None, :]
        if cfg.mix_prob > 0:
            return mix_gain_mask(tiles, *self._mix_terms(u, clips, pool, scale, offset), gain, keep_t, keep_f)
        return gain_mask(tiles, gain, keep_t, keep_f)

    def _affine(self, pool: dict, clips: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(scale, offset), each (n, 1, M), with raw log-mel = normalised * scale + offset."""
        band_scale, band_offset = (tf.constant(v, tf.float32) for v in self._band_affine)
        scale = tf.gather(pool["s_clip"], clips)[:, None, None] * band_scale
        offset = tf.gather(pool["o_clip"], clips)[:, None, None] + band_offset
        return scale, offset

    def _mix_terms(self, u, clips, pool, scale, offset):
        """Partner tiles of other clips and the (n, 1, M) factors of :func:`~tile2audio.augment.mix_gain_mask`.

        With natural-log powers ``x_ln = (x * scale + offset) / unit`` the power sum is
        ``x_ln + softplus(y_ln - x_ln)``; back in normalised units that is
        ``x + softplus(partner * a - x * b + c) * k``, and ``k = 0`` leaves a tile unmixed.
        """
        other = other_clip(u[0], clips, tf.size(pool["offsets"]))
        other_start = randint(u[1], tf.gather(pool["lengths"], other) - self.geometry.tile_frames + 1)
        partner = self._gather_tiles(pool, other, other_start)
        o_scale, o_offset = self._affine(pool, other)
        unit = self._log_unit()
        a, b = o_scale / unit, scale / unit
        c = (o_offset - offset) / unit + self.config.mix_gain_db * math.log(10.0) / 10.0
        chosen = tf.cast(u[2] < self.config.mix_prob, tf.float32)[:, None, None]
        return partner, a, b, c, chosen * unit / scale

    def _log_unit(self) -> float:
        """Feature units per natural-log unit of power (see :func:`tile2audio.augment.log_unit`)."""
        return log_unit(self.cache.params.log)


# ---------------------------------------------------------------------- index helpers

def _check_args(batch_size, seed, worker_index, num_workers, pool_dtype) -> None:
    """Validate the constructor's scalar arguments."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise Tile2AudioError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise Tile2AudioError(f"seed must be an integer, got {seed!r}")
    if not (isinstance(num_workers, (int, np.integer)) and num_workers >= 1
            and isinstance(worker_index, (int, np.integer)) and 0 <= worker_index < num_workers):
        raise Tile2AudioError(f"need 0 <= worker_index < num_workers, got {worker_index!r} of {num_workers!r}")
    if pool_dtype not in ("float16", "float32"):
        raise Tile2AudioError(f"pool_dtype must be 'float16' or 'float32', got {pool_dtype!r}")


def _checked_index(index: pd.DataFrame) -> pd.DataFrame:
    """The cache index with a clean 0..n-1 row numbering, or an error naming missing columns."""
    missing = [c for c in ("clip_id", "shard", "n_frames") if c not in index.columns]
    if missing:
        raise Tile2AudioError(f"the cache index lacks column(s) {missing}; rebuild the cache")
    if len(index) == 0:
        raise Tile2AudioError("the feature cache holds no clips")
    return index.reset_index(drop=True)


def _group_codes(index: pd.DataFrame) -> np.ndarray:
    """int32 group code per row; a row without group gets a code of its own."""
    groups = text_column(index, "group", strip=True)
    codes = np.empty(len(index), dtype=np.int64)
    named = groups != ""
    codes[named] = pd.factorize(groups[named])[0]
    n_named = int(codes[named].max()) + 1 if named.any() else 0
    codes[~named] = n_named + np.arange(int((~named).sum()))
    return codes.astype(np.int32)


def _label_codes(index: pd.DataFrame) -> np.ndarray:
    """int32 label code per row, -1 where there is no label."""
    labels = text_column(index, "label", strip=True)
    codes = np.full(len(index), -1, dtype=np.int32)
    named = labels != ""
    codes[named] = pd.factorize(labels[named])[0]
    return codes


def _blocks(codes: np.ndarray):
    """Sort clips by code: (order, block start, block size, rank of each clip), all int32 (C,)."""
    order = np.argsort(codes, kind="stable")
    ordered = codes[order]
    start = np.searchsorted(ordered, codes, side="left")
    count = np.searchsorted(ordered, codes, side="right") - start
    rank = np.empty(len(codes), dtype=np.int64)
    rank[order] = np.arange(len(codes))
    return (order.astype(np.int32), start.astype(np.int32), count.astype(np.int32), rank.astype(np.int32))
