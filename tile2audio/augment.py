"""Log-domain augmentation of tiles: SpecAugment band masks, gain and power-sum mixing.

The tiles are in normalised units; :func:`augment_tiles` turns gain and mixing (defined
on the un-normalised log power) into factors in those units, and the XLA-compiled
element-wise functions apply them. Masked cells are set to the tile's mean.
"""

from __future__ import annotations

import math

import tensorflow as tf

from .config import SamplerConfig
from .draws import gather_tiles, other_clip, randint


def log_unit(log: str) -> float:
    """Feature units per natural-log unit of power: 10/ln10 for ``features.log`` ``db``, 1 for ``log``."""
    return 10.0 / math.log(10.0) if log == "db" else 1.0


def band_mask(key, count: int, n: int, size: int, fraction: float) -> tf.Tensor:
    """SpecAugment mask (n, size): ``count`` bands per row, each up to fraction*size wide."""
    widest = int(math.floor(fraction * size))
    if count <= 0 or widest <= 0:
        return tf.zeros([n, size], tf.bool)
    u = tf.random.stateless_uniform([2, count, n], seed=key, dtype=tf.float64)
    width = randint(u[0], widest + 1)
    start = randint(u[1], size - width + 1)
    pos = tf.range(size, dtype=tf.int32)
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return tf.reduce_any(inside, axis=0)


@tf.function(jit_compile=True)
def gain_mask(x, gain, keep_t, keep_f):
    """Add the gain, then set masked cells to the tile mean (one fused XLA loop)."""
    x = x + gain
    fill = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    return fill + (x - fill) * (keep_t * keep_f)


@tf.function(jit_compile=True)
def mix_gain_mask(x, partner, a, b, c, k, gain, keep_t, keep_f):
    """Power-sum mix with ``partner`` (see :func:`mix_terms`), then gain and masks."""
    return gain_mask(x + tf.math.softplus(partner * a - x * b + c) * k, gain, keep_t, keep_f)


def augment_tiles(tiles: tf.Tensor, clips: tf.Tensor, pool: dict, key: tf.Tensor, config: SamplerConfig,
                  band_affine: tuple, unit: float) -> tf.Tensor:
    """Mix, gain and SpecAugment masks, per tile, in the un-normalised log domain.

    Parameters
    ----------
    tiles : tf.Tensor, float32 (n, T, M)
        Normalised tiles.
    clips : tf.Tensor, int32 (n,)
        Pool clip position of each tile.
    pool : dict
        Pool tensors (fields of :class:`tile2audio.pools.PoolArrays`).
    key : tf.Tensor
        Stateless seed of this batch's augmentation.
    config : SamplerConfig
        Gain, mask and mix settings.
    band_affine : (ndarray, ndarray)
        Per-band (scale, offset), float32 (M,), with raw = normalised * scale + offset.
    unit : float
        Feature units per natural-log unit of power (:func:`log_unit`).

    Returns
    -------
    tf.Tensor, float32 (n, T, M)
    """
    n, t, m = tiles.shape
    keys = tf.random.experimental.stateless_split(key, 3)
    u = tf.random.stateless_uniform([4, n], seed=keys[0], dtype=tf.float64)
    scale, offset = affine(pool, clips, band_affine)
    gain_db = tf.cast((2.0 * u[3] - 1.0) * config.gain_db, tf.float32)[:, None, None]
    gain = gain_db * (math.log(10.0) / 10.0 * unit) / scale
    keep_t = 1.0 - tf.cast(band_mask(keys[1], config.time_masks, n, t, config.time_mask_fraction), tf.float32)
    keep_f = 1.0 - tf.cast(band_mask(keys[2], config.freq_masks, n, m, config.freq_mask_fraction), tf.float32)
    keep_t, keep_f = keep_t[:, :, None], keep_f[:, None, :]
    if config.mix_prob > 0:
        terms = mix_terms(u, clips, pool, scale, offset, band_affine, unit, config, t)
        return mix_gain_mask(tiles, *terms, gain, keep_t, keep_f)
    return gain_mask(tiles, gain, keep_t, keep_f)


def affine(pool: dict, clips: tf.Tensor, band_affine: tuple) -> tuple[tf.Tensor, tf.Tensor]:
    """(scale, offset), each (n, 1, M), with raw log-mel = normalised * scale + offset."""
    band_scale, band_offset = (tf.constant(v, tf.float32) for v in band_affine)
    scale = tf.gather(pool["s_clip"], clips)[:, None, None] * band_scale
    offset = tf.gather(pool["o_clip"], clips)[:, None, None] + band_offset
    return scale, offset


def mix_terms(u, clips, pool, scale, offset, band_affine, unit, config: SamplerConfig, tile_frames: int):
    """Partner tiles of other clips and the (n, 1, M) factors of :func:`mix_gain_mask`.

    With natural-log powers ``x_ln = (x * scale + offset) / unit`` the power sum is
    ``x_ln + softplus(y_ln - x_ln)``; back in normalised units that is
    ``x + softplus(partner * a - x * b + c) * k``, and ``k = 0`` leaves a tile unmixed.
    """
    other = other_clip(u[0], clips, tf.size(pool["offsets"]))
    other_start = randint(u[1], tf.gather(pool["lengths"], other) - tile_frames + 1)
    partner = gather_tiles(pool, other, other_start, tile_frames)
    o_scale, o_offset = affine(pool, other, band_affine)
    a, b = o_scale / unit, scale / unit
    c = (o_offset - offset) / unit + config.mix_gain_db * math.log(10.0) / 10.0
    chosen = tf.cast(u[2] < config.mix_prob, tf.float32)[:, None, None]
    return partner, a, b, c, chosen * unit / scale
