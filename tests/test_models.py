"""Tests of tile2audio.models: shapes, unit norm, seeding, safe-mode save/load, decoder shapes."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest

from tile2audio import Tile2AudioError
from tile2audio.config import ModelConfig
from tile2audio.models import FusedBatchNorm, build_decoder, build_encoder, describe, export_encoder

TILE = (32, 16, 1)
TINY = dict(widths=(4, 8), embedding_dim=6, rnn_units=4, resnet_width=4)
ENCODERS = ["cnn", "crnn", "resnet18"]


def _cfg(encoder: str = "cnn", **kw) -> ModelConfig:
    """A tiny ModelConfig for fast tests."""
    return ModelConfig(encoder=encoder, **{**TINY, **kw})


def _tiles(n: int = 3, shape=TILE, seed: int = 0) -> np.ndarray:
    """Random float32 tiles (n, *shape)."""
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype("float32")


def _same_weights(m1: keras.Model, m2: keras.Model) -> bool:
    """True when both models hold identical weight arrays."""
    w1, w2 = m1.get_weights(), m2.get_weights()
    return len(w1) == len(w2) and all(np.array_equal(a, b) for a, b in zip(w1, w2))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_encoder_shape_norm_seed_and_safe_reload(encoder, tmp_path):
    cfg = _cfg(encoder, global_pool="avgmax", dropout=0.1)
    model = build_encoder(cfg, TILE, seed=3)
    x = _tiles()
    z = np.asarray(model(x, training=False))
    assert z.shape == (3, cfg.embedding_dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)

    assert _same_weights(model, build_encoder(cfg, TILE, seed=3))
    assert not _same_weights(model, build_encoder(cfg, TILE, seed=4))

    path = tmp_path / "encoder.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x, training=False)), z, rtol=1e-6, atol=1e-6)


def test_encoder_without_l2_is_not_normalised_and_pool_modes_work():
    x = _tiles()
    for pool in ("avg", "max"):
        z = np.asarray(build_encoder(_cfg(l2_normalize=False, global_pool=pool), TILE)(x))
        assert z.shape == (3, TINY["embedding_dim"])
        assert not np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-3)


def test_time_pooling_keeps_the_mel_axis_and_reloads(tmp_path):
    cfg = _cfg(global_pool="time", l2_normalize=False)
    model = build_encoder(cfg, TILE)
    # 16 mels after two 2x2 pools -> 4 bands of 8 channels, averaged over time only
    assert model.get_layer("time_avg").output.shape[-1] == 4 * 8
    x = _tiles()
    z = np.asarray(model(x, training=False))
    assert z.shape == (3, TINY["embedding_dim"])
    path = tmp_path / "encoder.keras"
    model.save(path)
    np.testing.assert_allclose(np.asarray(keras.saving.load_model(path, safe_mode=True)(x, training=False)), z,
                               rtol=1e-6, atol=1e-6)
    # a variable-length time axis still works
    var = build_encoder(cfg, (None, 16, 1))
    assert var(_tiles(2, (48, 16, 1))).shape == (2, TINY["embedding_dim"])


def test_crnn_unidirectional_and_no_batch_norm():
    cfg = _cfg("crnn", bidirectional=False, batch_norm=False)
    model = build_encoder(cfg, TILE)
    assert model(_tiles()).shape == (3, cfg.embedding_dim)
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_bidirectional_directions_start_with_different_weights():
    model = build_encoder(_cfg("crnn"), TILE)
    bi = model.get_layer("bigru")
    fwd, bwd = bi.forward_layer.get_weights(), bi.backward_layer.get_weights()
    assert not np.array_equal(fwd[0], bwd[0])


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("shape", [(5, 3, 1), (1, 1, 1), (9, 40, 1)])
def test_encoders_accept_tiny_and_odd_inputs(encoder, shape):
    # Pooling/strides are skipped on axes that have already shrunk to 1.
    cfg = _cfg(encoder, widths=(4, 8, 8))
    z = build_encoder(cfg, shape)(_tiles(2, shape))
    assert z.shape == (2, cfg.embedding_dim)
    assert np.all(np.isfinite(np.asarray(z)))


def test_cnn_variable_time_axis():
    model = build_encoder(_cfg("cnn"), (None, 16, 1))
    assert model(_tiles(2, (20, 16, 1))).shape == (2, TINY["embedding_dim"])
    assert model(_tiles(2, (41, 16, 1))).shape == (2, TINY["embedding_dim"])


def test_resnet18_has_18_weighted_layers():
    model = build_encoder(_cfg("resnet18"), TILE)
    convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D) and l.kernel_size != (1, 1)]
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    assert len(convs) + len(dense) == 18
    widths = sorted({l.filters for l in convs})
    assert widths == [4, 8, 16, 32]


@pytest.mark.parametrize("shape", [(65, 64, 1), (43, 40, 1), (32, 16, 1), (7, 5, 1), (1, 3, 1)])
def test_decoder_output_shape_matches_tile(shape):
    cfg = _cfg()
    decoder = build_decoder(cfg, shape, output_activation="linear")
    z = np.random.default_rng(1).normal(size=(2, cfg.embedding_dim)).astype("float32")
    out = np.asarray(decoder(z))
    assert out.shape == (2, *shape)


def test_decoder_sigmoid_range_seed_and_reload(tmp_path):
    cfg = _cfg()
    shape = (43, 40, 1)
    decoder = build_decoder(cfg, shape, output_activation="sigmoid", seed=5)
    z = 10.0 * np.random.default_rng(2).normal(size=(4, cfg.embedding_dim)).astype("float32")
    out = np.asarray(decoder(z))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert _same_weights(decoder, build_decoder(cfg, shape, "sigmoid", seed=5))
    assert not _same_weights(decoder, build_decoder(cfg, shape, "sigmoid", seed=6))
    path = tmp_path / "decoder.keras"
    decoder.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(z)), out, rtol=1e-6, atol=1e-6)
    linear = np.asarray(build_decoder(cfg, shape, "linear", seed=5)(z))
    assert linear.min() < 0.0


def test_describe_reports_parameter_count():
    model = build_encoder(_cfg(), TILE)
    text = describe(model)
    assert text.startswith("encoder:")
    assert f"{model.count_params():,} params" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "call",
    [
        lambda: build_encoder(_cfg(), (32, 16)),
        lambda: build_encoder(_cfg(), (32, 0, 1)),
        lambda: build_encoder(_cfg(), TILE, seed=-1),
        lambda: build_encoder(dataclasses.replace(_cfg(), dropout=1.0), TILE),
        lambda: build_encoder(dataclasses.replace(_cfg(), kernel_size=0), TILE),
        lambda: build_decoder(_cfg(), TILE, output_activation="tanh"),
        lambda: build_decoder(_cfg(), (None, 16, 1)),
    ],
)
def test_bad_arguments_raise_tile2audio_error(call):
    with pytest.raises(Tile2AudioError):
        call()


# --------------------------------------------------------------------------- speed path


def test_fused_batch_norm_matches_keras_batch_norm_in_training():
    x = _tiles(8, (6, 5, 3), seed=1) * 3.0 + 1.0
    plain = keras.layers.BatchNormalization(momentum=0.9)
    fused = FusedBatchNorm(momentum=0.9)
    for layer in (plain, fused):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 3).astype("float32"))
        layer.beta.assign(np.array([0.1, -0.2, 0.3], "float32"))
    y_plain = np.asarray(plain(x, training=True))
    y_fused = np.asarray(fused(x, training=True))
    np.testing.assert_allclose(y_fused, y_plain, atol=1e-4)
    np.testing.assert_allclose(np.asarray(fused.moving_mean), np.asarray(plain.moving_mean), atol=1e-5)
    # TF's fused kernel keeps the unbiased variance: n / (n - 1) of Keras's, n = 8 * 6 * 5.
    n = 8 * 6 * 5
    plain_var = np.asarray(plain.moving_variance)
    expected = 0.9 * 1.0 + 0.1 * (plain_var - 0.9) / 0.1 * n / (n - 1)
    np.testing.assert_allclose(np.asarray(fused.moving_variance), expected, rtol=1e-4)
    # Inference uses the moving statistics, like Keras.
    np.testing.assert_allclose(np.asarray(fused(x, training=False)), np.asarray(
        keras.layers.BatchNormalization.call(fused, x, training=False)), atol=1e-6)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_export_gives_plain_layers_same_outputs_and_safe_reload(encoder, tmp_path):
    cfg = _cfg(encoder)
    fast = build_encoder(cfg, TILE, seed=2, precision="mixed_bfloat16", fused_batch_norm=True)
    assert any(isinstance(layer, FusedBatchNorm) for layer in fast.layers)
    fast(_tiles(4), training=True)  # move the batch-norm statistics away from their start
    exported = export_encoder(fast, cfg, "mixed_bfloat16")
    assert not any(isinstance(layer, FusedBatchNorm) for layer in exported.layers)
    x = _tiles(3, seed=5)
    np.testing.assert_allclose(np.asarray(exported(x)), np.asarray(fast(x)), atol=1e-6)
    path = tmp_path / "enc.keras"
    exported.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    assert loaded.get_layer(exported.layers[1].name).dtype_policy.name == "mixed_bfloat16"
    out = np.asarray(loaded(x))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.asarray(exported(x)), atol=1e-6)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_bfloat16_embeddings_agree_with_float32(encoder):
    cfg = _cfg(encoder)
    f32 = build_encoder(cfg, TILE, seed=4)
    bf16 = export_encoder(f32, cfg, "mixed_bfloat16")
    x = _tiles(6, seed=7)
    a, b = np.asarray(f32(x)), np.asarray(bf16(x))
    cos = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.99, cos


def test_build_never_leaves_the_global_policy_changed():
    before = keras.config.dtype_policy().name
    build_encoder(_cfg(), TILE, precision="mixed_bfloat16")
    assert keras.config.dtype_policy().name == before
    with pytest.raises(Tile2AudioError, match="precision must be one of"):
        build_encoder(_cfg(), TILE, precision="float8")


def test_crnn_unrolls_short_sequences_and_computes_what_the_loop_computes(monkeypatch):
    import tile2audio.models as models

    unrolled = build_encoder(_cfg("crnn"), TILE, seed=3)
    assert unrolled.get_layer("bigru").forward_layer.unroll
    monkeypatch.setattr(models, "MAX_UNROLL_STEPS", 0)
    looped = build_encoder(_cfg("crnn"), TILE, seed=3)
    assert not looped.get_layer("bigru").forward_layer.unroll
    x = _tiles(4, seed=9)
    np.testing.assert_allclose(np.asarray(unrolled(x, training=True)), np.asarray(looped(x, training=True)),
                               atol=1e-6)


def test_projection_head_layers_and_embedding_model_read_before_the_head(tmp_path):
    from tile2audio.models import HEAD_HIDDEN, embedding_model

    cfg = ModelConfig(widths=(4, 8), embedding_dim=6, head_units=10)
    enc = build_encoder(cfg, (16, 16, 1), seed=0)
    x = np.random.default_rng(0).standard_normal((3, 16, 16, 1)).astype(np.float32)
    hidden = embedding_model(enc, "hidden")
    pooled = embedding_model(enc, "pooled")
    assert enc.output_shape == (None, 6) and hidden.output_shape == (None, 10) and pooled.output_shape == (None, 8)
    h = hidden(x).numpy()
    assert (h >= 0).all()  # the head's ReLU layer
    # The head maps the pooled representation to the hidden layer, and the hidden layer to the output.
    dense = enc.get_layer(HEAD_HIDDEN)
    np.testing.assert_allclose(np.maximum(pooled(x).numpy() @ dense.kernel.numpy() + dense.bias.numpy(), 0), h,
                               rtol=1e-4, atol=1e-5)
    assert embedding_model(enc, "output") is enc
    plain = build_encoder(ModelConfig(widths=(4, 8), embedding_dim=6), (16, 16, 1), seed=0)
    assert embedding_model(plain, "pooled").output_shape == (None, 8)
    with pytest.raises(Tile2AudioError, match="projection head"):
        embedding_model(plain, "hidden")
    with pytest.raises(Tile2AudioError, match="projection head"):
        ModelConfig(embed_layer="hidden")
    assert ModelConfig(head_units=4).embedding_layer == "hidden" and ModelConfig().embedding_layer == "output"
