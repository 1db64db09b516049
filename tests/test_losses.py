"""Tests of tile2audio.losses against numbers worked out by hand (mostly 1-D embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from tile2audio import Tile2AudioError
from tile2audio.config import LossConfig
from tile2audio.losses import (
    compute_losses,
    distance_matrix,
    in_batch_triplet_loss,
    negative_mask,
    pairwise_distance,
    triplet_loss,
)


def _loss(**kw) -> LossConfig:
    """A LossConfig with one-sided anchors unless told (the auto rule is tested apart)."""
    return LossConfig(**{"symmetric": False, **kw})


def col(*values) -> tf.Tensor:
    """1-D embeddings as a (B, 1) float32 tensor."""
    return tf.constant(np.asarray(values, dtype="float32")[:, None])


def labels(anchor_clip, opposite_clip, anchor_group=None, opposite_group=None) -> dict:
    """A batch dict of int32 clip / group labels."""
    batch = {"anchor_clip": anchor_clip, "opposite_clip": opposite_clip}
    if anchor_group is not None:
        batch.update(anchor_group=anchor_group, opposite_group=opposite_group)
    return {k: tf.constant(v, tf.int32) for k, v in batch.items()}


# a = 0 everywhere; n at 1, 2, 0.5; o at 3, 1, 2; margin 1.
ZA, ZN, ZO = col(0, 0, 0), col(1, 2, 0.5), col(3, 1, 2)


def test_distances_by_hand():
    a, b = tf.constant([[0.0, 0.0], [1.0, 1.0]]), tf.constant([[3.0, 4.0], [1.0, 1.0]])
    np.testing.assert_allclose(pairwise_distance(a, b, "squared"), [25.0, 0.0])
    np.testing.assert_allclose(pairwise_distance(a, b, "euclidean"), [5.0, 0.0], atol=1e-5)
    # rows of a against rows of b: (0,0)-(3,4)=25, (0,0)-(1,1)=2, (1,1)-(3,4)=13, (1,1)-(1,1)=0
    np.testing.assert_allclose(distance_matrix(a, b, "squared"), [[25.0, 2.0], [13.0, 0.0]], atol=1e-5)
    np.testing.assert_allclose(
        distance_matrix(a, b, "euclidean"), [[5.0, np.sqrt(2)], [np.sqrt(13), 0.0]], atol=1e-5
    )


def test_triplet_loss_squared_zero_filtered_and_mean():
    # d_an = 1, 4, 0.25; d_ao = 9, 1, 4 -> per = max(d_an - d_ao + 1, 0) = 0, 4, 0
    loss, per = triplet_loss(ZA, ZN, ZO, margin=1.0, distance="squared", reduction="zero_filtered")
    np.testing.assert_allclose(per, [0.0, 4.0, 0.0], atol=1e-6)
    assert float(loss) == pytest.approx(4.0)  # 4 / one active triplet
    loss, _ = triplet_loss(ZA, ZN, ZO, margin=1.0, distance="squared", reduction="mean")
    assert float(loss) == pytest.approx(4.0 / 3.0)


def test_triplet_loss_euclidean():
    # d_an = 1, 2, 0.5; d_ao = 3, 1, 2 -> per = 0, 2, 0
    loss, per = triplet_loss(ZA, ZN, ZO, margin=1.0, distance="euclidean")
    np.testing.assert_allclose(per, [0.0, 2.0, 0.0], atol=1e-5)
    assert float(loss) == pytest.approx(2.0, abs=1e-5)
    loss, _ = triplet_loss(ZA, ZN, ZO, margin=1.0, distance="euclidean", reduction="mean")
    assert float(loss) == pytest.approx(2.0 / 3.0, abs=1e-5)


@pytest.mark.parametrize("negatives", ["single", "batch_all", "semi_hard", "hardest"])
@pytest.mark.parametrize("distance", ["squared", "euclidean"])
def test_satisfied_batch_gives_exact_zero_and_finite_gradients(negatives, distance):
    # every anchor sits on its neighbour; every other tile is >= 10 away; margin 1
    za = tf.Variable([[0.0], [20.0]])
    zn = tf.Variable([[0.0], [20.0]])
    zo = tf.Variable([[10.0], [40.0]])
    batch = labels([0, 1], [2, 3], [0, 1], [2, 3])
    cfg = _loss(margin=1.0, distance=distance, negatives=negatives)
    with tf.GradientTape() as tape:
        out = compute_losses(cfg, za, zn, zo, batch)
    grads = tape.gradient(out["loss"], [za, zn, zo])
    assert float(out["loss"]) == 0.0
    assert float(out["triplet"]) == 0.0
    assert float(out["active_fraction"]) == 0.0
    for g in grads:
        assert g is not None and np.all(np.isfinite(np.asarray(g)))


def test_euclidean_gradient_finite_at_identical_points():
    a = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    n = tf.Variable([[1.0, 2.0], [3.0, 4.0]])  # identical to the anchors
    o = tf.Variable([[1.5, 2.0], [3.0, 4.2]])
    with tf.GradientTape(persistent=True) as tape:
        loss, per = triplet_loss(a, n, o, margin=1.0, distance="euclidean")
        matrix = tf.reduce_sum(distance_matrix(a, a, "euclidean"))
    assert float(loss) > 0.0  # the margin is not met, so the gradient is used
    for g in tape.gradient(loss, [a, n, o]) + tape.gradient(matrix, [a]):
        assert np.all(np.isfinite(np.asarray(g)))


def test_negative_mask_excludes_same_clip_and_same_group():
    # candidates: a0 (c0,g10) a1 (c1,g11) n0 (c0,g10) n1 (c1,g11) o0 (c2,g11) o1 (c0,g10)
    mask = negative_mask(labels([0, 1], [2, 0], [10, 11], [11, 10]))
    expected = [
        [False, True, False, True, True, False],  # anchor 0: o1 shares clip 0
        [True, False, True, False, False, True],  # anchor 1: o0 is clip 2 but shares group 11
    ]
    np.testing.assert_array_equal(mask, expected)
    # without group keys a clip is its own group
    mask = negative_mask(labels([0, 1], [2, 0]))
    np.testing.assert_array_equal(mask[1], [True, False, True, False, True, True])


def test_batch_all_by_hand():
    za, zn, zo = col(0, 4), col(1, 4), col(0.5, 3.8)  # d_an = 1, 0
    batch = labels([0, 1], [2, 0], [10, 11], [11, 10])
    # anchor 0 (d_an 1): valid a1 -> 16, n1 -> 16, o0 -> 0.25; per 0, 0, 1.75
    # anchor 1 (d_an 0): valid a0 -> 16, n0 -> 9, o1 -> 0.04; per 0, 0, 0.96
    # (the excluded a0, n0 would have added 2 and 1 to anchor 0)
    loss, per, valid = in_batch_triplet_loss(za, zn, zo, batch, margin=1.0, negatives="batch_all")
    assert per.shape == (2, 6)
    assert int(tf.reduce_sum(tf.cast(valid, tf.int32))) == 6
    assert float(tf.reduce_sum(per)) == pytest.approx(1.75 + 0.96, abs=1e-4)
    assert float(loss) == pytest.approx((1.75 + 0.96) / 2, abs=1e-4)
    loss, _, _ = in_batch_triplet_loss(za, zn, zo, batch, 1.0, reduction="mean", negatives="batch_all")
    assert float(loss) == pytest.approx((1.75 + 0.96) / 6, abs=1e-4)
    out = compute_losses(_loss(margin=1.0, negatives="batch_all"), za, zn, zo, batch)
    assert float(out["active_fraction"]) == pytest.approx(2 / 6)


def _mining_batch():
    """Three triplets, clip = group; o2 (clip 0) would be anchor 0's semi-hard pick if allowed."""
    za, zn, zo = col(0, 10, -3), col(1, 10.2, -2.9), col(0.5, 2, 1.5)
    return za, zn, zo, labels([0, 1, 2], [3, 4, 0], [0, 1, 2], [3, 4, 0])


def test_hardest_picks_closest_valid_negative():
    # anchor 0: d_an 1, closest valid negative o0 (0.25) -> 1 - 0.25 + 4 = 4.75
    # anchor 1: d_an 0.04, closest valid o1 (64) -> 0; anchor 2: d_an 0.01, closest a0 (9) -> 0
    za, zn, zo, batch = _mining_batch()
    loss, per, valid = in_batch_triplet_loss(za, zn, zo, batch, margin=4.0, negatives="hardest")
    np.testing.assert_allclose(per, [4.75, 0.0, 0.0], atol=1e-4)
    assert np.asarray(valid).all()
    assert float(loss) == pytest.approx(4.75, abs=1e-4)


def test_semi_hard_picks_closest_negative_farther_than_neighbour():
    # anchor 0 (d_an 1): valid distances 0.25 (o0), 4 (o1), 8.41, 9, 100, 104.04; the first
    # farther than 1 is o1 (4) -> 1 - 4 + 4 = 1. o2 (2.25) is closer but shares clip 0.
    za, zn, zo, batch = _mining_batch()
    loss, per, _ = in_batch_triplet_loss(za, zn, zo, batch, margin=4.0, negatives="semi_hard")
    np.testing.assert_allclose(per, [1.0, 0.0, 0.0], atol=1e-4)
    assert float(loss) == pytest.approx(1.0, abs=1e-4)
    loss, _, _ = in_batch_triplet_loss(za, zn, zo, batch, 4.0, reduction="mean", negatives="semi_hard")
    assert float(loss) == pytest.approx(1.0 / 3.0, abs=1e-4)


def test_semi_hard_falls_back_to_hardest():
    # anchor 0: d_an 25, valid negatives a1, n1 (0.09), o0 (0.04); none farther than 25
    #   (o1 at 10000 is farther but shares clip 0) -> hardest o0: 25 - 0.04 + 1 = 25.96
    # anchor 1: d_an 0, valid a0 (0.09), n0 (22.09), o1 (9940.09) -> 0 - 0.09 + 1 = 0.91
    za, zn, zo = col(0, 0.3), col(5, 0.3), col(0.2, 100)
    batch = labels([0, 1], [1, 0], [0, 1], [1, 0])
    _, per, _ = in_batch_triplet_loss(za, zn, zo, batch, margin=1.0, negatives="semi_hard")
    np.testing.assert_allclose(per, [25.96, 0.91], atol=1e-3)


def test_in_batch_without_any_valid_negative_is_zero_not_nan():
    za, zn, zo = col(0, 1), col(0, 1), col(0, 1)
    batch = labels([0, 1], [1, 0], [7, 7], [7, 7])  # one group: nothing is a negative
    for negatives in ("batch_all", "semi_hard", "hardest"):
        out = compute_losses(_loss(negatives=negatives), za, zn, zo, batch)
        assert float(out["loss"]) == 0.0
        assert float(out["active_fraction"]) == 0.0


def test_compute_losses_weighting_mse_l2_and_monitors():
    za = tf.constant([[0.0, 0.0], [2.0, 4.0]])
    zn = tf.constant([[1.0, 0.0], [2.0, 4.0]])
    zo = tf.constant([[0.0, 3.0], [2.0, 3.5]])
    # d_an = 1, 0; d_ao = 9, 0.25; margin 1 -> per = 0, 0.75 -> triplet 0.75, active 0.5
    # squared norms 0, 20 | 1, 20 | 9, 16.25 -> l2 = 66.25 / 6
    # reconstructions: anchor error 1, neighbour error 4, opposite 0 -> mse 5 / 3
    # spread: std of za per dim = 1, 2 -> 1.5
    shape = (2, 3, 2, 1)
    batch = {
        "anchor": tf.ones(shape), "neighbour": 2 * tf.ones(shape), "opposite": 0.5 * tf.ones(shape),
        **labels([0, 1], [2, 3], [0, 1], [2, 3]),
    }
    recon = [tf.zeros(shape), tf.zeros(shape), 0.5 * tf.ones(shape)]
    cfg = _loss(margin=1.0, negatives="single", triplet_weight=0.5, mse_weight=2.0, embedding_l2=0.1)
    out = compute_losses(cfg, za, zn, zo, batch, reconstructions=recon)
    expected = {
        "triplet": 0.75, "mse": 5 / 3, "l2": 66.25 / 6, "active_fraction": 0.5,
        "d_an": 0.5, "d_ao": 4.625, "spread": 1.5,
        "loss": 0.5 * 0.75 + 2.0 * 5 / 3 + 0.1 * 66.25 / 6,
    }
    for key, value in expected.items():
        assert float(out[key]) == pytest.approx(value, rel=1e-5), key
    # explicit tiles (here: all zeros) replace the batch's tiles as targets
    out = compute_losses(cfg, za, zn, zo, batch, reconstructions=recon, tiles=[tf.zeros(shape)] * 3)
    assert float(out["mse"]) == pytest.approx(0.25 / 3)
    out = compute_losses(_loss(margin=1.0, negatives="single"), za, zn, zo, batch)
    assert float(out["mse"]) == 0.0 and float(out["loss"]) == pytest.approx(0.75)


def test_compute_losses_inside_tf_function():
    za, zn, zo, batch = _mining_batch()
    cfg = _loss(margin=4.0, negatives="semi_hard")
    out = tf.function(lambda a, n, o, b: compute_losses(cfg, a, n, o, b))(za, zn, zo, batch)
    assert float(out["loss"]) == pytest.approx(1.0, abs=1e-4)
    assert float(out["active_fraction"]) == pytest.approx(1 / 3)


def test_bad_arguments_raise_tile2audio_error():
    with pytest.raises(Tile2AudioError):
        pairwise_distance(ZA, ZN, "cosine")
    with pytest.raises(Tile2AudioError):
        triplet_loss(ZA, ZN, ZO, 1.0, reduction="sum")
    with pytest.raises(Tile2AudioError):
        in_batch_triplet_loss(ZA, ZN, ZO, {}, 1.0)
    with pytest.raises(Tile2AudioError):
        compute_losses(_loss(), ZA, ZN, ZO, {}, reconstructions=[ZA, ZN], tiles=[ZA, ZN, ZO])
    with pytest.raises(Tile2AudioError):
        compute_losses(_loss(), ZA, ZN, ZO, {}, reconstructions=[ZA, ZN, ZO])  # no tiles anywhere


def test_symmetric_batch_all_adds_the_neighbours_as_anchors():
    za, zn, zo = col(0, 4), col(1, 4), col(0.5, 3.8)
    batch = labels([0, 1], [2, 0], [10, 11], [11, 10])
    _, per_a, _ = in_batch_triplet_loss(za, zn, zo, batch, margin=1.0, negatives="batch_all")
    # The same loss with anchors and neighbours swapped gives the neighbours' rows.
    _, per_n, _ = in_batch_triplet_loss(zn, za, zo, batch, margin=1.0, negatives="batch_all")
    loss, per, valid = in_batch_triplet_loss(za, zn, zo, batch, margin=1.0, negatives="batch_all", symmetric=True)
    assert per.shape == (4, 6) and valid.shape == (4, 6)
    np.testing.assert_allclose(per[:2], per_a, atol=1e-5)
    # the candidate columns keep their order (anchors, neighbours, opposites), so the
    # swapped call's anchor and neighbour column blocks trade places
    np.testing.assert_allclose(per[2:], tf.concat([per_n[:, 2:4], per_n[:, 0:2], per_n[:, 4:]], 1), atol=1e-5)
    active = float(tf.reduce_sum(tf.cast(per > 0, tf.float32)))
    assert active > 2  # the neighbours' rows add active triplets
    assert float(loss) == pytest.approx(float(tf.reduce_sum(per)) / active, abs=1e-4)


def test_symmetric_single_uses_the_same_opposite_for_the_neighbour():
    za, zn, zo = col(0, 4), col(1, 4), col(0.9, 3.8)
    # anchors: d_an 1, 0; d_ao 0.81, 0.04 -> 1.19, 0.96
    # neighbours: d_na 1, 0; d_no 0.01, 0.04 -> 1.99, 0.96
    plain = compute_losses(_loss(margin=1.0, negatives="single"), za, zn, zo, {})
    both = compute_losses(_loss(margin=1.0, negatives="single", symmetric=True), za, zn, zo, {})
    assert float(plain["triplet"]) == pytest.approx((1.19 + 0.96) / 2, abs=1e-4)
    assert float(both["triplet"]) == pytest.approx((1.19 + 0.96 + 1.99 + 0.96) / 4, abs=1e-4)


def test_npair_by_hand_ignores_excluded_negatives():
    za = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    zn = tf.constant([[0.6, 0.8], [0.0, 1.0]])
    zo = tf.constant([[0.0, 1.0], [1.0, 0.0]])
    # Anchor 1's opposite shares anchor 0's clip: for anchor 0 it is no negative.
    batch = {"anchor_clip": tf.constant([0, 1]), "opposite_clip": tf.constant([5, 0])}
    out = compute_losses(_loss(kind="npair", temperature=0.5), za, zn, zo, batch)
    t = 0.5
    cands = np.concatenate([za.numpy(), zn.numpy(), zo.numpy()])
    a = za.numpy()
    expected = []
    for i, valid in enumerate([[False, True, False, True, True, False], [True, False, True, False, True, True]]):
        logits = [a[i] @ zn.numpy()[i] / t] + [a[i] @ c / t for c, ok in zip(cands, valid) if ok]
        expected.append(-logits[0] + np.log(np.exp(logits).sum()))
    assert float(out["triplet"]) == pytest.approx(np.mean(expected), rel=1e-5)
