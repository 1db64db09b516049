"""A run directory: finding it, reading it, and loading its encoder.

Layout (written by :func:`tile2audio.train.train`; see docs/architecture.md)::

    run/
      config.yaml          the resolved TrainingConfig
      features.json        the cache's feature parameters and normalisation statistics
      run.json             status, step, epoch, seed, the automatic rule's choices, the
                           tile geometry (frames and seconds) the encoder was built for and
                           ``features_sha256`` (:func:`feature_fingerprint` of features.json)
      .lock                held (``flock``) by the process writing the run (:func:`lock_run`)
      encoder_init.keras   the encoder before training (the random-weight baseline)
      encoder.keras        the trained encoder
      checkpoints/, log.csv, tensorboard/

Everything that reads a run (embedding, HEAR, the pipeline, experiments) goes through
:func:`open_run`, so the tile seconds are turned into frames once
(:meth:`tile2audio.tiles.TileGeometry.from_config`) and checked against the encoder.
This module imports neither :mod:`tile2audio.train` nor :mod:`tile2audio.embed`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import atomic
from .config import FeatureParams, TrainingConfig, read_yaml, section_from_dict, to_dict, training_from_dict
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


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object; one clear line when it is truncated, edited or a list.

    Every reader of a run's JSON files (``run.json``, ``features.json``) goes through
    here, so embed, report, ``train --resume`` and ``hear.load_model`` give the same line.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise Tile2AudioError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Tile2AudioError(f"{path}: not valid JSON (truncated or edited?): {exc}") from exc
    if not isinstance(data, dict):
        raise Tile2AudioError(f"{path}: expected a JSON object, got a JSON {type(data).__name__}; "
                              "the file was edited or overwritten")
    return data


def read_run(run_dir: str | os.PathLike) -> dict:
    """``run.json`` of a run directory, with a clear error when it is not one."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise Tile2AudioError(f"{run_dir} is not a tile2audio run directory (no config.yaml / run.json)")
    return read_json_object(run_dir / "run.json")


def update_run_json(run_dir: str | os.PathLike, **fields: Any) -> None:
    """Merge fields into ``run.json`` atomically."""
    path = Path(run_dir) / "run.json"
    data = read_json_object(path) if path.is_file() else {}
    data.update(fields)
    atomic.write_json(path, data)


_LOCK_NAME = ".lock"


@contextmanager
def lock_run(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir/.lock`` while a process writes the run.

    The lock is an ``flock`` on the file, so the kernel drops it when its holder dies:
    a lock file left by a killed process never blocks. The holder writes its pid, host
    and command into the file, and a second writer (another ``train`` or ``train
    --resume`` of the same run) fails at once with one line naming it.

    Raises
    ------
    Tile2AudioError
        When another process holds the lock, or the lock file cannot be created.
    """
    path = Path(run_dir) / _LOCK_NAME
    try:
        fh = open(path, "a+", encoding="utf-8")
    except OSError as exc:
        raise Tile2AudioError(f"{path}: cannot create the run lock file: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise Tile2AudioError(f"{path}: cannot lock the run: {exc.strerror or exc}") from exc
            fh.seek(0)
            holder = " ".join(fh.read(500).split()) or "a process that has not written its name yet"
            raise Tile2AudioError(
                f"{run_dir}: another process is writing this run ({holder}); wait for it to finish, "
                "or stop it, or train into another folder"
            ) from None
        command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}\n")
        fh.flush()
        yield  # the lock goes with the file descriptor, also when the process is killed
    finally:
        fh.close()


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
    return read_json_object(path)


def feature_params(feature_file: Any, path: str | os.PathLike) -> tuple[FeatureParams, dict]:
    """Feature parameters and normalisation statistics of a ``features.json`` / ``params.json``.

    Parameters
    ----------
    feature_file : dict
        The parsed file: ``params`` (the :class:`~tile2audio.config.FeatureParams`
        fields) and optional ``stats`` (``mean``, ``std``: lists of n_mels numbers).
    path : path
        The file, for messages.

    Returns
    -------
    params : FeatureParams
    stats : dict
        ``mean`` and ``std`` as float32 (n_mels,) arrays (missing keys are left out).

    Raises
    ------
    Tile2AudioError
        One line naming the file and the key: no ``params`` mapping, an unknown key, a
        value of the wrong type, or statistics that are not n_mels finite numbers.
    """
    if not isinstance(feature_file, dict) or not isinstance(feature_file.get("params"), dict):
        raise Tile2AudioError(f"{path}: no 'params' mapping of feature parameters; the file was edited "
                              "or is not a tile2audio features file")
    try:
        params = section_from_dict(FeatureParams, feature_file["params"], "params")
    except Tile2AudioError as exc:
        raise Tile2AudioError(f"{path}: {exc}") from exc
    raw_stats = feature_file.get("stats") or {}
    if not isinstance(raw_stats, dict):
        raise Tile2AudioError(f"{path}: 'stats' must be a mapping, got a {type(raw_stats).__name__}")
    stats = {}
    for key in ("mean", "std"):
        if key not in raw_stats:
            continue
        try:
            value = np.asarray(raw_stats[key], dtype=np.float64)
        except (TypeError, ValueError):
            value = None
        if value is None or value.shape != (params.n_mels,) or not np.all(np.isfinite(value)):
            raise Tile2AudioError(f"{path}: stats.{key} must be a list of {params.n_mels} finite numbers "
                                  "(one per mel band)")
        stats[key] = value.astype(np.float32)
    return params, stats


def feature_fingerprint(feature_file: Any, path: str | os.PathLike) -> str:
    """SHA-256 of what decides the encoder's input: feature parameters and normalisation stats.

    The same for a cache's ``params.json`` and the ``features.json`` a run copied from
    it; key order, spacing and the frame count of the statistics do not count. ``train``
    records it in ``run.json`` (``features_sha256``); :func:`open_run` and ``train
    --resume`` compare against it.
    """
    params, _ = feature_params(feature_file, path)
    stats = feature_file.get("stats") or {}
    canon = {"params": to_dict(params),
             **{k: [float(v) for v in stats[k]] for k in ("mean", "std") if k in stats}}
    return hashlib.sha256(json.dumps(canon, sort_keys=True).encode("utf-8")).hexdigest()


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
    params, stats = feature_params(feat, run_dir / "features.json")
    geometry = TileGeometry.from_config(config.tiles, params.frames_per_second)
    info = read_json_object(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    trained_on = info.get("features_sha256")
    if trained_on is not None and trained_on != feature_fingerprint(feat, run_dir / "features.json"):
        raise Tile2AudioError(
            f"{run_dir / 'features.json'}: the feature parameters or normalisation statistics differ from "
            "those the run was trained on (run.json features_sha256); features.json was edited after "
            "training: restore it (train copies it from the cache's params.json)"
        )
    recorded = info.get("geometry")
    if recorded is not None and not isinstance(recorded, dict):
        raise Tile2AudioError(f"{run_dir}/run.json: 'geometry' must be a mapping; run.json was edited")
    if recorded is not None and recorded.get("tile_frames") != geometry.tile_frames:
        raise Tile2AudioError(
            f"{run_dir}/run.json: tiles of {recorded.get('tile_frames')} frames were trained, but config.yaml "
            f"and features.json give {geometry.tile_frames}; config.yaml or features.json was edited after training"
        )
    return Run(path=run_dir, config=config, feature_file=feat, features=params, stats=stats, geometry=geometry)
