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

Views (``sampler.views: byola``) follow the augmentation, from a key folded from its
seed (so neither the draws nor the augmentation change): :func:`tile2audio.augment.byola_views`
on each of the three tiles. The partner of log-mixup-exp is a uniform tile of a clip of
the pool (:func:`tile2audio.draws.mix_partners`): the pool in memory stands in for
BYOL-A's FIFO memory of past tiles (same distribution, no state, exact resume). With
``with_indices`` the batch also carries ``anchor_partner``, ``neighbour_partner`` and
``opposite_partner`` (index rows of the partner clips) when mixing is on.

Silence (``sampler.skip_silence``): each pool marks, once at load
(:func:`tile2audio.pools.non_silent_starts`), the starts whose tile is mostly
non-silent, as per-clip rank tables; every start of the batch (and of the mixing
partners) is then drawn uniformly among them (:func:`tile2audio.draws.allowed_start`),
the neighbour within its neighbourhood and gap when such a start exists.

Errors: the first pool is loaded when :meth:`TripletSampler.dataset` is called, so a
broken cache raises :class:`~tile2audio.errors.Tile2AudioError` there; a later pool that
fails to load surfaces as a ``tf.errors`` exception carrying the same message.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import tensorflow as tf

from .augment import augment_tiles, byola_views, log_unit
from .config import SamplerConfig, TileConfig, TrainingConfig, frames_for
from .draws import allowed_start, gather_tiles, mix_partners, randint, supervised_draw, tile2vec_draw
from .errors import Tile2AudioError
from .pools import (GIB, FeatureSource, PoolArrays, PoolPlan, PoolRecord, SilenceRule, band_normalisation,
                    eligible_rows, group_codes, label_codes, load_pool)
from .rules import choose_training
from .tiles import TileGeometry

log = logging.getLogger(__name__)

__all__ = ["TripletSampler", "FeatureSource", "PoolArrays", "PoolRecord"]

_NO_END = 2**62  # "infinite" step range; never reached
_N_UNIFORMS = 8  # uniforms per triplet for the index draws (fixed, so modes stay comparable)

#: The tf dtype of every PoolArrays field but ``frames`` (whose dtype is the pool dtype).
_POOL_DTYPES = {name: (tf.float32 if name in ("s_clip", "o_clip") else tf.int32) for name in PoolArrays._fields[1:]}


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
    plan : PoolPlan
        The worker's load units and their packing into pools (:mod:`tile2audio.pools`).
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
        self._manifest_groups = group_codes(index)
        # Without exclusion every clip is its own group, for the opposites and the loss's negatives alike.
        self._group_codes = (self._manifest_groups if sampler.exclude_group_opposites
                             else np.arange(len(index), dtype=np.int32))
        if sampler.same_group_prob > 0 and sampler.exclude_group_opposites is True:
            raise Tile2AudioError("sampler.same_group_prob needs sampler.exclude_group_opposites: false "
                                  "(opposites cannot be both barred from and drawn from the anchor's group)")
        self._label_codes = label_codes(index)
        rows = eligible_rows(index, self._label_codes, sampler.mode, sampler.clip_fraction, self.seed)
        self.plan = PoolPlan(cache, index, rows, self.geometry.tile_frames, int(sampler.memory_gb * GIB), self.seed,
                             self.worker_index, self.num_workers)
        self._check_enough_clips()
        self._band_affine = band_normalisation(cache)
        self._log_unit = log_unit(cache.params.log)
        self._preloaded: dict[int, PoolArrays] = {}
        self.loaded_pools: list[PoolRecord] = []
        if self.rotating:
            log.info("sampler worker %d: %.2f GiB of features > budget %.2f GiB: rotating pools every %d steps",
                     self.worker_index, self.total_nbytes / GIB, sampler.memory_gb, sampler.rotate_steps)

    # ------------------------------------------------------------------ public API

    @property
    def tile_shape(self) -> tuple[int, int, int]:
        """Shape of one tile, ``(T, M, 1)``."""
        return (self.geometry.tile_frames, self.n_mels, 1)

    @property
    def rotating(self) -> bool:
        """True when the worker's data exceeds ``sampler.memory_gb`` and pools rotate."""
        return self.plan.rotating

    @property
    def total_nbytes(self) -> int:
        """This worker's data as float32, in bytes."""
        return self.plan.total_nbytes

    @property
    def budget_nbytes(self) -> int:
        """The memory budget of one pool, in bytes."""
        return self.plan.budget_nbytes

    @property
    def worker_shards(self) -> list[str]:
        """Names of the shards this worker reads (whole or, with few shards, in part)."""
        return sorted({u.shard for u in self.plan.units})

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

    def _check_enough_clips(self) -> None:
        """Raise when the mode cannot form triplets from this worker's clips; warn when it barely can."""
        rows = self.plan.rows
        if len(rows) < 2:
            raise Tile2AudioError(
                f"the triplet sampler needs at least two clips (worker {self.worker_index} has {len(rows)})")
        supervised = self.config.mode == "supervised"
        codes = self._label_codes if supervised else self._group_codes
        if len(np.unique(codes[rows])) < 2:
            what = "label" if supervised else "group"
            log.warning("all clips of worker %d share one %s: opposites will come from other clips "
                        "of the same %s", self.worker_index, what, what)

    # ------------------------------------------------------------------ pools

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

    def _silence_rule(self) -> SilenceRule | None:
        """How pools mark silence, or None without ``sampler.skip_silence``."""
        cfg = self.config
        if not cfg.skip_silence:
            return None
        return SilenceRule(cfg.silence_db, cfg.silence_tile_fraction, self.geometry.tile_frames, self._band_affine,
                           self._log_unit)

    def _pool_arrays(self, p: int) -> PoolArrays:
        """Load pool ``p`` (two tiles of looping for view positives, so two crops of a short clip differ)."""
        arrays, record = load_pool(
            self.cache, self._index, self.plan.pool_units(p), p,
            pad_frames=self.geometry.tile_frames * (2 if self.view else 1), groups=self._group_codes,
            labels=self._label_codes, dtype=self.pool_dtype.as_numpy_dtype,
            augment=bool(self.config.augment) or self.config.byola, silence=self._silence_rule(),
            manifest_groups=self._manifest_groups)
        self._warn_if_uniform(record, arrays.l_count if self.config.mode == "supervised" else arrays.g_count)
        self.loaded_pools.append(record)
        log.debug("sampler worker %d loaded pool %d: %d clips, %.1f MiB", self.worker_index, p,
                  record.n_clips, record.nbytes / 2**20)
        return arrays

    def _warn_if_uniform(self, record: PoolRecord, block_count: np.ndarray) -> None:
        """Warn when a rotating pool has one group (label) only, so opposites share it."""
        if self.rotating and len(block_count) and block_count[0] == len(block_count):
            what = "label" if self.config.mode == "supervised" else "group"
            log.warning("sampler pool %d (shards %s) holds a single %s: its opposites share the anchor's %s; "
                        "raise sampler.memory_gb or mix groups across shards", record.pool,
                        ", ".join(record.shards), what, what)

    # ------------------------------------------------------------------ graph: one batch

    def _sample_batch(self, step: tf.Tensor, pool: dict, with_indices: bool) -> dict:
        """Graph function: batch number ``step`` drawn from ``pool``."""
        g, cfg = self.geometry, self.config
        key = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(self.seed, tf.int64), step]), self.worker_index)
        keys = tf.random.experimental.stateless_split(key, 2)
        u = tf.random.stateless_uniform([_N_UNIFORMS, self.batch_size], seed=keys[0], dtype=tf.float64)
        if cfg.mode == "supervised":
            clips, starts = supervised_draw(u, pool, g.tile_frames, skip_silence=cfg.skip_silence)
        else:
            distant = cfg.mode == "tile2vec-distant"
            clips, starts = tile2vec_draw(u, pool, g.tile_frames, g.min_gap_frames, g.neighbourhood_frames,
                                          view=self.view, distant_frames=self.distant_frames,
                                          distant_prob=cfg.distant_prob if distant else 0.0,
                                          skip_silence=cfg.skip_silence, same_group_prob=cfg.same_group_prob)
        tiles = gather_tiles(pool, clips, starts, g.tile_frames)
        tiles = tf.ensure_shape(tiles, [3 * self.batch_size, g.tile_frames, self.n_mels])
        if cfg.augment:
            tiles = augment_tiles(tiles, clips, pool, keys[1], cfg, self._band_affine, self._log_unit)
        partners = None
        if cfg.byola:
            # A key of its own (folded from the augmentation's), so the draws above never change.
            tiles, partners = self._views(tiles, clips, pool, tf.random.experimental.stateless_fold_in(keys[1], 1))
        out = self._assemble(tiles, clips, starts, pool, with_indices)
        if with_indices and partners is not None:
            p_a, p_n, p_o = tf.split(tf.gather(pool["rows"], partners), 3)
            out.update(anchor_partner=p_a, neighbour_partner=p_n, opposite_partner=p_o)
        return out

    def _views(self, tiles, clips, pool, key):
        """BYOL-A views of the (3B, T, M) tiles; returns (tiles, partner clip positions (3B,) or None)."""
        cfg, b, t = self.config.view_settings, self.batch_size, self.geometry.tile_frames
        keys = tf.random.experimental.stateless_split(key, 2)
        partner = partners = None
        if cfg.mixup_ratio > 0:
            u = tf.random.stateless_uniform([6, b], seed=keys[0], dtype=tf.float64)
            partners = mix_partners(u, clips[:b], pool)  # rows 0-2
            p_starts = self._start_draw(tf.reshape(u[3:], [-1]), partners, pool)
            partner = gather_tiles(pool, partners, p_starts, t)
        views = byola_views(tiles, clips, partner, partners, pool, keys[1], cfg, self._band_affine, self._log_unit)
        return tf.ensure_shape(views, [3 * b, t, self.n_mels]), partners

    def _start_draw(self, u, clips, pool):
        """Uniform tile starts (int32, like ``clips``) of pool clips ``clips`` (allowed ones with skip_silence)."""
        if self.config.skip_silence:
            return allowed_start(u, pool, clips)
        return randint(u, tf.gather(pool["lengths"], clips) - self.geometry.tile_frames + 1)

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


# ---------------------------------------------------------------------- argument checks

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
