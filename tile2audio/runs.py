"""A run directory: finding it, reading it, and loading its encoder.

Layout (written by :func:`tile2audio.train.train`; see docs/architecture.md)::

    run/
      config.yaml          the resolved TrainingConfig
      features.json        the cache's feature parameters and normalisation statistics
      run.json             status, step, epoch, seed, the automatic rule's choices and the
                           tile geometry (frames and seconds) the encoder was built for
      encoder_init.keras   the encoder before training (the random-weight baseline)
      encoder.keras        the trained encoder
      checkpoints/, log.csv, tensorboard/

Everything that reads a run (embedding, HEAR, the pipeline, experiments) goes through
:func:`open_run`, so the tile seconds are turned into frames once
(:meth:`tile2audio.tiles.TileGeometry.from_config`) and checked against the encoder.
This module imports neither :mod:`tile2audio.train` nor :mod:`tile2audio.embed`.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import atomic
from .config import FeatureParams, TrainingConfig, read_yaml, training_from_dict
from .errors import Tile2AudioError
from .tiles import TileGeometry

ENCODER_FILES = {"trained": "encoder.keras", "init": "encoder_init.keras"}


def is_run_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a run (a ``config.yaml`` and a ``run.json``)."""
    return (Path(path) / "config.yaml").is_file() and (Path(path) / "run.json").is_file()


def latest_run(parent: str | os.PathLike) -> Path | None:
    """The most recently modified run directory directly under ``parent``, if any."""
    runs = [p for p in Path(parent).iterdir() if p.is_dir() and is_run_dir(p)] if Path(parent).is_dir() else []
    return max(runs, key=lambda p: (p / "run.json").stat().st_mtime) if runs else None


def read_run(run_dir: str | os.PathLike) -> dict:
    """``run.json`` of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise Tile2AudioError(f"{run_dir} is not a tile2audio run directory (no config.yaml / run.json)")
    return json.loads((run_dir / "run.json").read_text(encoding="utf-8"))


def update_run_json(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Merge fields into ``run.json`` atomically."""
    path = Path(run_dir) / "run.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    data.update(fields)
    atomic.write_json(path, data)


def load_run_config(run_dir: str | os.PathLike) -> TrainingConfig:
    """The resolved training config saved in a run directory."""
    return training_from_dict(read_yaml(Path(run_dir) / "config.yaml"))


def geometry_record(geometry: TileGeometry) -> dict:
    """The tile geometry as ``run.json`` stores it: frame counts, seconds and frame rate."""
    fps = geometry.frames_per_second
    return {
        "frames_per_second": fps,
        "tile_frames": geometry.tile_frames, "hop_frames": geometry.hop_frames,
        "neighbourhood_frames": geometry.neighbourhood_frames, "min_gap_frames": geometry.min_gap_frames,
        "tile_seconds": geometry.tile_frames / fps, "hop_seconds": geometry.hop_frames / fps,
    }


def save_keras_atomic(model: Any, path: Path) -> None:
    """``model.save`` to a temporary ``.keras`` file, then rename it onto ``path``."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.keras")
    try:
        model.save(str(tmp))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise Tile2AudioError(f"{path}: cannot write the model: {exc.strerror or exc}") from exc


def load_encoder(run_dir: str | os.PathLike, weights: str = "trained"):
    """Load a run's encoder with Keras safe mode.

    Parameters
    ----------
    run_dir : path
    weights : ``trained`` (``encoder.keras``) or ``init`` (``encoder_init.keras``, the
        same architecture with its random initial weights)

    Returns
    -------
    keras.Model
        Maps (B, T, M, 1) tiles to (B, D) embeddings.
    """
    import keras

    from . import models  # noqa: F401  (registers custom layers before loading)

    name = ENCODER_FILES.get(weights)
    if name is None:
        raise Tile2AudioError(f"weights must be 'trained' or 'init', got {weights!r}")
    path = Path(run_dir) / name
    if not path.is_file():
        raise Tile2AudioError(f"{path} not found: has the run finished training?")
    # Keras reports a cut-off .keras zip as "File not found"; name the real cause.
    if not zipfile.is_zipfile(path):
        raise Tile2AudioError(f"{path}: truncated or corrupt .keras file (not a complete zip archive); "
                              "copy it again or retrain the run")
    return keras.saving.load_model(str(path), safe_mode=True, compile=False)


@dataclass
class Run:
    """An opened run directory (see :func:`open_run`).

    Attributes
    ----------
    path : Path
    config : TrainingConfig
        The resolved training config (``config.yaml``).
    feature_file : dict
        ``features.json`` as saved (``params``, ``stats``, ...).
    features : FeatureParams
        The feature parameters the encoder was trained on.
    stats : dict
        ``mean`` and ``std`` (n_mels,) float32 arrays for
        :func:`tile2audio.features.normalize_frames` (empty when the run has none).
    geometry : TileGeometry
        Tile and hop lengths in frames.
    """

    path: Path
    config: TrainingConfig
    feature_file: dict
    features: FeatureParams
    stats: dict
    geometry: TileGeometry

    @property
    def info(self) -> dict:
        """``run.json`` as it is now (status, step, ...); re-read on every access."""
        return read_run(self.path)

    @property
    def embed_layer(self) -> str:
        """The layer embeddings are read at (``model.embed_layer`` resolved; ``output`` for older runs)."""
        return self.config.model.embedding_layer

    def encoder(self, weights: str = "trained", layer: str | None = None):
        """The run's encoder (``trained`` or ``init``), checked against the run's tile geometry.

        Parameters
        ----------
        weights : {"trained", "init"}
        layer : {"output", "hidden", "pooled"}, optional
            Where to read embeddings; defaults to :attr:`embed_layer`, so ``embed``, the
            probes, HEAR and export, and the random-weight twin, all read the same layer.

        Returns
        -------
        keras.Model
            Maps (B, T, M, 1) to (B, D), with T = ``geometry.tile_frames``.
        """
        from .models import embedding_model

        model = load_encoder(self.path, weights)
        shape = tuple(model.input_shape)
        if len(shape) == 4 and shape[1] is not None and shape[1] != self.geometry.tile_frames:
            raise Tile2AudioError(
                f"{self.path / ENCODER_FILES[weights]}: the encoder takes tiles of {shape[1]} frames but "
                f"the run's tile geometry says {self.geometry.tile_frames}; config.yaml or run.json was "
                "edited after training"
            )
        return embedding_model(model, layer or self.embed_layer)


def _features_json(run_dir: Path) -> dict:
    """The run's ``features.json``, with a clear error when it is missing or unreadable."""
    path = run_dir / "features.json"
    if not path.is_file():
        raise Tile2AudioError(f"{run_dir} is not a tile2audio run directory (no features.json)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise Tile2AudioError(f"{path}: not valid JSON ({exc})") from exc


def open_run(run_dir: str | os.PathLike, config: TrainingConfig | None = None) -> Run:
    """Open a run directory: its config, feature parameters, statistics and tile geometry.

    Parameters
    ----------
    run_dir : path
        A run directory from :func:`tile2audio.train.train`.
    config : TrainingConfig, optional
        The run's config (read from ``config.yaml`` when not given).

    Returns
    -------
    Run
        When ``run.json`` records a tile geometry (runs trained since it was added) it
        must agree with the one computed from the config and the feature frame rate.
    """
    run_dir = Path(run_dir)
    config = config if config is not None else load_run_config(run_dir)
    feat = _features_json(run_dir)
    params = FeatureParams(**feat["params"])
    stats = {k: np.asarray(v, dtype=np.float32) for k, v in (feat.get("stats") or {}).items() if k in ("mean", "std")}
    geometry = TileGeometry.from_config(config.tiles, params.frames_per_second)
    recorded = (json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("geometry")
                if (run_dir / "run.json").is_file() else None)
    if recorded is not None and recorded.get("tile_frames") != geometry.tile_frames:
        raise Tile2AudioError(
            f"{run_dir}/run.json: tiles of {recorded.get('tile_frames')} frames were trained, but config.yaml "
            f"and features.json give {geometry.tile_frames}; config.yaml or features.json was edited after training"
        )
    return Run(path=run_dir, config=config, feature_file=feat, features=params, stats=stats, geometry=geometry)
