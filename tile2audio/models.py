"""Keras 3 encoders (``cnn``, ``crnn``, ``resnet18``) and the optional tile decoder.

Every encoder maps a batch of log-mel tiles ``(B, T, M, 1)`` to embeddings ``(B, D)``
with ``D = model.embedding_dim``; the decoder maps ``(B, D)`` back to ``(B, T, M, 1)``.
Only built-in Keras layers are used (no ``Lambda``), so a saved ``.keras`` file loads
with ``keras.saving.load_model(path, safe_mode=True)``.

Speed on CPUs: ``build_encoder(..., fused_batch_norm=True, precision="mixed_bfloat16")``
builds the training twin. Keras 3's BatchNormalization computes its moments with separate
element-wise ops (and in float32 even under a bfloat16 policy), which cost a CPU training
step more than its convolutions; :class:`FusedBatchNorm` calls TensorFlow's fused kernel
in training instead. It is a training-time layer only: :func:`export_encoder` copies the
weights into the same architecture built with plain Keras ``BatchNormalization``, so the
saved ``.keras`` files load with safe mode and without tile2audio.

Seeding: each layer with random weights (or a dropout mask) gets its own integer seed,
drawn from ``numpy.random.SeedSequence(seed)``. Building twice with the same ``seed``
therefore gives identical initial weights, and building never touches the global
Python / NumPy / TensorFlow random state (unlike ``keras.utils.set_random_seed``).
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np

from .config import EMBED_LAYERS
from .config import PRECISIONS as CONFIG_PRECISIONS
from .config import ModelConfig
from .errors import Tile2AudioError

__all__ = ["build_encoder", "build_decoder", "export_encoder", "embedding_model", "describe", "FusedBatchNorm",
           "PRECISIONS", "HEAD_HIDDEN"]

#: Keras dtype policies an encoder can be built in (``config.PRECISIONS`` without ``auto``).
PRECISIONS = tuple(p for p in CONFIG_PRECISIONS if p != "auto")


#: Longest GRU sequence (time steps after the conv stack) that the CRNN unrolls.
MAX_UNROLL_STEPS = 64
#: Name of the projection head's hidden (ReLU) layer.
HEAD_HIDDEN = "head_hidden"


class FusedBatchNorm(keras.layers.BatchNormalization):
    """BatchNormalization whose training call is TensorFlow's fused kernel (NHWC, last axis).

    The fused op normalises with the batch's biased variance, like Keras, and returns the
    updated moving averages directly (``exponential_avg_factor = 1 - momentum``); TF's
    moving variance carries Bessel's correction (n / (n - 1)), a difference of 1/n that
    vanishes for the batch x time x mel counts of a tile batch. Inference, other ranks,
    renorm, masks and synchronised (multi-replica) batch norm fall back to Keras's call.
    Never saved: :func:`export_encoder` turns it back into a plain BatchNormalization.
    """

    def call(self, inputs, training=None, mask=None):
        import tensorflow as tf

        plain = (not training or not self.trainable or mask is not None or self.renorm
                 or self.synchronized or len(inputs.shape) != 4 or self.axis not in (-1, 3))
        if plain:
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        scale = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        offset = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, scale, offset,
            mean=tf.convert_to_tensor(self.moving_mean), variance=tf.convert_to_tensor(self.moving_variance),
            epsilon=self.epsilon, data_format="NHWC", is_training=True,
            exponential_avg_factor=1.0 - self.momentum,
        )
        self.moving_mean.assign(mean)
        self.moving_variance.assign(variance)
        return tf.cast(y, self.compute_dtype)


class _Seeds:
    """One build's per-layer integer seeds (a deterministic stream from one seed) and its batch-norm class."""

    def __init__(self, seed: int, block: int = 256, fused_batch_norm: bool = False) -> None:
        self.batch_norm = FusedBatchNorm if fused_batch_norm else keras.layers.BatchNormalization
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise Tile2AudioError(f"model seed must be a non-negative integer, got {seed!r}")
        self._sequence = np.random.SeedSequence(int(seed))
        self._block = block
        self._pool: list[int] = []

    def next(self) -> int:
        """The next seed (fits in int32 so every backend accepts it)."""
        if not self._pool:
            # spawn() gives a fresh, independent child each time the pool runs dry.
            child = self._sequence.spawn(1)[0]
            self._pool = [int(s) & 0x7FFFFFFF for s in child.generate_state(self._block)]
        return self._pool.pop(0)

    def glorot(self) -> keras.initializers.Initializer:
        """A seeded Glorot-uniform initializer (Keras' default for conv and dense kernels)."""
        return keras.initializers.GlorotUniform(seed=self.next())

    def he(self) -> keras.initializers.Initializer:
        """A seeded He-normal initializer (ResNet convolutions, followed by ReLU)."""
        return keras.initializers.HeNormal(seed=self.next())


# --------------------------------------------------------------------------- checks


def _check_shape(input_shape: Sequence[int | None], what: str) -> tuple:
    """Validate a (time, mels, channels) tile shape."""
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise Tile2AudioError(
            f"{what} input_shape must be (time, mels, channels), got {input_shape!r}"
        )
    for i, size in enumerate(shape):
        if size is None and i == 0 and what == "encoder":
            continue  # variable-length time axis is fine for the encoders
        if size is None or int(size) <= 0:
            raise Tile2AudioError(f"{what} input_shape must have positive sizes, got {input_shape!r}")
    return tuple(None if s is None else int(s) for s in shape)


def _check_model(model: ModelConfig) -> None:
    """Raise unless ``model`` is a ModelConfig (its fields are checked by ModelConfig itself)."""
    if not isinstance(model, ModelConfig):
        raise Tile2AudioError(f"expected a ModelConfig, got {type(model).__name__}")


def _spatial(x) -> tuple[int | None, int | None]:
    """Static (time, mels) sizes of a 4-D Keras tensor."""
    return x.shape[1], x.shape[2]


# --------------------------------------------------------------------------- conv blocks


def _pool_for(size: int | None, pool: int) -> int:
    """Pool length on one axis: none when the axis is already 1, at most the axis length."""
    if size is None:
        return pool
    return max(1, min(pool, size))


def _conv_block(x, width: int, model: ModelConfig, seeds: _Seeds, name: str):
    """Conv2D -> (BatchNorm) -> ReLU -> MaxPool (per-axis, skipped on length-1 axes) -> (Dropout)."""
    x = keras.layers.Conv2D(
        width, model.kernel_size, strides=model.stride, padding="same",
        use_bias=not model.batch_norm, kernel_initializer=seeds.glorot(), name=f"{name}_conv",
    )(x)
    if model.batch_norm:
        x = seeds.batch_norm(name=f"{name}_bn")(x)
    x = keras.layers.ReLU(name=f"{name}_relu")(x)
    t, m = _spatial(x)
    pool = (_pool_for(t, model.pool_size), _pool_for(m, model.pool_size))
    if pool != (1, 1):
        x = keras.layers.MaxPooling2D(pool_size=pool, name=f"{name}_pool")(x)
    if model.dropout > 0:
        x = keras.layers.Dropout(model.dropout, seed=seeds.next(), name=f"{name}_dropout")(x)
    return x


def _conv_stack(x, model: ModelConfig, seeds: _Seeds):
    """One conv block per entry of ``model.widths``."""
    for i, width in enumerate(model.widths):
        x = _conv_block(x, int(width), model, seeds, name=f"block{i + 1}")
    return x


def _global_pool(x, how: str, model: ModelConfig | None = None, seeds: "_Seeds | None" = None):
    """Global average, max, or both over (time, mels); ``time``: average over time only;
    ``frames``: per-frame dense layer over (mels x channels), then mean and max over time."""
    if how == "frames":
        _, mels, channels = x.shape[1:]
        x = keras.layers.Reshape((-1, int(mels) * int(channels)), name="frames_to_features")(x)
        x = keras.layers.Dense(model.frame_units, activation="relu", kernel_initializer=seeds.glorot(),
                               name="frame_dense")(x)
        avg = keras.layers.GlobalAveragePooling1D(name="time_avg")(x)
        mx = keras.layers.GlobalMaxPooling1D(name="time_max")(x)
        return keras.layers.Concatenate(name="time_avgmax")([avg, mx])
    if how == "time":
        # Keeps where in the spectrum a feature fired: the mel axis is not shift-invariant.
        _, mels, channels = x.shape[1:]
        x = keras.layers.Reshape((-1, int(mels) * int(channels)), name="mels_to_features")(x)
        return keras.layers.GlobalAveragePooling1D(name="time_avg")(x)
    if how == "avg":
        return keras.layers.GlobalAveragePooling2D(name="global_avg")(x)
    if how == "max":
        return keras.layers.GlobalMaxPooling2D(name="global_max")(x)
    avg = keras.layers.GlobalAveragePooling2D(name="global_avg")(x)
    mx = keras.layers.GlobalMaxPooling2D(name="global_max")(x)
    return keras.layers.Concatenate(name="global_avgmax")([avg, mx])


# --------------------------------------------------------------------------- encoders


def _cnn_body(x, model: ModelConfig, seeds: _Seeds):
    """Conv blocks then global pooling: (B, T, M, C) -> (B, F)."""
    x = _conv_stack(x, model, seeds)
    return _global_pool(x, model.global_pool, model, seeds)


def _crnn_body(x, model: ModelConfig, seeds: _Seeds):
    """Conv blocks, mel axis folded into features, then a (bi)GRU over time: -> (B, F)."""
    x = _conv_stack(x, model, seeds)
    mels, channels = x.shape[2], x.shape[3]
    x = keras.layers.Reshape((-1, int(mels) * int(channels)), name="to_sequence")(x)
    steps = x.shape[1]
    # Unrolled, the GRU computes the same thing as in Keras's while-loop, but on a CPU the
    # loop's per-step overhead (and its backward pass) cost more than the few steps left
    # after pooling (4 for 1.5 s tiles): unrolling made the CRNN's training step ~8 % faster.
    unroll = steps is not None and int(steps) <= MAX_UNROLL_STEPS

    def gru(backwards: bool, name: str) -> keras.layers.GRU:
        return keras.layers.GRU(
            model.rnn_units, go_backwards=backwards, name=name, unroll=unroll,
            kernel_initializer=seeds.glorot(),
            recurrent_initializer=keras.initializers.Orthogonal(seed=seeds.next()),
        )

    if not model.bidirectional:
        return gru(False, "gru")(x)
    # An explicit backward layer gets its own seeds; the default copy would start
    # with weights identical to the forward layer's.
    return keras.layers.Bidirectional(
        gru(False, "gru_forward"), backward_layer=gru(True, "gru_backward"), name="bigru"
    )(x)


def _conv_bn(x, width: int, kernel: int, stride: int, seeds: _Seeds, name: str, relu: bool = True):
    """Conv (no bias) -> BatchNorm -> optional ReLU, 'same' padding."""
    x = keras.layers.Conv2D(
        width, kernel, strides=stride, padding="same", use_bias=False,
        kernel_initializer=seeds.he(), name=f"{name}_conv",
    )(x)
    x = seeds.batch_norm(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _axis_strides(x, stride: int) -> tuple[int, int]:
    """Stride per spatial axis, 1 on an axis already of length 1 (keeps tiny inputs valid)."""
    t, m = _spatial(x)
    return (1 if t == 1 else stride, 1 if m == 1 else stride)


def _basic_block(x, width: int, stride: int, seeds: _Seeds, name: str):
    """ResNet BasicBlock: two 3x3 convs plus an identity or 1x1-projection shortcut."""
    strides = _axis_strides(x, stride)
    shortcut = x
    if strides != (1, 1) or x.shape[-1] != width:
        shortcut = _conv_bn(x, width, 1, strides, seeds, f"{name}_proj", relu=False)
    y = _conv_bn(x, width, 3, strides, seeds, f"{name}_a")
    y = _conv_bn(y, width, 3, 1, seeds, f"{name}_b", relu=False)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _resnet18_body(x, model: ModelConfig, seeds: _Seeds):
    """ResNet-18 (stem 7x7/2 + maxpool 3x3/2, 4 stages x 2 BasicBlocks), global avg pool.

    Always uses batch normalisation (it is part of the architecture), whatever
    ``model.batch_norm`` says. 'same' padding and per-axis strides keep inputs as small as
    32 x 16 valid: an axis that has shrunk to 1 is no longer strided.
    """
    w = int(model.resnet_width)
    x = _conv_bn(x, w, 7, _axis_strides(x, 2), seeds, "stem")
    x = keras.layers.MaxPooling2D(3, strides=_axis_strides(x, 2), padding="same", name="stem_pool")(x)
    for stage, mult in enumerate((1, 2, 4, 8), start=1):
        for block in (1, 2):
            stride = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, w * mult, stride, seeds, f"stage{stage}_block{block}")
    return keras.layers.GlobalAveragePooling2D(name="global_avg")(x)


_BODIES = {"cnn": _cnn_body, "crnn": _crnn_body, "resnet18": _resnet18_body}


def build_encoder(
    model: ModelConfig,
    input_shape: tuple[int, int, int],
    seed: int = 0,
    name: str = "encoder",
    *,
    precision: str = "float32",
    fused_batch_norm: bool = False,
) -> keras.Model:
    """Build the tile encoder chosen by ``model.encoder``.

    Parameters
    ----------
    model : ModelConfig
        Architecture: ``encoder`` (``cnn``, ``crnn`` or ``resnet18``), ``widths``,
        ``kernel_size``, ``stride``, ``pool_size``, ``batch_norm``, ``dropout``,
        ``global_pool``, ``rnn_units``, ``bidirectional``, ``resnet_width``,
        ``embedding_dim`` and ``l2_normalize``.
    input_shape : tuple of int
        Tile shape ``(T, M, C)`` (time frames, mel bands, channels; C is 1 for log-mel).
        ``T`` may be None for a variable-length time axis.
    seed : int, optional
        Seed of the initial weights (and dropout masks); the same seed gives the same
        weights. The global random state is not touched.
    name : str, optional
        Name of the returned model.
    precision : {"float32", "mixed_bfloat16", "mixed_float16"}, optional
        Keras dtype policy of every layer but the last two: the ``embedding`` dense layer
        and the L2 normalisation always compute in float32, so embeddings, distances and
        losses stay float32.
    fused_batch_norm : bool, optional
        Use :class:`FusedBatchNorm` (the training twin; see :func:`export_encoder`).

    Returns
    -------
    keras.Model
        Maps ``(B, T, M, C)`` float32 to ``(B, embedding_dim)`` float32; with
        ``model.l2_normalize`` every output row has unit L2 norm.

    Raises
    ------
    Tile2AudioError
        For a malformed ``input_shape``, seed or configuration.
    """
    _check_model(model)
    if precision not in PRECISIONS:
        raise Tile2AudioError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    shape = _check_shape(input_shape, "encoder")
    seeds = _Seeds(seed, fused_batch_norm=fused_batch_norm)
    previous = keras.config.dtype_policy()
    # The policy is global in Keras; it is set for this build only and always restored.
    keras.config.set_dtype_policy(precision)
    try:
        inputs = keras.Input(shape=shape, name="tile")
        x = _BODIES[model.encoder](inputs, model, seeds)
    finally:
        keras.config.set_dtype_policy(previous)
    if model.head_units:
        # SimCLR's projection head: the loss acts on its output, while embeddings are read
        # before it (ModelConfig.embed_layer), where less is specialised to the pretext.
        x = keras.layers.Dense(model.head_units, activation="relu", kernel_initializer=seeds.glorot(),
                               name=HEAD_HIDDEN, dtype="float32")(x)
    x = keras.layers.Dense(model.embedding_dim, kernel_initializer=seeds.glorot(), name="embedding",
                           dtype="float32")(x)
    if model.l2_normalize:
        x = keras.layers.UnitNormalization(axis=-1, name="l2_normalize", dtype="float32")(x)
    return keras.Model(inputs, x, name=name)


def export_encoder(encoder: keras.Model, model: ModelConfig, precision: str = "float32") -> keras.Model:
    """The same encoder built with plain Keras layers only, holding ``encoder``'s weights.

    Parameters
    ----------
    encoder : keras.Model
        An encoder from :func:`build_encoder` (possibly with ``fused_batch_norm=True``).
    model : ModelConfig
        The configuration it was built from.
    precision : str, optional
        Dtype policy of the copy (the run's precision, so that embedding runs in it).

    Returns
    -------
    keras.Model
        Same architecture, layer names and weights, with :class:`FusedBatchNorm` replaced
        by ``BatchNormalization``: it saves and loads with ``safe_mode=True``.
    """
    twin = build_encoder(model, tuple(encoder.input_shape[1:]), seed=0, name=encoder.name,
                         precision=precision)
    twin.set_weights(encoder.get_weights())
    return twin


def embedding_model(encoder: keras.Model, layer: str = "output") -> keras.Model:
    """The part of an encoder that embeddings are read from (``ModelConfig.embed_layer``).

    Parameters
    ----------
    encoder : keras.Model
        From :func:`build_encoder` (or loaded from a run), mapping (B, T, M, 1) to (B, D).
    layer : {"output", "hidden", "pooled"}
        ``output``: the encoder itself; ``hidden``: the projection head's ReLU layer
        (B, head_units); ``pooled``: the body's pooled representation (B, F), the input of
        the first dense layer after the body.

    Returns
    -------
    keras.Model
        Shares ``encoder``'s layers and weights.
    """
    if layer not in EMBED_LAYERS:
        raise Tile2AudioError(f"embed layer must be one of {list(EMBED_LAYERS)}, got {layer!r}")
    if layer == "output":
        return encoder
    names = {lay.name for lay in encoder.layers}
    if layer == "hidden":
        if HEAD_HIDDEN not in names:
            raise Tile2AudioError("embed layer 'hidden' needs an encoder with a projection head (model.head_units > 0)")
        out = encoder.get_layer(HEAD_HIDDEN).output
    else:
        out = encoder.get_layer(HEAD_HIDDEN if HEAD_HIDDEN in names else "embedding").input
    return keras.Model(encoder.input, out, name=f"{encoder.name}_{layer}")


# --------------------------------------------------------------------------- decoder


def _fit_axis(size: int, target: int) -> tuple[int, int]:
    """(crop, pad) totals that bring ``size`` to ``target``."""
    return max(0, size - target), max(0, target - size)


def _fit_to(x, target: tuple[int, int]):
    """Crop (Cropping2D) or zero-pad (ZeroPadding2D) the spatial axes to exactly ``target``."""
    (ct, pt), (cm, pm) = (_fit_axis(s, t) for s, t in zip(_spatial(x), target))
    if ct or cm:
        x = keras.layers.Cropping2D(((ct // 2, ct - ct // 2), (cm // 2, cm - cm // 2)), name="crop")(x)
    if pt or pm:
        x = keras.layers.ZeroPadding2D(((pt // 2, pt - pt // 2), (pm // 2, pm - pm // 2)), name="pad")(x)
    return x


def build_decoder(
    model: ModelConfig,
    input_shape: tuple[int, int, int],
    output_activation: str = "linear",
    seed: int = 0,
    name: str = "decoder",
) -> keras.Model:
    """Build the decoder that reconstructs a tile from its embedding.

    Dense to a small ``(t0, m0, widths[-1])`` grid (``t0 = ceil(T / 2**n)``,
    ``m0 = ceil(M / 2**n)``, ``n = len(widths)``), then one stride-2 Conv2DTranspose block
    per width in reverse order, a crop (or pad) to exactly ``(T, M)`` and a final
    ``C``-channel convolution with ``output_activation``.

    Parameters
    ----------
    model : ModelConfig
        Uses ``embedding_dim``, ``widths``, ``kernel_size`` and ``batch_norm``.
    input_shape : tuple of int
        The tile shape ``(T, M, C)`` to reconstruct (the encoder's input shape).
    output_activation : {"linear", "sigmoid"}, optional
        ``sigmoid`` for min-max normalised features in [0, 1], ``linear`` otherwise.
    seed : int, optional
        Seed of the initial weights; the global random state is not touched.
    name : str, optional
        Name of the returned model.

    Returns
    -------
    keras.Model
        Maps ``(B, embedding_dim)`` to ``(B, T, M, C)``.

    Raises
    ------
    Tile2AudioError
        For a malformed shape, activation or configuration.
    """
    _check_model(model)
    if output_activation not in ("linear", "sigmoid"):
        raise Tile2AudioError(
            f"output_activation must be 'linear' or 'sigmoid', got {output_activation!r}"
        )
    time, mels, channels = _check_shape(input_shape, "decoder")
    seeds = _Seeds(seed)
    widths = [int(w) for w in model.widths][::-1]
    scale = 2 ** len(widths)
    grid = (math.ceil(time / scale), math.ceil(mels / scale), widths[0])

    inputs = keras.Input(shape=(model.embedding_dim,), name="embedding")
    x = keras.layers.Dense(int(np.prod(grid)), kernel_initializer=seeds.glorot(), name="project")(inputs)
    x = keras.layers.ReLU(name="project_relu")(x)
    x = keras.layers.Reshape(grid, name="to_grid")(x)
    for i, width in enumerate(widths):
        x = keras.layers.Conv2DTranspose(
            width, model.kernel_size, strides=2, padding="same", use_bias=not model.batch_norm,
            kernel_initializer=seeds.glorot(), name=f"up{i + 1}_deconv",
        )(x)
        if model.batch_norm:
            x = keras.layers.BatchNormalization(name=f"up{i + 1}_bn")(x)
        x = keras.layers.ReLU(name=f"up{i + 1}_relu")(x)
    x = _fit_to(x, (time, mels))
    x = keras.layers.Conv2D(
        channels, model.kernel_size, padding="same", activation=output_activation,
        kernel_initializer=seeds.glorot(), name="reconstruction",
    )(x)
    return keras.Model(inputs, x, name=name)


# --------------------------------------------------------------------------- logging


def describe(model: keras.Model) -> str:
    """One-line summary of a model for logs: name, shapes and parameter counts.

    Parameters
    ----------
    model : keras.Model
        A built model.

    Returns
    -------
    str
        e.g. ``"encoder: (None, 32, 16, 1) -> (None, 8), 1,234 params (1,200 trainable)"``.
    """
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    total = int(sum(np.prod(w.shape) for w in model.weights))
    return (
        f"{model.name}: {tuple(model.input_shape)} -> {tuple(model.output_shape)}, "
        f"{total:,} params ({trainable:,} trainable)"
    )
