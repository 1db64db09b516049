"""Log-domain augmentation of tiles: SpecAugment band masks, gain and power-sum mixing.

The tiles are in normalised units; :class:`tile2audio.sampler.TripletSampler` turns gain
and mixing (defined on the un-normalised log power) into factors in those units, and these
graph functions apply them. Masked cells are set to the tile's mean.
"""

from __future__ import annotations

import math

import tensorflow as tf

from .draws import randint


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
    """Power-sum mix with ``partner`` (see ``TripletSampler._mix_terms``), then gain and masks."""
    return gain_mask(x + tf.math.softplus(partner * a - x * b + c) * k, gain, keep_t, keep_f)
