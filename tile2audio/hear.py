"""The HEAR 2021 embedding API (https://hearbenchmark.com/hear-api.html) for a trained run.

::

    import tile2audio.hear as hear
    model = hear.load_model("runs/emotify30/run")          # or .../run/encoder.keras
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # audio: (n_sounds, n_samples)
    scene = hear.get_scene_embeddings(audio, model)

The official validator: ``pip install --no-deps --ignore-requires-python hearvalidator==2021.0.6``
then ``hear-validator tile2audio.hear -m RUN_DIR``.

Decisions
    *Input.* Each sound goes through the run's own front end, exactly as
    :func:`tile2audio.embed.embed` does with an audio file: sounds shorter than the run's
    ``features.min_seconds`` are looped up to it (``short_policy`` pad; HEAR needs an
    embedding for every sound, so ``skip`` is treated as pad here), then log-mel
    (:func:`tile2audio.features.log_mel`), the run's normalisation statistics, and tiles
    cut by :func:`tile2audio.embed.embed_frames` (a sound shorter than one tile is looped
    to one tile).

    *Audio values.* HEAR gives float audio in [-1, 1]: any float dtype is taken (as
    float32); integer PCM, strings or objects are refused with one line (integers are
    not rescaled: dividing by 32768 is the caller's choice), and a batch that peaks
    above 1 is embedded with a warning. An empty batch ``(0, n_samples)`` gives empty
    outputs, ``(0, T, D)`` and ``(0, T)`` (T the timestamps a sound of n_samples
    would get) or ``(0, D')``.

    *Timestamps.* The run's tile hop (0.75 s by default) is coarser than HEAR's 50 ms
    advice, so timestamp embeddings use a finer hop: ``hop_seconds`` (default 25 ms,
    rounded to whole spectrogram frames, at least one frame). Timestamp k is
    ``k * hop`` (plus half a frame for tiles of an even number of frames), in
    milliseconds, for every such time within the sound; its embedding is that of the
    tile centred on it. Tiles near the ends reach past the sound: the frames are
    continued circularly (the package's looping rule for short clips, applied on both
    sides), so a sound shorter than one tile is looped, as everywhere else.

    *Scene embeddings* are the probes' clip pooling (``pooling``, ``meanstd`` by
    default: the mean then the standard deviation of the tile embeddings, 2 D values)
    over the tiles at the run's own tile hop, so they equal the ``meanstd`` rows that
    ``tile2audio embed`` writes for the same audio.

    *Sample rate.* ``model.sample_rate`` is the run's ``features.sample_rate``. HEAR
    tasks are offered at 16000, 22050, 32000, 44100 or 48000 Hz; a run at another rate
    still loads, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from .errors import Tile2AudioError

log = logging.getLogger(__name__)

HEAR_SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)
DEFAULT_HOP_SECONDS = 0.025


class HearModel(tf.Module):
    """A run's encoder wrapped as the ``tf.Module`` the HEAR API expects.

    Attributes
    ----------
    sample_rate : int
        Rate the audio must be given at (the run's ``features.sample_rate``).
    timestamp_embedding_size : int
        D, the encoder's output size.
    scene_embedding_size : int
        D' (2 D for ``meanstd`` pooling, D for ``mean`` / ``max``).
    encoder : keras.Model
        The run's encoder, (B, T, M, 1) -> (B, D).
    """

    def __init__(self, encoder, params, stats: dict, geometry, pooling: str, hop_frames: int, run_dir: Path):
        super().__init__(name="tile2audio")
        self.encoder = encoder
        self.params, self.stats, self.geometry = params, stats, geometry
        self.pooling = pooling
        self.fine_geometry = dataclasses.replace(geometry, hop_frames=hop_frames)
        self.run_dir = str(run_dir)
        self.sample_rate = int(params.sample_rate)
        self.timestamp_embedding_size = int(encoder.output_shape[-1])
        self.scene_embedding_size = self.timestamp_embedding_size * (2 if pooling == "meanstd" else 1)


def load_model(model_file_path: str = "", *, pooling: str = "meanstd",
               hop_seconds: float = DEFAULT_HOP_SECONDS, weights: str = "trained") -> HearModel:
    """Load a run for the HEAR API.

    Parameters
    ----------
    model_file_path : str
        A run directory, or its ``encoder.keras`` (``encoder_init.keras`` gives the
        random-weight twin). HEAR's validator passes ``-m`` here; empty is an error
        (there are no built-in weights).
    pooling : ``mean``, ``meanstd`` or ``max``
        Clip pooling of the scene embeddings.
    hop_seconds : float
        Hop of the timestamp embeddings (see the module docstring).
    weights : ``trained`` or ``init``
        Used when ``model_file_path`` is a directory.

    Returns
    -------
    HearModel
    """
    from .embed import POOLINGS
    from .runs import open_run

    if not model_file_path:
        raise Tile2AudioError("tile2audio.hear.load_model needs a run directory or its encoder.keras")
    if pooling not in POOLINGS:
        raise Tile2AudioError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
    if not hop_seconds > 0:
        raise Tile2AudioError(f"hop_seconds must be > 0, got {hop_seconds!r}")
    path = Path(model_file_path)
    run_dir = path
    if path.is_file():
        by_name = {"encoder.keras": "trained", "encoder_init.keras": "init"}
        if path.name not in by_name:
            raise Tile2AudioError(f"{path}: expected a run directory, encoder.keras or encoder_init.keras")
        run_dir, weights = path.parent, by_name[path.name]
    if not (run_dir / "features.json").is_file():
        raise Tile2AudioError(f"{run_dir} is not a tile2audio run directory (no features.json)")
    run = open_run(run_dir)
    params, stats, geometry = run.features, run.stats, run.geometry
    if params.sample_rate not in HEAR_SAMPLE_RATES:
        log.warning("run %s works at %d Hz; HEAR tasks come at %s Hz", run_dir, params.sample_rate,
                    ", ".join(map(str, HEAR_SAMPLE_RATES)))
    hop_frames = params.seconds_to_frames(hop_seconds)
    if hop_frames / params.frames_per_second > 0.05:
        log.warning("timestamp hop %.0f ms is above HEAR's 50 ms advice (one frame is %.0f ms)",
                    1000 * hop_frames / params.frames_per_second, 1000 / params.frames_per_second)
    return HearModel(run.encoder(weights), params, stats, geometry, pooling, hop_frames, run_dir)


def _check_audio(audio, model: HearModel) -> np.ndarray:
    """The batch as a finite float32 (n_sounds, n_samples) array; refuses non-float dtypes, warns on peaks above 1."""
    if not isinstance(model, HearModel):
        raise Tile2AudioError(f"expected a model from tile2audio.hear.load_model, got {type(model).__name__}")
    try:
        x = np.asarray(audio.numpy() if hasattr(audio, "numpy") else audio)
    except ValueError as exc:  # a ragged list of sounds
        raise Tile2AudioError(f"audio must be one (n_sounds, n_samples) array: {exc}") from exc
    if x.dtype.kind != "f":
        hint = f"; for PCM divide by {2 ** (8 * x.dtype.itemsize - 1)}" if x.dtype.kind in "iu" else ""
        raise Tile2AudioError(f"audio must be float samples in [-1, 1] (the HEAR API), got dtype {x.dtype}{hint}")
    x = x.astype(np.float32, copy=False)
    if x.ndim != 2 or (x.shape[1] == 0 and x.shape[0] > 0):
        raise Tile2AudioError(f"audio must have shape (n_sounds, n_samples > 0), got {x.shape}")
    if not np.isfinite(x).all():
        raise Tile2AudioError("audio has NaN or inf samples")
    peak = float(np.abs(x).max()) if x.size else 0.0
    if peak > 1.0:
        log.warning("audio peaks at %.4g: the HEAR API gives float audio in [-1, 1], so the embeddings "
                    "are those of a louder sound than meant (scale it to [-1, 1])", peak)
    return x


def _frames(y: np.ndarray, model: HearModel) -> np.ndarray:
    """One sound's normalised log-mel frames (n_frames, n_mels), the run's front end."""
    from .audio import loop_pad
    from .features import log_mel, normalize_frames

    p = model.params
    y = loop_pad(y, int(round(p.min_seconds * p.sample_rate)))
    return normalize_frames(log_mel(y, p), p, model.stats)


def get_timestamp_embeddings(audio, model: HearModel) -> tuple[tf.Tensor, tf.Tensor]:
    """Embeddings of tiles centred on an even grid of times, with those times.

    Parameters
    ----------
    audio : tf.Tensor or np.ndarray, float32, shape (n_sounds, n_samples)
        At ``model.sample_rate``.
    model : HearModel

    Returns
    -------
    embeddings : tf.Tensor, float32, shape (n_sounds, n_timestamps, D)
    timestamps : tf.Tensor, float32, shape (n_sounds, n_timestamps)
        Milliseconds from 0 to at most the sound's length, evenly spaced by the hop;
        each is the centre of its tile.
    """
    from .embed import embed_frames

    x = _check_audio(audio, model)
    duration_ms = 1000.0 * x.shape[1] / model.sample_rate
    T = model.fine_geometry.tile_frames
    # Tiles reach past both ends so their centres cover the whole sound; the padding is
    # the package's looping rule, continued circularly on both sides.
    pad = ((T - 1) // 2, T - 1 - (T - 1) // 2)
    embs, stamps = [], []
    for y in x:
        padded = np.pad(_frames(y, model), (pad, (0, 0)), mode="wrap")
        e, _ = embed_frames(model.encoder, padded, model.fine_geometry)
        keep, centre = _grid(len(padded), duration_ms, model)
        embs.append(e[keep])
        stamps.append(centre[keep])
    if not embs:  # an empty batch: as many timestamps as a sound of that length would get
        n = int(_grid(len(_frames(np.zeros(x.shape[1], np.float32), model)) + T - 1, duration_ms, model)[0].sum()
                ) if x.shape[1] else 0
        return tf.zeros((0, n, model.timestamp_embedding_size), tf.float32), tf.zeros((0, n), tf.float32)
    return tf.constant(np.stack(embs), dtype=tf.float32), tf.constant(np.stack(stamps), dtype=tf.float32)


def _grid(n_padded: int, duration_ms: float, model: HearModel) -> tuple[np.ndarray, np.ndarray]:
    """Which tiles of a padded sound are on the timestamp grid (bool (n_tiles,)) and each tile's centre in ms."""
    from .tiles import tile_starts

    g, fps = model.fine_geometry, model.params.frames_per_second
    start = tile_starts(n_padded, g.tile_frames, g.hop_frames)
    # Tile k starts at padded frame s = k * hop and is centred on frame s + offset of the
    # sound (frame i of a centred STFT is at i / fps seconds).
    offset = (g.tile_frames - 1) / 2 - (g.tile_frames - 1) // 2
    centre = 1000.0 * (start + offset) / fps
    keep = (start % g.hop_frames == 0) & (centre <= duration_ms)  # the grid only, within the sound
    keep[0] = True  # a sound shorter than one frame hop still has its first tile
    return keep, np.minimum(centre, duration_ms)


def get_scene_embeddings(audio, model: HearModel) -> tf.Tensor:
    """One embedding per sound: the probes' clip pooling of its tiles.

    Parameters
    ----------
    audio : tf.Tensor or np.ndarray, float32, shape (n_sounds, n_samples)
    model : HearModel

    Returns
    -------
    tf.Tensor, float32, shape (n_sounds, model.scene_embedding_size)
    """
    from .embed import embed_frames, pool_tiles

    x = _check_audio(audio, model)
    rows = [pool_tiles(embed_frames(model.encoder, _frames(y, model), model.geometry)[0])[model.pooling] for y in x]
    if not rows:  # an empty batch
        return tf.zeros((0, model.scene_embedding_size), tf.float32)
    return tf.constant(np.stack(rows), dtype=tf.float32)
