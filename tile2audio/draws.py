"""The sampler's seeded index draws, as TensorFlow graph functions.

Every draw maps uniforms ``u`` in [0, 1) (from a stateless generator, so a batch is a
pure function of seed and step) to indices. :func:`tile2vec_draw` and
:func:`supervised_draw` compose them into the per-mode anchor, neighbour and opposite
draws of one batch, and :func:`gather_tiles` cuts the tiles;
:class:`tile2audio.sampler.TripletSampler` calls them once per batch. ``pool`` is the
dict of pool tensors named as the fields of :class:`tile2audio.pools.PoolArrays`.
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


def tile2vec_draw(u: tf.Tensor, pool: dict, tile_frames: int, min_gap_frames: int, neighbourhood_frames: int,
                  view: bool = False, distant_frames: int = 0, distant_prob: float = 0.0, skip_silence: bool = False,
                  same_group_prob: float = 0.0):
    """Clip positions and tile starts of one tile2vec batch.

    Parameters
    ----------
    u : tf.Tensor, float64 (>= 8, B)
        Uniforms; rows 0-4 drive anchor, neighbour and opposite, rows 5-6 the distant draw,
        row 7 the same-group choice.
    view : bool
        Anchor and positive are two independent uniform crops of the clip.
    distant_prob : float
        With this probability (``tile2vec-distant``; 0 turns it off) the opposite is a
        tile of the anchor's clip at least ``distant_frames`` from the anchor, when the
        clip is long enough.
    skip_silence : bool
        Every start is drawn among the clip's allowed (mostly non-silent) starts (the
        pool's ``ok_*`` tables); a neighbour or far tile falls back to the rule above
        when no allowed start fits.
    same_group_prob : float
        With this probability the opposite is another clip of the anchor's manifest
        group (the pool's ``h_*`` tables), when the group has another clip in the pool.

    Returns
    -------
    clips, starts : tf.Tensor, int32 (3B,)
        Pool clip positions and start frames: anchors, then neighbours, then opposites.
    """
    n_clips = tf.size(pool["offsets"])
    a = randint(u[0], n_clips)
    span = tf.gather(pool["lengths"], a) - tile_frames
    if skip_silence:
        a_s, n_s = _allowed_anchor_neighbour(u, pool, a, span, view, min_gap_frames, neighbourhood_frames)
    elif view:
        a_s, n_s = randint(u[1], span + 1), randint(u[2], span + 1)
    else:
        a_s = anchor_start(u[1], span, min_gap_frames)
        n_s = neighbour_start(u[2], a_s, span, min_gap_frames, neighbourhood_frames)
    o, found = outside_block(u[3], tf.gather(pool["g_start"], a), tf.gather(pool["g_count"], a),
                             n_clips, pool["g_order"])
    o = tf.where(found, o, other_clip(u[3], a, n_clips))
    if same_group_prob > 0:
        mate, has_mate = inside_block_excluding(u[3], tf.gather(pool["h_start"], a), tf.gather(pool["h_count"], a),
                                                tf.gather(pool["h_rank"], a), pool["h_order"])
        o = tf.where((u[7] < same_group_prob) & has_mate, mate, o)
    if skip_silence:
        o_s = allowed_start(u[4], pool, o)
    else:
        o_s = randint(u[4], tf.gather(pool["lengths"], o) - tile_frames + 1)
    if distant_prob > 0:
        d = distant_frames
        if skip_silence:
            far, far_ok = allowed_two_segments(u[6], pool, a, 0, a_s - d, a_s + d, span)
        else:
            far, far_ok = two_segments(u[6], 0, a_s - d, a_s + d, span)
        same = (u[5] < distant_prob) & far_ok
        o = tf.where(same, a, o)
        o_s = tf.where(same, far, o_s)
    return tf.concat([a, a, o], 0), tf.concat([a_s, n_s, o_s], 0)


def _allowed_anchor_neighbour(u, pool, a, span, view: bool, gap: int, hood: int):
    """Anchor and positive starts among clip ``a``'s allowed starts (see :func:`tile2vec_draw`)."""
    if view:
        return allowed_start(u[1], pool, a), allowed_start(u[2], pool, a)
    a_s, ok = allowed_two_segments(u[1], pool, a, 0, span - gap, tf.maximum(gap, span - gap + 1), span)
    a_s = tf.where(ok, a_s, allowed_start(u[1], pool, a))
    lo, hi = tf.maximum(a_s - hood, 0), tf.minimum(a_s + hood, span)
    n_s, ok = allowed_two_segments(u[2], pool, a, lo, a_s - gap, a_s + max(gap, 1), hi)
    return a_s, tf.where(ok, n_s, neighbour_start(u[2], a_s, span, gap, hood))


def anchor_start(u: tf.Tensor, span: tf.Tensor, gap: int) -> tf.Tensor:
    """Anchor starts, uniform over the starts that leave room for a neighbour >= ``gap`` away."""
    start, ok = two_segments(u, 0, span - gap, tf.maximum(gap, span - gap + 1), span)
    return tf.where(ok, start, randint(u, span + 1))


def neighbour_start(u: tf.Tensor, a_s: tf.Tensor, span: tf.Tensor, gap: int, hood: int) -> tf.Tensor:
    """Neighbour starts within ``hood`` of the anchor and >= ``gap`` from it (the farthest if impossible)."""
    lo = tf.maximum(a_s - hood, 0)
    hi = tf.minimum(a_s + hood, span)
    start, ok = two_segments(u, lo, a_s - gap, a_s + max(gap, 1), hi)
    farthest = tf.where(a_s - lo >= hi - a_s, lo, hi)
    return tf.where(ok, start, farthest)


def supervised_draw(u: tf.Tensor, pool: dict, tile_frames: int, skip_silence: bool = False):
    """Clip positions and starts, each int32 (3B,), of one supervised batch (uniforms ``u`` (>= 6, B)).

    With ``skip_silence`` every start is one of the clip's allowed (mostly non-silent) starts.
    """
    def start(v, clips):
        if skip_silence:
            return allowed_start(v, pool, clips)
        return randint(v, tf.gather(pool["lengths"], clips) - tile_frames + 1)

    n_clips = tf.size(pool["offsets"])
    a = randint(u[0], n_clips)
    a_s = start(u[1], a)
    l_start, l_count = tf.gather(pool["l_start"], a), tf.gather(pool["l_count"], a)
    n, found = inside_block_excluding(u[2], l_start, l_count, tf.gather(pool["l_rank"], a), pool["l_order"])
    n = tf.where(found, n, a)
    n_s = start(u[3], n)
    o, found = outside_block(u[4], l_start, l_count, n_clips, pool["l_order"])
    o = tf.where(found, o, other_clip(u[4], a, n_clips))
    o_s = start(u[5], o)
    return tf.concat([a, n, o], 0), tf.concat([a_s, n_s, o_s], 0)


def gather_tiles(pool: dict, clips: tf.Tensor, starts: tf.Tensor, tile_frames: int) -> tf.Tensor:
    """Cut tiles at pool clip positions ``clips`` and ``starts`` (each (n,)): float32 (n, T, M), one gather."""
    first = tf.gather(pool["offsets"], clips) + starts
    rows = first[:, None] + tf.range(tile_frames, dtype=tf.int32)[None, :]
    return tf.cast(tf.gather(pool["frames"], rows), tf.float32)


def mix_partners(u: tf.Tensor, anchor: tf.Tensor, pool: dict) -> tf.Tensor:
    """Mixing-partner clips of a batch's anchors, positives and opposites, outside the anchor's group.

    Parameters
    ----------
    u : tf.Tensor, float64 (>= 3, B)
        Uniforms: rows 0, 1 and 2 pick the partners of anchor, positive and opposite.
    anchor : tf.Tensor, int32 (B,)
        Anchor clip positions.

    Returns
    -------
    tf.Tensor, int32 (3B,)
        Pool clip positions: never of the anchor's group (so a mix carries nothing of the
        anchor's recording into its positive or its opposite), and the positive's partner
        is never the anchor's, so a shared partner cannot tie the two views together.
        When every clip is of the anchor's group, any other clip; with one or two clips
        outside it, the positive's partner may be the anchor's.
    """
    n = tf.size(pool["offsets"])
    start, count = tf.gather(pool["g_start"], anchor), tf.gather(pool["g_count"], anchor)
    outside = n - count
    ka, ko = randint(u[0], outside), randint(u[2], outside)
    kp = randint(u[1], outside - 1)
    kp = tf.where(outside > 1, tf.where(kp >= ka, kp + 1, kp), ka)
    k = tf.concat([ka, kp, ko], 0)
    start3, count3 = tf.tile(start, [3]), tf.tile(count, [3])
    pos = tf.minimum(tf.where(k >= start3, k + count3, k), n - 1)
    partner = tf.gather(pool["g_order"], pos)
    fallback = other_clip(tf.concat([u[0], u[1], u[2]], 0), tf.tile(anchor, [3]), n)
    return tf.where(tf.tile(outside, [3]) > 0, partner, fallback)


def _rank_at(pool: dict, clips: tf.Tensor, pos: tf.Tensor) -> tf.Tensor:
    """Allowed starts of each clip before ``pos`` (clipped to [0, clip length])."""
    pos = tf.minimum(tf.maximum(pos, 0), tf.gather(pool["lengths"], clips))
    # Each clip's table has one entry more than its frames: it starts at offset + clip position.
    return tf.gather(pool["ok_rank"], tf.gather(pool["offsets"], clips) + clips + pos)


def allowed_count(pool: dict, clips: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
    """Number of allowed (non-silent) tile starts in [lo, hi] of each clip; 0 when hi < lo."""
    return tf.maximum(_rank_at(pool, clips, hi + 1) - _rank_at(pool, clips, lo), 0)


def allowed_pick(pool: dict, clips: tf.Tensor, lo: tf.Tensor, k: tf.Tensor) -> tf.Tensor:
    """The ``k``-th allowed start at or after ``lo`` of each clip (clamped to the clip's last one)."""
    count = tf.gather(pool["ok_count"], clips)
    rank = tf.minimum(tf.maximum(_rank_at(pool, clips, lo) + k, 0), tf.maximum(count - 1, 0))
    return tf.gather(pool["ok_starts"], tf.gather(pool["ok_offset"], clips) + rank)


def allowed_start(u: tf.Tensor, pool: dict, clips: tf.Tensor) -> tf.Tensor:
    """A start uniform over each clip's allowed starts (every clip has at least one)."""
    count = tf.gather(pool["ok_count"], clips)
    return tf.gather(pool["ok_starts"], tf.gather(pool["ok_offset"], clips) + randint(u, count))


def allowed_two_segments(u, pool: dict, clips, lo, end1, start2, hi):
    """As :func:`two_segments`, over the allowed starts of ``clips`` only; returns (value, non-empty)."""
    c1 = allowed_count(pool, clips, lo, end1)
    c2 = allowed_count(pool, clips, start2, hi)
    k = randint(u, c1 + c2)
    first = tf.where(k < c1, lo, start2)
    return allowed_pick(pool, clips, first, tf.where(k < c1, k, k - c1)), (c1 + c2) > 0
