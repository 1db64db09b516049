"""Triplet (Tile2Vec) and reconstruction losses as TensorFlow ops.

Everything here is plain TF, safe inside ``tf.function`` and a custom Keras
``train_step``; losses are computed in float32 whatever the embeddings' dtype.

Triplet loss per (anchor, neighbour, opposite)::

    max(d(a, n) - d(a, o) + margin, 0)

reduced with ``zero_filtered`` (sum over the batch divided by the number of triplets whose
loss is still > 0, the Tile2Vec-for-audio reduction; exactly 0, never NaN, when every
triplet is satisfied) or ``mean``.

In-batch negatives (``LossConfig.negatives``) use the clip id and group code of each tile
as a pseudo-label: any tile of the batch (anchors, neighbours and opposites) whose clip
and group both differ from an anchor's is a valid negative for that anchor.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import tensorflow as tf

from .config import DISTANCES, NEGATIVES, REDUCTIONS, LossConfig, is_auto
from .errors import Tile2AudioError

__all__ = [
    "EPSILON",
    "pairwise_distance",
    "distance_matrix",
    "triplet_loss",
    "negative_mask",
    "in_batch_triplet_loss",
    "reconstruction_mse",
    "compute_losses",
]

#: Added under the square root of the Euclidean distance so its gradient stays finite at 0.
EPSILON = 1e-12



def _check(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise Tile2AudioError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise Tile2AudioError(f"{name} must be one of {list(choices)}, got {value!r}")


def _f32(x) -> tf.Tensor:
    """Cast to float32 (mixed-precision models emit float16)."""
    return tf.cast(x, tf.float32)


def _finish(squared: tf.Tensor, distance: str) -> tf.Tensor:
    """Turn squared distances into the configured distance."""
    _check("distance", distance, DISTANCES)
    if distance == "squared":
        return squared
    return tf.sqrt(squared + EPSILON)


def pairwise_distance(a, b, distance: str = "squared") -> tf.Tensor:
    """Distance between matching rows of ``a`` and ``b``.

    Parameters
    ----------
    a, b : tensor, shape (B, D)
        Embeddings; row ``i`` of ``a`` is compared with row ``i`` of ``b``.
    distance : {"squared", "euclidean"}
        Squared Euclidean, or Euclidean computed as ``sqrt(sum((a - b)**2) + EPSILON)``
        so that the gradient is finite (zero) when ``a == b``.

    Returns
    -------
    tf.Tensor, shape (B,)
        float32 distances.
    """
    squared = tf.reduce_sum(tf.square(_f32(a) - _f32(b)), axis=-1)
    return _finish(squared, distance)


def distance_matrix(a, b, distance: str = "squared") -> tf.Tensor:
    """All distances between the rows of ``a`` and the rows of ``b``.

    Parameters
    ----------
    a : tensor, shape (N, D)
    b : tensor, shape (K, D)
    distance : {"squared", "euclidean"}

    Returns
    -------
    tf.Tensor, shape (N, K)
        float32 distances; ``|a|^2 + |b|^2 - 2 a.b`` clipped at 0 (rounding can make it
        slightly negative), which needs O(N K) memory instead of O(N K D).
    """
    a, b = _f32(a), _f32(b)
    sq_a = tf.reduce_sum(tf.square(a), axis=-1, keepdims=True)
    sq_b = tf.reduce_sum(tf.square(b), axis=-1, keepdims=True)
    squared = tf.maximum(sq_a + tf.transpose(sq_b) - 2.0 * tf.matmul(a, b, transpose_b=True), 0.0)
    return _finish(squared, distance)


def _reduce(per: tf.Tensor, valid: tf.Tensor, reduction: str) -> tf.Tensor:
    """Reduce per-item losses over the ``valid`` items (0, never NaN, when none count)."""
    _check("reduction", reduction, REDUCTIONS)
    valid_f = tf.cast(valid, tf.float32)
    total = tf.reduce_sum(per * valid_f)
    if reduction == "zero_filtered":
        count = tf.reduce_sum(valid_f * tf.cast(per > 0.0, tf.float32))
    else:
        count = tf.reduce_sum(valid_f)
    # divide_no_nan's gradient is 0 where count is 0, so a fully satisfied batch is safe.
    return tf.math.divide_no_nan(total, count)


def triplet_loss(
    za, zn, zo, margin: float, distance: str = "squared", reduction: str = "zero_filtered"
) -> tuple[tf.Tensor, tf.Tensor]:
    """Triplet loss of each (anchor, neighbour, opposite) and its batch reduction.

    Parameters
    ----------
    za, zn, zo : tensor, shape (B, D)
        Embeddings of the anchors, neighbours and opposites.
    margin : float
        Required gap between d(a, o) and d(a, n).
    distance : {"squared", "euclidean"}
    reduction : {"zero_filtered", "mean"}
        ``zero_filtered``: sum / number of triplets with loss > 0 (0 when there are none);
        ``mean``: plain mean over the batch.

    Returns
    -------
    loss : tf.Tensor, scalar
    per_triplet : tf.Tensor, shape (B,)
        ``max(d(a, n) - d(a, o) + margin, 0)``.
    """
    d_an = pairwise_distance(za, zn, distance)
    d_ao = pairwise_distance(za, zo, distance)
    per = tf.nn.relu(d_an - d_ao + float(margin))
    return _reduce(per, tf.ones_like(per, dtype=tf.bool), reduction), per


def _batch_labels(batch: Mapping) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """(anchor_clip, opposite_clip, anchor_group, opposite_group) as int32 tensors.

    Groups default to the clip ids when the batch has none (a clip is its own group).
    """
    missing = [k for k in ("anchor_clip", "opposite_clip") if k not in batch]
    if missing:
        raise Tile2AudioError(
            f"in-batch negatives need the batch keys anchor_clip and opposite_clip; missing {missing}"
        )
    ac = tf.cast(batch["anchor_clip"], tf.int32)
    oc = tf.cast(batch["opposite_clip"], tf.int32)
    ag = tf.cast(batch["anchor_group"], tf.int32) if "anchor_group" in batch else ac
    og = tf.cast(batch["opposite_group"], tf.int32) if "opposite_group" in batch else oc
    return ac, oc, ag, og


def negative_mask(batch: Mapping) -> tf.Tensor:
    """Which batch tiles are valid negatives for each anchor.

    The candidate tiles are ``concat([anchors, neighbours, opposites])``; the neighbour
    shares its anchor's clip and group.

    Parameters
    ----------
    batch : mapping
        ``anchor_clip``, ``opposite_clip`` and optionally ``anchor_group``,
        ``opposite_group``: int tensors of shape (B,).

    Returns
    -------
    tf.Tensor, bool, shape (B, 3B)
        ``mask[i, j]`` is True when candidate ``j``'s clip and group both differ from
        anchor ``i``'s.
    """
    ac, oc, ag, og = _batch_labels(batch)
    clips = tf.concat([ac, ac, oc], axis=0)
    groups = tf.concat([ag, ag, og], axis=0)
    return tf.logical_and(
        tf.not_equal(ac[:, None], clips[None, :]), tf.not_equal(ag[:, None], groups[None, :])
    )


def _masked_min(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Row-wise minimum of ``values`` over ``mask`` (0 for a row with no True)."""
    big = tf.reduce_max(tf.stop_gradient(values)) + 1.0
    masked = tf.where(mask, values, tf.fill(tf.shape(values), big))
    return tf.where(tf.reduce_any(mask, axis=1), tf.reduce_min(masked, axis=1), 0.0)


def in_batch_triplet_loss(
    za,
    zn,
    zo,
    batch: Mapping,
    margin: float,
    distance: str = "squared",
    reduction: str = "zero_filtered",
    negatives: str = "batch_all",
    symmetric: bool = False,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Triplet loss with negatives mined from the whole batch.

    Parameters
    ----------
    za, zn, zo : tensor, shape (B, D)
        Embeddings of the anchors, neighbours and opposites.
    batch : mapping
        Clip / group labels, see :func:`negative_mask`.
    margin : float
    distance : {"squared", "euclidean"}
    reduction : {"zero_filtered", "mean"}
        Applied over the valid (anchor, negative) pairs or anchors.
    negatives : {"batch_all", "semi_hard", "hardest"}
        ``batch_all``: every valid (anchor, negative) pair is a triplet.
        ``semi_hard``: per anchor the closest negative farther than d(a, n), else the
        closest valid negative. ``hardest``: per anchor the closest valid negative.
    symmetric : bool
        Also use each neighbour as an anchor, with its anchor as the positive, so every
        forward pass gives twice the triplets (the rows below become 2B: anchors first).

    Returns
    -------
    loss : tf.Tensor, scalar
    per : tf.Tensor
        Per-triplet losses, shape (B, 3B) for ``batch_all``, (B,) otherwise.
    valid : tf.Tensor, bool, same shape as ``per``
        Which entries are real triplets (an anchor without any valid negative, or an
        invalid pair, is excluded from the loss).
    """
    _check("negatives", negatives, NEGATIVES[1:])
    mask = negative_mask(batch)
    candidates = tf.concat([za, zn, zo], axis=0)
    if symmetric:
        # A neighbour shares its anchor's clip and group, so it has the same negatives.
        za, zn, mask = tf.concat([za, zn], axis=0), tf.concat([zn, za], axis=0), tf.concat([mask, mask], axis=0)
    d_an = pairwise_distance(za, zn, distance)
    d_all = distance_matrix(za, candidates, distance)
    if negatives == "batch_all":
        per = tf.nn.relu(d_an[:, None] - d_all + float(margin)) * tf.cast(mask, tf.float32)
        return _reduce(per, mask, reduction), per, mask
    hardest = _masked_min(d_all, mask)
    if negatives == "semi_hard":
        farther = tf.logical_and(mask, d_all > d_an[:, None])
        chosen = tf.where(tf.reduce_any(farther, axis=1), _masked_min(d_all, farther), hardest)
    else:
        chosen = hardest
    valid = tf.reduce_any(mask, axis=1)
    per = tf.nn.relu(d_an - chosen + float(margin)) * tf.cast(valid, tf.float32)
    return _reduce(per, valid, reduction), per, valid


def npair_loss(za, zn, zo, batch: Mapping, temperature: float = 0.1,
               symmetric: bool = False) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Multi-negative (N-pair / InfoNCE) loss: softmax of the positive against in-batch negatives.

    For anchor ``i`` the logits are ``z_i . z_pos / t`` and ``z_i . z_j / t`` for every
    valid negative ``j`` of :func:`negative_mask` (others are left out of the softmax);
    the loss is the cross-entropy of picking the positive. A comparison option only
    (``loss.kind: npair``); the zero-filtered triplet loss stays the default.

    Parameters
    ----------
    za, zn, zo : tensor, shape (B, D)
        Embeddings (unit-norm, so the logits are cosine similarities over ``t``).
    batch : mapping
        Clip / group labels, see :func:`negative_mask`.
    temperature : float
        Softmax temperature ``t`` > 0.
    symmetric : bool
        Also use each neighbour as an anchor (rows become 2B).

    Returns
    -------
    loss : tf.Tensor, scalar
        Mean over anchors.
    per, valid : tf.Tensor, shape (B,) (or (2B,))
        Per-anchor losses, and True for every row.
    """
    mask = negative_mask(batch)
    candidates = tf.concat([za, zn, zo], axis=0)
    if symmetric:
        za, zn, mask = tf.concat([za, zn], axis=0), tf.concat([zn, za], axis=0), tf.concat([mask, mask], axis=0)
    t = float(temperature)
    positive = tf.reduce_sum(za * zn, axis=1, keepdims=True) / t
    # An excluded candidate gets a logit so low that its softmax weight is exactly 0.
    others = tf.where(mask, tf.matmul(za, candidates, transpose_b=True) / t, -1e9)
    per = -tf.nn.log_softmax(tf.concat([positive, others], axis=1), axis=1)[:, 0]
    valid = tf.ones_like(per, dtype=tf.bool)
    return tf.reduce_mean(per), per, valid


def reconstruction_mse(reconstructions: Sequence, tiles: Sequence) -> tf.Tensor:
    """Mean squared error of reconstructions against their tiles, averaged over all of them.

    Parameters
    ----------
    reconstructions, tiles : sequence of tensors, each (B, T, M, 1)
        Matching pairs (e.g. anchor, neighbour, opposite), same length.

    Returns
    -------
    tf.Tensor, scalar float32
    """
    if len(reconstructions) != len(tiles) or not tiles:
        raise Tile2AudioError(
            f"need one tile per reconstruction, got {len(reconstructions)} reconstructions "
            f"and {len(tiles)} tiles"
        )
    errors = [tf.reduce_mean(tf.square(_f32(r) - _f32(t))) for r, t in zip(reconstructions, tiles)]
    return tf.add_n(errors) / float(len(errors))


def _as_triple(values, what: str) -> list:
    """Accept a sequence or an anchor/neighbour/opposite mapping; return a list."""
    if isinstance(values, Mapping):
        try:
            return [values[k] for k in ("anchor", "neighbour", "opposite")]
        except KeyError as exc:
            raise Tile2AudioError(f"{what} mapping needs anchor, neighbour and opposite") from exc
    return list(values)


def compute_losses(
    loss: LossConfig,
    za,
    zn,
    zo,
    batch: Mapping,
    reconstructions=None,
    tiles=None,
) -> dict[str, tf.Tensor]:
    """Total training loss and its monitored parts for one batch.

    Parameters
    ----------
    loss : LossConfig
        Margin, distance, reduction, negatives and the weights of the three terms.
    za, zn, zo : tensor, shape (B, D)
        Embeddings of the anchors, neighbours and opposites.
    batch : mapping
        The sampler's batch: ``anchor_clip``, ``opposite_clip``, ``anchor_group``,
        ``opposite_group`` (int32 (B,)) for in-batch negatives, and ``anchor``,
        ``neighbour``, ``opposite`` (B, T, M, 1) used as targets when ``tiles`` is None.
    reconstructions : sequence or mapping of 3 tensors (B, T, M, 1), optional
        Decoder outputs for the anchors, neighbours and opposites.
    tiles : sequence or mapping of 3 tensors (B, T, M, 1), optional
        Targets of ``reconstructions``; defaults to the batch's tiles.

    Returns
    -------
    dict of str to scalar float32 tf.Tensor
        ``loss`` (``triplet_weight * triplet + mse_weight * mse + embedding_l2 * l2``),
        ``triplet``, ``mse`` (0 without reconstructions), ``l2`` (mean squared L2 norm of
        all embeddings), ``active_fraction`` (share of triplets or pairs with loss > 0),
        ``d_an``, ``d_ao`` (mean anchor-neighbour and anchor-opposite distance of the
        sampled triplets), ``spread`` (mean over dimensions of the batch std of ``za``;
        near 0 means the embedding has collapsed).
    """
    if not isinstance(loss, LossConfig):
        raise Tile2AudioError(f"expected a LossConfig, got {type(loss).__name__}")
    if is_auto(loss.symmetric):
        raise Tile2AudioError("loss.symmetric is 'auto': resolve it with tile2audio.rules.choose_training first")
    za, zn, zo = _f32(za), _f32(zn), _f32(zo)
    if loss.kind == "npair":
        triplet, per, valid = npair_loss(za, zn, zo, batch, loss.temperature, loss.symmetric)
    elif loss.negatives == "single":
        if loss.symmetric:
            # The neighbour as anchor: the same opposite, the anchor as positive.
            triplet, per = triplet_loss(
                tf.concat([za, zn], 0), tf.concat([zn, za], 0), tf.concat([zo, zo], 0),
                loss.margin, loss.distance, loss.reduction,
            )
        else:
            triplet, per = triplet_loss(za, zn, zo, loss.margin, loss.distance, loss.reduction)
        valid = tf.ones_like(per, dtype=tf.bool)
    else:
        triplet, per, valid = in_batch_triplet_loss(
            za, zn, zo, batch, loss.margin, loss.distance, loss.reduction, loss.negatives, loss.symmetric
        )
    active = tf.math.divide_no_nan(
        tf.reduce_sum(tf.cast(tf.logical_and(valid, per > 0.0), tf.float32)),
        tf.reduce_sum(tf.cast(valid, tf.float32)),
    )
    if reconstructions is None:
        mse = tf.constant(0.0, tf.float32)
    else:
        targets = tiles if tiles is not None else batch
        mse = reconstruction_mse(_as_triple(reconstructions, "reconstructions"), _as_triple(targets, "tiles"))
    everything = tf.concat([za, zn, zo], axis=0)
    l2 = tf.reduce_mean(tf.reduce_sum(tf.square(everything), axis=-1))
    total = loss.triplet_weight * triplet + loss.mse_weight * mse + loss.embedding_l2 * l2
    return {
        "loss": total,
        "triplet": triplet,
        "mse": mse,
        "l2": l2,
        "active_fraction": active,
        "d_an": tf.reduce_mean(pairwise_distance(za, zn, loss.distance)),
        "d_ao": tf.reduce_mean(pairwise_distance(za, zo, loss.distance)),
        "spread": tf.reduce_mean(tf.math.reduce_std(za, axis=0)),
    }
