"""Log-domain augmentation of tiles: SpecAugment band masks, gain and power-sum mixing,
and BYOL-A's views (log-mixup-exp, random gain and EQ, random resize crop).

The tiles are in normalised units; :func:`augment_tiles` and :func:`byola_views` turn
gain, EQ and mixing (defined on the un-normalised log power) into factors in those
units, and the XLA-compiled element-wise functions apply them. Masked cells are set to
the tile's mean.
"""

from __future__ import annotations

import math

import numpy as np
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


# --------------------------------------------------------------------------- BYOL-A views

#: Floor of the mixing weight l, so log(l) stays finite when a uniform is exactly 0.
_MIN_MIX = 1e-12


@tf.function(jit_compile=True)
def log_mixup_exp(x, partner, a, b, c, k, shift):
    """``x + shift + softplus(partner * a - x * b + c) * k`` (one fused XLA loop; see :func:`byola_views`)."""
    return x + shift + tf.math.softplus(partner * a - x * b + c) * k


def eq_weights(points: int, n_mels: int) -> np.ndarray:
    """Raised-cosine interpolation weights, float32 (points, n_mels), of gains at evenly spaced mel points.

    Each band's gain is a smooth blend of its two nearest points' gains; two points give a tilt.
    """
    pos = np.linspace(0.0, points - 1.0, n_mels) if n_mels > 1 else np.zeros(1)
    left = np.minimum(np.floor(pos).astype(int), points - 2)
    frac = pos - left
    s = 0.5 - 0.5 * np.cos(np.pi * frac)
    w = np.zeros((points, n_mels), np.float32)
    w[left, np.arange(n_mels)] = 1.0 - s
    w[left + 1, np.arange(n_mels)] += s
    return w


def byola_views(tiles: tf.Tensor, clips: tf.Tensor, partner: tf.Tensor | None, partner_clips: tf.Tensor | None,
                pool: dict, key: tf.Tensor, config: SamplerConfig, band_affine: tuple, unit: float) -> tf.Tensor:
    """BYOL-A's views of each tile, each from its own random draws, in the un-normalised log domain.

    With natural-log mel powers ``x_ln = (x * scale + offset) / unit`` (the tile) and
    ``m_ln`` (its partner, with the partner clip's own normalisation), log-mixup-exp is
    ``log((1 - l) exp(x_ln) + l exp(m_ln)) = x_ln + log(1 - l) + softplus(m_ln - x_ln
    + log(l / (1 - l)))``: a weighted sum of the two *powers* (BYOL-A mixes the exp of
    its normalised log-mel; mixing true powers keeps the mix a physical one whatever
    the normalisation). The gain and the EQ curve are added to ``x_ln`` in the same
    fused loop; the random resize crop follows (:func:`resize_crop`).

    Parameters
    ----------
    tiles : tf.Tensor, float32 (n, T, M)
        Normalised tiles.
    clips : tf.Tensor, int32 (n,)
        Pool clip position of each tile.
    partner, partner_clips : tf.Tensor, float32 (n, T, M) and int32 (n,), or None
        The mixing partners (normalised) and their clips; None when ``mixup_ratio`` is 0.
    pool : dict
        Pool tensors (fields of :class:`tile2audio.pools.PoolArrays`).
    key : tf.Tensor
        Stateless seed of this batch's views.
    config : SamplerConfig
        ``mixup_ratio``, ``view_gain_db``, ``eq_db``, ``eq_points`` and the crop settings.
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
    u = tf.random.stateless_uniform([2, n], seed=keys[0], dtype=tf.float64)
    scale, offset = affine(pool, clips, band_affine)
    db = tf.cast((2.0 * u[1] - 1.0) * config.view_gain_db, tf.float32)[:, None, None]
    if config.eq_db > 0:
        g = tf.random.stateless_uniform([n, config.eq_points], seed=keys[1], minval=-config.eq_db,
                                        maxval=config.eq_db, dtype=tf.float32)
        db = db + tf.matmul(g, tf.constant(eq_weights(config.eq_points, m)))[:, None, :]
    shift = db * (math.log(10.0) / 10.0)  # natural-log units
    if config.mixup_ratio > 0:
        lam = tf.maximum(u[0] * config.mixup_ratio, _MIN_MIX)
        shift = shift + tf.cast(tf.math.log1p(-lam), tf.float32)[:, None, None]
        c_mix = tf.cast(tf.math.log(lam) - tf.math.log1p(-lam), tf.float32)[:, None, None]
        o_scale, o_offset = affine(pool, partner_clips, band_affine)
        c = (o_offset - offset) / unit + c_mix
        tiles = log_mixup_exp(tiles, partner, o_scale / unit, scale / unit, c, unit / scale, shift * unit / scale)
    elif config.eq_db > 0 or config.view_gain_db > 0:
        tiles = tiles + shift * unit / scale
    if crop_active(config):
        tiles = resize_crop(tiles, keys[2], config)
    return tiles


def crop_active(config: SamplerConfig) -> bool:
    """False when ``crop_scale_min = crop_scale_max = 1`` (the crop is off)."""
    return not (config.crop_scale_min == 1.0 and config.crop_scale_max == 1.0)


@tf.function(jit_compile=True)
def resize_rows_cols(x, r0, r1, wr, keep_r, c0, c1, wc):
    """Separable bilinear resampling of (n, T, M) tiles at rows r0/r1 (n, T) and columns c0/c1 (n, M).

    Rows with ``keep_r`` 0 (outside the tile, on the canvas) become 0; one fused XLA loop.
    """
    top = tf.gather(x, r0, batch_dims=1)
    rows = top + (tf.gather(x, r1, batch_dims=1) - top) * wr[..., None]
    left = tf.gather(rows, c0, axis=2, batch_dims=1)
    out = left + (tf.gather(rows, c1, axis=2, batch_dims=1) - left) * wc[:, None, :]
    return out * keep_r[..., None]


def _sample_points(start, size, length: int, out: int):
    """Source rows r0, r1 (int32), weights and inside-mask, each (n, out), of a crop resized to ``out``."""
    step = tf.cast(size - 1, tf.float64) / float(max(out - 1, 1))
    pos = tf.cast(start, tf.float64)[:, None] + step[:, None] * tf.range(out, dtype=tf.float64)[None, :]
    inside = (pos >= 0.0) & (pos <= length - 1.0)
    base = tf.clip_by_value(tf.floor(pos), 0.0, length - 1.0)
    r0 = tf.cast(base, tf.int32)
    r1 = tf.minimum(r0 + 1, length - 1)
    return r0, r1, tf.cast(pos - base, tf.float32), tf.cast(inside, tf.float32)


def resize_crop(tiles: tf.Tensor, key: tf.Tensor, config: SamplerConfig) -> tf.Tensor:
    """BYOL-A's random resize crop of each tile (n, T, M), resized back to (T, M).

    The tile sits in the middle of a zero canvas ``floor(T * crop_canvas)`` frames long
    (and M bands high); a crop of ``floor(s * T)`` frames and ``floor(s' * M)`` bands,
    ``s, s' ~ U(crop_scale_min, crop_scale_max)``, each clipped to the canvas, is taken
    at a uniform position on the canvas and resized back with bilinear interpolation,
    corners aligned (as BYOL-A; its bicubic is bilinear here). The resampling is
    separable (rows, then bands) in one XLA loop, several times faster on CPU than
    ``tf.image.crop_and_resize``, which computes the same values.
    """
    n, t, m = tiles.shape
    u = tf.random.stateless_uniform([4, n], seed=key, dtype=tf.float64)
    canvas = max(int(math.floor(t * config.crop_canvas)), t)
    lo, hi = config.crop_scale_min, config.crop_scale_max

    def size(v, full, limit):
        return tf.clip_by_value(tf.cast(tf.floor((lo + (hi - lo) * v) * full), tf.int32), 1, limit)

    h, w = size(u[0], t, canvas), size(u[1], m, m)
    i = randint(u[2], canvas - h + 1) - (canvas - t) // 2
    j = randint(u[3], m - w + 1)
    r0, r1, wr, keep = _sample_points(i, h, t, t)
    c0, c1, wc, _ = _sample_points(j, w, m, m)
    return resize_rows_cols(tiles, r0, r1, wr, keep, c0, c1, wc)
