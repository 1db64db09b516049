"""A portable embedding model: a run's encoder with the front end inside one graph.

``tile2audio export RUN -o DIR`` (:func:`export_run`) writes a folder that loads with
TensorFlow alone, in a process that never imports tile2audio::

    import tensorflow as tf
    m = tf.saved_model.load("DIR")
    out = m.embed(wave)   # wave: float32 [n_samples] or [batch, n_samples] at m.sample_rate
    out["embeddings"], out["timestamps"], out["clip_embedding"]

Layout of ``DIR``::

    saved_model.pb, variables/   the SavedModel (``--format saved_model``, the default); signatures
                                 serving_default (= embed), embed, embed_clip (rank 1), info
    model.tflite                 the TFLite flatbuffer (``--format tflite``)
    export.json                  what was exported: run, weights, precision, shapes, sample rate
    model_card.md                config, data set, probe figures, input contract, outputs

The graph (:class:`EmbeddingGraph`) reproduces, step by step, what ``tile2audio embed``
does with an audio file that ``tile2audio.audio.load_audio`` has already decoded:

1. *Short clips*: a clip shorter than ``features.min_seconds`` is looped up to it
   (``tile2audio.audio.loop_pad``, ``short_policy='pad'``; a run with ``skip`` is
   exported with ``pad`` too: a model must answer every clip).
2. *STFT*: ``tf.signal.stft`` on the clip zero-padded by ``n_fft // 2`` on both sides
   (librosa's ``center=True, pad_mode='constant'``), frame ``n_fft``, hop
   ``hop_length``, the window of :func:`tile2audio.features.stft_window` (periodic Hann
   of ``win_length``, centred in ``n_fft``); power = re^2 + im^2.
3. *Mel*: the power spectrogram times :func:`tile2audio.features.mel_basis` (the same
   librosa filter bank as the cache, stored as a constant).
4. *Log*: ``log='db'``: ``10 log10(max(mel, 1e-10))``, then, with ``top_db``, floored
   at the clip's own maximum minus ``top_db`` (``librosa.power_to_db(ref=1.0)``; the
   maximum is taken per clip, also in a batch); ``log='log'``: ``log(mel + log_eps)``.
5. *Normalisation*: ``standardize`` with the run's cache statistics as constants
   (std floored at ``features.STD_FLOOR``), or per-clip ``minmax`` (range floored at
   ``features.MIN_SCALE``), or none.
6. *Tiles*: :func:`tile2audio.tiles.tile_starts` (a hop of ``hop_frames``, a last tile
   aligned to the end, one tile for a clip shorter than a tile, looped to a tile), then
   the encoder, ``chunk_tiles`` tiles per forward pass (a ``tf.map_fn`` loop: memory
   stays bounded on hour-long input).
7. *Outputs*: ``embeddings`` [n_tiles, D] (the layer ``tile2audio embed`` writes),
   ``timestamps`` [n_tiles, 2] float32 start and end seconds (the end clipped to the
   looped clip's last frame, as :func:`tile2audio.tiles.tile_timestamps`), and
   ``clip_embedding`` [2 D]: the mean then the (population) standard deviation of the
   tile embeddings, the probes' ``meanstd`` pooling. A [batch, n_samples] input (clips
   of the same length) prepends the batch axis to all three.

Input contract: mono float32 samples in [-1, 1] at the run's sample rate
(``m.sample_rate``). Resampling stays outside the graph: audio at another rate gives
embeddings of the wrong sound, and converting it is the caller's job (``soxr`` or
``librosa.resample``; tile2audio uses soxr's ``soxr_hq``). The graph refuses, with an
``InvalidArgumentError`` naming the problem, a rank other than 1 or 2, an empty batch,
clips shorter than one STFT hop (``hop_length`` samples; this is what catches stereo
passed as [n_samples, 2]), NaN or inf samples, and samples beyond +-:data:`MAX_ABS`
(TensorFlow converts an int16 array to float32 before the graph sees it; the range check
is what catches int16 PCM, which must be scaled by 1/32768 first). :func:`load_exported` wraps a
SavedModel with the same checks as :class:`~tile2audio.errors.Tile2AudioError`
messages, for code that has tile2audio.

Precision: the graph is float32 by default (``precision='float32'``: a run trained in
mixed bfloat16 is rebuilt in float32, same weights). ``precision='run'`` keeps the
run's dtype policy, which is what ``tile2audio embed`` computes in; see the README
for what bfloat16 changes.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import atomic
from .config import EXPORT_FORMATS, EXPORT_PRECISIONS, WEIGHTS, FeatureParams, to_dict
from .errors import Tile2AudioError
from .features import MIN_SCALE, STD_FLOOR, mel_basis, stft_window
from .runs import Run, open_run
from .tiles import TileGeometry

log = logging.getLogger(__name__)

EXPORT_VERSION = 1
#: Tiles per forward pass inside the exported graph (bounds its activation memory).
CHUNK_TILES = 128
#: Largest |sample| the graph accepts: float audio is in [-1, 1] (some overshoot from
#: resampling or mixing is fine); int16 PCM cast to float is far beyond it.
MAX_ABS = 4.0
#: librosa.power_to_db's ``amin``.
AMIN = 1e-10
TFLITE_FILE = "model.tflite"
CARD_FILE = "model_card.md"
INFO_FILE = "export.json"


def float32_encoder(encoder):
    """The same Keras model with every layer's dtype policy set to float32, same weights.

    Parameters
    ----------
    encoder : keras.Model
        A functional model, (B, T, M, 1) -> (B, D), in any dtype policy.

    Returns
    -------
    keras.Model
        ``encoder`` itself when it already computes in float32, else a float32 twin
        built from its config (built-in layers only, as in safe mode).
    """
    changed = []

    def walk(node):
        if isinstance(node, dict):
            # Keras 3 serialises a layer's policy as {"class_name": "DTypePolicy", "config": {"name": ...}}.
            policy = node.get("config") if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") else None
            if isinstance(policy, dict) and policy.get("name") != "float32":
                policy["name"] = "float32"
                changed.append(True)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    config = copy.deepcopy(encoder.get_config())
    walk(config)
    if not changed:
        return encoder
    twin = encoder.__class__.from_config(config)
    twin.set_weights(encoder.get_weights())
    return twin


class EmbeddingGraph:
    """The exported computation: waveform in, tile embeddings, timestamps and clip embedding out.

    Plain TensorFlow functions over the run's encoder and front-end constants;
    :meth:`archive` wraps them as the SavedModel's endpoints.

    Parameters
    ----------
    encoder : keras.Model
        (B, T, M, 1) -> (B, D), T = ``geometry.tile_frames``, M = ``params.n_mels``.
    params : FeatureParams
        The run's front end.
    stats : dict
        ``mean`` and ``std`` (n_mels,) of the run's cache (``standardize``).
    geometry : TileGeometry
        The run's tile and hop lengths in frames.
    chunk_tiles : int
        Tiles per forward pass.
    """

    def __init__(self, encoder, params: FeatureParams, stats: dict, geometry: TileGeometry,
                 chunk_tiles: int = CHUNK_TILES):
        if params.normalize == "standardize" and not ("mean" in stats and "std" in stats):
            raise Tile2AudioError("the run has normalize='standardize' but its features.json holds no statistics")
        if chunk_tiles < 1:
            raise Tile2AudioError(f"chunk_tiles must be >= 1, got {chunk_tiles}")
        self.encoder = encoder
        self.dim = int(encoder.output_shape[-1])
        self.sample_rate = int(params.sample_rate)
        fps = float(params.frames_per_second)
        # Plain Python numbers and numpy arrays: the traced functions capture them as constants.
        self.chunk_tiles = int(chunk_tiles)
        self._dim, self._fps, self._chunk = self.dim, fps, self.chunk_tiles
        self._n_fft, self._hop, self._n_mels = int(params.n_fft), int(params.hop_length), int(params.n_mels)
        self._tile, self._tile_hop = int(geometry.tile_frames), int(geometry.hop_frames)
        self._min_samples = int(round(params.min_seconds * params.sample_rate))
        self._sr = self.sample_rate
        self._log, self._top_db, self._log_eps = params.log, params.top_db, float(params.log_eps)
        self._normalize = params.normalize
        self._window = stft_window(params)
        self._basis_t = np.ascontiguousarray(mel_basis(params).T)  # (n_freq, n_mels)
        if params.normalize == "standardize":
            self._mean = np.asarray(stats["mean"], np.float32)
            self._scale = np.maximum(np.asarray(stats["std"], np.float32), np.float32(STD_FLOOR))
        self.tile_seconds = self._tile / fps
        self.hop_seconds = self._tile_hop / fps

    def archive(self):
        """A ``keras.export.ExportArchive`` with the endpoints ``embed``, ``embed_clip`` and ``info``.

        ``embed`` (float32 of shape [n] or [batch, n]) is the SavedModel's first signature;
        ``info()`` returns the scalars ``sample_rate``, ``embedding_size``, ``tile_seconds``
        and ``hop_seconds``. (Keras's archive, not a bare ``tf.Module``: it records the
        encoder's variables so that the TFLite converter freezes them.)
        """
        import keras

        archive = keras.export.ExportArchive()
        archive.track(self.encoder)
        archive.add_endpoint("embed", self.embed, input_signature=[tf.TensorSpec(None, tf.float32, name="waveform")])
        archive.add_endpoint("embed_clip", self.embed_clip,
                             input_signature=[tf.TensorSpec([None], tf.float32, name="waveform")])
        archive.add_endpoint("info", self.info, input_signature=[])
        return archive

    def info(self):
        """The input's sample rate, D and the tile and hop lengths in seconds, as scalar tensors."""
        return {"sample_rate": tf.constant(self.sample_rate, tf.int32),
                "embedding_size": tf.constant(self.dim, tf.int32),
                "tile_seconds": tf.constant(self.tile_seconds, tf.float32),
                "hop_seconds": tf.constant(self.hop_seconds, tf.float32)}

    def _frames(self, x):
        """[B, n] float32 -> normalised log-mel [B, F, M]."""
        n = tf.shape(x)[1]
        if self._min_samples > 0:
            x = tf.gather(x, tf.range(tf.maximum(n, self._min_samples)) % n, axis=1)
        x = tf.pad(x, [[0, 0], [self._n_fft // 2, self._n_fft // 2]])
        spec = tf.signal.stft(x, frame_length=self._n_fft, frame_step=self._hop, fft_length=self._n_fft,
                              window_fn=lambda length, dtype: tf.constant(self._window, dtype=dtype))
        power = tf.math.square(tf.math.real(spec)) + tf.math.square(tf.math.imag(spec))
        mel = tf.tensordot(power, tf.constant(self._basis_t), axes=1)
        if self._log == "db":
            out = (10.0 / np.log(10.0)) * tf.math.log(tf.maximum(mel, AMIN))
            if self._top_db is not None:
                out = tf.maximum(out, tf.reduce_max(out, axis=[1, 2], keepdims=True) - float(self._top_db))
        else:
            out = tf.math.log(mel + float(self._log_eps))
        if self._normalize == "standardize":
            out = (out - tf.constant(self._mean)) / tf.constant(self._scale)
        elif self._normalize == "minmax":
            lo = tf.reduce_min(out, axis=[1, 2], keepdims=True)
            hi = tf.reduce_max(out, axis=[1, 2], keepdims=True)
            out = (out - lo) / tf.maximum(hi - lo, MIN_SCALE)
        return out

    def _encode(self, tiles):
        """[N, T, M] -> [N, D], ``chunk_tiles`` tiles per forward pass."""
        total = tf.shape(tiles)[0]

        # A while loop that concatenates: TensorList ops (tf.map_fn) would need TFLite's Flex
        # delegate, which the Python TFLite interpreter of TensorFlow 2.21 cannot run.
        def step(i, acc):
            block = tiles[i:i + self._chunk]
            out = tf.cast(self.encoder(tf.expand_dims(block, -1), training=False), tf.float32)
            return i + self._chunk, tf.concat([acc, out], axis=0)

        _, out = tf.while_loop(lambda i, acc: i < total, step,
                               (tf.constant(0), tf.zeros([0, self._dim], tf.float32)),
                               shape_invariants=(tf.TensorShape([]), tf.TensorShape([None, self._dim])),
                               parallel_iterations=1)
        return out

    def _batch(self, x):
        """[B, n] -> embeddings [B, K, D], timestamps [K, 2], clip embeddings [B, 2 D]."""
        frames = self._frames(x)
        n_frames = tf.shape(frames)[1]
        last = n_frames - self._tile
        regular = tf.range(0, tf.maximum(last, 0) + 1, self._tile_hop)
        extra = tf.cast((last > 0) & (regular[-1] != last), tf.int32)
        starts = tf.concat([regular, tf.reshape(last, [1])[:extra]], axis=0)
        # Modulo the clip's length: a clip shorter than a tile is looped (loop_pad).
        rows = (starts[:, None] + tf.range(self._tile)[None, :]) % n_frames
        tiles = tf.gather(frames, rows, axis=1)  # [B, K, T, M]
        batch, k = tf.shape(x)[0], tf.shape(starts)[0]
        emb = tf.reshape(self._encode(tf.reshape(tiles, [-1, self._tile, self._n_mels])), [batch, k, self._dim])
        ends = tf.minimum(starts + self._tile, n_frames)
        stamps = tf.cast(tf.stack([starts, ends], axis=1), tf.float32) / self._fps
        mean, var = tf.nn.moments(emb, axes=[1])
        clip = tf.concat([mean, tf.sqrt(tf.maximum(var, 0.0))], axis=-1)
        return emb, stamps, clip

    def _check(self, x):
        """Runtime checks of a [B, n] batch, with messages naming the problem."""
        n = tf.shape(x)[1]
        checks = [
            tf.debugging.assert_positive(tf.shape(x)[0], message="waveform: the batch is empty"),
            tf.debugging.assert_greater_equal(
                n, self._hop, message=f"waveform: clips need at least one STFT hop ({self._hop} samples at "
                                f"{self._sr} Hz); empty audio, or stereo given as "
                                "[n_samples, channels]? Downmix to mono [n_samples] first"),
            tf.debugging.assert_all_finite(x, message="waveform: NaN or inf samples"),
            tf.debugging.assert_less_equal(
                tf.reduce_max(tf.abs(x)), MAX_ABS,
                message=f"waveform: samples beyond +-{MAX_ABS:g}; expected float audio in [-1, 1] "
                        "(int16 PCM? divide it by 32768)"),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(x)

    def embed(self, waveform):
        """Tile embeddings, timestamps and clip embedding of float32 [n] or [batch, n] mono audio."""
        rank = tf.rank(waveform)
        tf.debugging.assert_equal((rank == 1) | (rank == 2), True,
                                  message="waveform: expected mono float32 [n_samples] or [batch, n_samples]")
        x = self._check(tf.reshape(waveform, [-1, tf.shape(waveform)[-1]]))
        emb, stamps, clip = self._batch(x)
        single = tf.equal(rank, 1)
        batch = tf.shape(x)[0]
        return {
            "embeddings": tf.cond(single, lambda: emb[0], lambda: emb),
            "timestamps": tf.cond(single, lambda: stamps,
                                  lambda: tf.tile(stamps[None], tf.stack([batch, 1, 1]))),
            "clip_embedding": tf.cond(single, lambda: clip[0], lambda: clip),
        }

    def embed_clip(self, waveform):
        """``embed`` of one clip [n_samples] (static rank: the function TFLite converts)."""
        emb, stamps, clip = self._batch(self._check(waveform[None]))
        return {"embeddings": emb[0], "timestamps": stamps, "clip_embedding": clip[0]}



# --------------------------------------------------------------------------- writing


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    format: str = "saved_model",
    weights: str = "trained",
    precision: str = "float32",
    chunk_tiles: int = CHUNK_TILES,
) -> Path:
    """Export a run's encoder with its front end as one self-contained model folder.

    Parameters
    ----------
    run_dir : path
        A run directory (read through :func:`tile2audio.runs.open_run`; the encoder is
        ``Run.encoder(weights)``: the layer ``tile2audio embed`` writes).
    out_dir : path
        The model folder (see the module docstring). A previous export there is replaced;
        any other non-empty folder is refused.
    format : ``saved_model`` or ``tflite``
        ``tflite`` converts the same graph with ``tf.lite.TFLiteConverter`` (built-in ops,
        with the TF-op fallback allowed) and writes ``model.tflite``, whose one signature
        is the rank-1 ``embed_clip``.
    weights : ``trained`` or ``init``
    precision : ``float32`` or ``run``
        ``float32`` (the reference) rebuilds a mixed-precision encoder in float32;
        ``run`` keeps the run's dtype policy.
    chunk_tiles : int
        Tiles per forward pass inside the graph.

    Returns
    -------
    Path
        ``out_dir``, absolute.

    Raises
    ------
    Tile2AudioError
        For an unknown option, a run that cannot be read, a non-empty folder that is not
        an export, or a write that fails (disk full, permission).
    """
    if format not in EXPORT_FORMATS:
        raise Tile2AudioError(f"export: format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if weights not in WEIGHTS:
        raise Tile2AudioError(f"export: weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    if precision not in EXPORT_PRECISIONS:
        raise Tile2AudioError(f"export: precision must be one of {', '.join(EXPORT_PRECISIONS)}, got {precision!r}")
    run = open_run(run_dir)
    encoder = run.encoder(weights)
    if precision == "float32":
        encoder = float32_encoder(encoder)
    graph = EmbeddingGraph(encoder, run.features, run.stats, run.geometry, chunk_tiles=chunk_tiles)
    out = Path(out_dir).absolute()
    _check_target(out)
    atomic.ensure_dir(out.parent, "model folder's parent")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        saved = tmp / "saved_model" if format == "tflite" else tmp
        graph.archive().write_out(str(saved), verbose=False)
        if format == "tflite":
            (tmp / TFLITE_FILE).write_bytes(_to_tflite(saved))
            shutil.rmtree(saved)
        info = _export_info(run, graph, format, weights, precision)
        atomic.write_json(tmp / INFO_FILE, info)
        atomic.write_text(tmp / CARD_FILE, model_card(run, info))
        _replace_dir(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Tile2AudioError(f"{out}: cannot write the model: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%s, %s weights, %s) to %s", run.path, format, weights, precision, out)
    return out


def _to_tflite(saved_model: Path) -> bytes:
    """Convert the SavedModel's ``embed_clip`` signature to a TFLite flatbuffer."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["embed_clip"])
    # The STFT lowers to the built-in RFFT2D; the fallback stays allowed for encoders with other ops.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()


def is_export_dir(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`export_run` (it holds ``export.json``)."""
    return (Path(path) / INFO_FILE).is_file()


def _check_target(out: Path) -> None:
    """Refuse a target that is a file, or a non-empty folder that is not an earlier export."""
    if out.exists() and not out.is_dir():
        raise Tile2AudioError(f"{out} is a file; the export needs a folder")
    if out.is_dir() and any(out.iterdir()) and not is_export_dir(out):
        raise Tile2AudioError(f"{out} is a non-empty folder that is not a tile2audio export; choose another -o")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` onto ``out`` (an earlier export is removed only after)."""
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _export_info(run: Run, graph: EmbeddingGraph, format: str, weights: str, precision: str) -> dict:
    """``export.json``: what was exported and the model's input and output contract."""
    policy = getattr(getattr(graph.encoder, "dtype_policy", None), "name", "float32")
    return {
        "version": EXPORT_VERSION, "format": format, "run_dir": str(run.path.resolve()), "weights": weights,
        "precision": precision, "dtype_policy": policy,
        "sample_rate": graph.sample_rate, "embedding_size": graph.dim, "clip_embedding_size": 2 * graph.dim,
        "clip_pooling": "meanstd", "tile_seconds": graph.tile_seconds, "hop_seconds": graph.hop_seconds,
        "min_seconds": run.features.min_seconds, "chunk_tiles": graph.chunk_tiles,
        "features": to_dict(run.features), "tiles": to_dict(run.config.tiles),
    }


def _probe_figures(run: Run) -> list[dict]:
    """The probe rows of the experiment the run belongs to (``<experiment>/probe/probe.json``), if any."""
    from .pipeline import ExperimentLayout

    layout = ExperimentLayout(run.path.parent)
    if layout.run.resolve() != run.path.resolve() or not layout.probe_json.is_file():
        return []
    try:
        rows = json.loads(layout.probe_json.read_text(encoding="utf-8")).get("rows", [])
    except (OSError, json.JSONDecodeError):
        return []
    keep = ("name", "kind", "probe", "pooling", "accuracy", "macro_f1", "macro_f1_std")
    return [{k: r.get(k) for k in keep} for r in rows if isinstance(r, dict)]


def model_card(run: Run, info: dict) -> str:
    """The Markdown model card written beside an exported model.

    Parameters
    ----------
    run : Run
        The exported run.
    info : dict
        ``export.json`` (see :func:`export_run`).

    Returns
    -------
    str
        Sections: model, training data, probe figures (when the run's experiment has a
        ``probe/probe.json``), input contract, outputs, and the run's config.
    """
    from .config import dump_yaml

    run_info = run.info
    d, sr = info["embedding_size"], info["sample_rate"]
    lines = [
        f"# tile2audio embedding model: {run.path.name}", "",
        "## Model",
        f"- Encoder: `{run.config.model.encoder}`, embedding size D = {d}, weights `{info['weights']}`, "
        f"computed in {info['dtype_policy']} (export precision `{info['precision']}`).",
        f"- Training: {run_info.get('mode', run.config.sampler.mode)} triplets, "
        f"{'label-free' if run_info.get('label_free', True) else 'label-aware (supervised)'}, "
        f"{run_info.get('step', '?')} steps, status `{run_info.get('status', '?')}`, seed {run_info.get('seed', '?')}.",
        f"- Exported from `{info['run_dir']}` as `{info['format']}`.", "",
        "## Training data",
        f"- Feature cache: `{run_info.get('cache', '?')}`.",
    ]
    lines += _data_lines(run_info.get("cache"))
    lines += ["", "## Probe figures"]
    rows = _probe_figures(run)
    if rows:
        lines += ["| embedding | kind | probe | pooling | accuracy | macro-F1 |", "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            f1 = f"{r['macro_f1']:.3f}" if isinstance(r.get("macro_f1"), (int, float)) else "-"
            if isinstance(r.get("macro_f1_std"), (int, float)):
                f1 += f" ± {r['macro_f1_std']:.3f}"
            acc = f"{r['accuracy']:.3f}" if isinstance(r.get("accuracy"), (int, float)) else "-"
            lines.append(f"| {r['name']} | {r['kind']} | {r['probe']} | {r['pooling']} | {acc} | {f1} |")
    else:
        lines.append("No report: the run is not part of an experiment folder with `probe/probe.json`.")
    lines += [
        "", "## Input contract",
        f"- Mono float32 samples in [-1, 1] at **{sr} Hz**, shape `[n_samples]` or `[batch, n_samples]` "
        "(clips of a batch have the same length).",
        f"- Resampling is the caller's job: the graph assumes {sr} Hz and cannot check it.",
        f"- Clips shorter than {info['min_seconds']:g} s are looped up to it; clips shorter than one tile "
        f"({info['tile_seconds']:.3f} s) are looped to one tile.",
        f"- Refused (InvalidArgumentError): fewer than {info['features']['hop_length']} samples per clip "
        "(catches stereo passed as `[n, 2]`), NaN or inf samples, |sample| above "
        f"{MAX_ABS:g}, rank other than 1 or 2. TensorFlow converts integer arrays to float before the "
        f"graph sees them: int16 PCM is caught by the |sample| check (divide it by 32768 first).",
        "", "## Outputs (`m.embed(wave)`)",
        f"- `embeddings`: float32 `[n_tiles, {d}]`, one per tile of {info['tile_seconds']:.3f} s, "
        f"every {info['hop_seconds']:.3f} s; a last tile is aligned to the end of the clip.",
        "- `timestamps`: float32 `[n_tiles, 2]`, start and end of each tile in seconds (the end "
        "never beyond the (looped) clip).",
        f"- `clip_embedding`: float32 `[{2 * d}]`, the mean then the standard deviation of the tile "
        "embeddings (the probes' `meanstd` pooling).",
        "- A batch input prepends the batch axis to all three. `m.info()` gives the sample rate, D, "
        "and the tile and hop lengths.",
        "", "## Front end",
        "```json", json.dumps(info["features"], indent=1), "```",
        "", "## Run config (`config.yaml`)",
        "```yaml", dump_yaml(run.config).rstrip(), "```", "",
    ]
    return "\n".join(lines)


def _data_lines(cache: str | None) -> list[str]:
    """Clip count, duration and labels of the run's cache, when it is still there."""
    import pandas as pd

    index = Path(cache) / "index.csv" if cache else None
    if index is None or not index.is_file():
        return ["- (the cache is no longer at that path: no clip statistics)"]
    try:
        df = pd.read_csv(index, dtype={"label": str, "root": str}, keep_default_na=False)
    except (OSError, ValueError):
        return ["- (the cache's index.csv cannot be read)"]
    labels = sorted({str(x) for x in df.get("label", []) if str(x)})
    roots = sorted({str(x) for x in df.get("root", []) if str(x)})
    hours = float(pd.to_numeric(df.get("duration_s", pd.Series(dtype=float)), errors="coerce").sum()) / 3600
    out = [f"- {len(df)} clips, {hours:.2f} h of audio, data root(s): {', '.join(f'`{r}`' for r in roots[:3]) or '-'}."]
    if labels:
        out.append(f"- {len(labels)} labels (not used by label-free training): {', '.join(labels[:20])}"
                   + (" ..." if len(labels) > 20 else "") + ".")
    return out


# --------------------------------------------------------------------------- reading


class ExportedModel:
    """An exported SavedModel loaded for Python code that has tile2audio (see :func:`load_exported`).

    Attributes
    ----------
    module : the object ``tf.saved_model.load`` returned
    info : dict
        ``export.json``.
    sample_rate : int
    """

    def __init__(self, module, info: dict):
        self.module, self.info = module, info
        self.sample_rate = int(info["sample_rate"])

    def embed(self, waveform) -> dict[str, np.ndarray]:
        """Embed mono audio, checked first.

        Parameters
        ----------
        waveform : np.ndarray
            Floating point, shape (n_samples,) or (batch, n_samples), at
            :attr:`sample_rate`, in [-1, 1].

        Returns
        -------
        dict
            ``embeddings`` (n_tiles, D), ``timestamps`` (n_tiles, 2), ``clip_embedding``
            (2 D,), float32 numpy arrays (batch axis first for batch input).

        Raises
        ------
        Tile2AudioError
            For an integer or non-numeric dtype, a rank other than 1 or 2, (n, 2) stereo
            (or any input whose last axis is shorter than one STFT hop), no samples, NaN
            or inf samples, or samples beyond +-:data:`MAX_ABS`. Clips shorter than one
            tile are not an error: they are looped, as documented.
        """
        x = check_waveform(waveform, int(self.info["features"]["hop_length"]))
        return {k: v.numpy() for k, v in self.module.embed(x).items()}


def check_waveform(waveform, min_samples: int = 1) -> np.ndarray:
    """The waveform as float32, or a Tile2AudioError naming what is wrong with it.

    Parameters
    ----------
    waveform : array-like
        Mono float audio, shape (n_samples,) or (batch, n_samples).
    min_samples : int
        Fewest samples per clip (the graph's STFT hop).

    Returns
    -------
    np.ndarray
        float32, the same shape.
    """
    x = np.asarray(waveform)
    if not np.issubdtype(x.dtype, np.floating):
        hint = " (int16 PCM: divide it by 32768.0)" if np.issubdtype(x.dtype, np.integer) else ""
        raise Tile2AudioError(f"waveform: expected float samples in [-1, 1], got dtype {x.dtype}{hint}")
    if x.ndim not in (1, 2):
        raise Tile2AudioError(f"waveform: expected mono [n_samples] or [batch, n_samples], got shape {x.shape}")
    if x.size == 0:
        raise Tile2AudioError(f"waveform: no samples (shape {x.shape})")
    if x.ndim == 2 and x.shape[1] < min_samples:
        raise Tile2AudioError(
            f"waveform: shape {x.shape} reads as {x.shape[0]} clips of {x.shape[1]} samples; stereo as "
            "[n_samples, channels]? Downmix to mono first (x.mean(axis=1))")
    if x.shape[-1] < min_samples:
        raise Tile2AudioError(f"waveform: {x.shape[-1]} samples, fewer than one STFT hop ({min_samples})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise Tile2AudioError(f"waveform: {int(np.count_nonzero(~np.isfinite(x)))} NaN or inf samples")
    if np.abs(x).max() > MAX_ABS:
        raise Tile2AudioError(f"waveform: samples reach {np.abs(x).max():g}; expected float audio in [-1, 1]")
    return x


def load_exported(path: str | os.PathLike) -> ExportedModel:
    """Load a SavedModel folder written by :func:`export_run`, with input checks.

    Parameters
    ----------
    path : path
        The model folder (``--format saved_model``).

    Returns
    -------
    ExportedModel
    """
    path = Path(path)
    if not is_export_dir(path) or not (path / "saved_model.pb").is_file():
        raise Tile2AudioError(f"{path} is not a SavedModel folder written by `tile2audio export`")
    info = json.loads((path / INFO_FILE).read_text(encoding="utf-8"))
    return ExportedModel(tf.saved_model.load(str(path)), info)
