"""The sampler's seeded index draws, as TensorFlow graph functions.

Every draw maps uniforms ``u`` in [0, 1) (from a stateless generator, so a batch is a
pure function of seed and step) to indices; :class:`tile2audio.sampler.TripletSampler`
composes them into the per-mode anchor, neighbour and opposite draws.
"""

from __future__ import annotations

import tensorflow as tf


def randint(u: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """Uniform int32 in [0, n) per element from uniforms ``u`` in [0, 1); n < 1 gives 0."""
    n = tf.maximum(tf.cast(n, tf.int32), 1)
    k = tf.cast(tf.floor(u * tf.cast(n, tf.float64)), tf.int32)
    return tf.minimum(k, n - 1)


def two_segments(u, lo, end1, start2, hi):
    """Uniform int in [lo, end1] U [start2, hi] (end1 < start2); returns (value, non-empty)."""
    c1 = tf.maximum(end1 - lo + 1, 0)
    c2 = tf.maximum(hi - start2 + 1, 0)
    k = randint(u, c1 + c2)
    return tf.where(k < c1, lo + k, start2 + k - c1), (c1 + c2) > 0


def outside_block(u, start, count, n, order):
    """A clip outside the sorted block [start, start + count) of ``order``; returns (clip, found)."""
    k = randint(u, n - count)
    pos = tf.where(k >= start, k + count, k)
    pos = tf.minimum(pos, n - 1)  # only reached when nothing is outside (then found is False)
    return tf.gather(order, pos), (n - count) > 0


def inside_block_excluding(u, start, count, rank, order):
    """Another clip of the same sorted block (skipping position ``rank``); returns (clip, found)."""
    pos = start + randint(u, count - 1)
    pos = tf.where(pos >= rank, pos + 1, pos)
    pos = tf.minimum(pos, start + count - 1)
    return tf.gather(order, pos), count > 1


def other_clip(u, clip, n):
    """A clip position other than ``clip`` (``clip`` itself when the pool has one clip)."""
    k = randint(u, n - 1)
    return tf.where(n > 1, tf.where(k >= clip, k + 1, k), clip)
