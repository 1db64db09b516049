"""Label-free training: Keras ``fit`` with a triplet train step, checkpoints and resume.

A run directory (see docs/architecture.md) holds the resolved ``config.yaml``, the
cache's feature parameters (``features.json``), ``run.json`` (status and step),
``encoder_init.keras`` (the encoder before training: the random-weight baseline with the
same seed), ``encoder.keras`` (the trained encoder), ``checkpoints/`` and ``log.csv``.

Resume rule: a checkpoint (weights, optimizer state and step) is written every
``train.checkpoint_every_steps`` steps and at the end of every epoch. ``resume=True``
restores the newest one and continues the triplet stream at that step (the sampler is a
pure function of seed and step), so a killed and resumed run ends at the same step count
as an uninterrupted one and sees the same batches.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from . import atomic, losses
from .config import TrainingConfig, dump_yaml, to_dict
from .errors import Tile2AudioError
from .models import build_decoder, build_encoder, embedding_model, export_encoder
from .runs import (feature_fingerprint, geometry_record, is_run_dir, latest_run, load_run_config, lock_run,
                   read_json_object, read_run, save_keras_atomic, update_run_json)
from .tiles import TileGeometry

log = logging.getLogger(__name__)

LOG_KEYS = ("loss", "triplet", "mse", "l2", "active_fraction", "d_an", "d_ao", "spread")


# --------------------------------------------------------------------------- run directory


def run_name(config: TrainingConfig, when: float | None = None, stamp: str | None = None) -> str:
    """A run directory name from the key hyperparameters, the seed and the time.

    Workers of a multi-worker run pass a shared ``stamp`` instead of the time, so they
    agree on the name. Two runs started in the same second get the same name here;
    :func:`train` then claims the directory exclusively and gives the second one a
    ``-2`` (``-3``, ...) suffix.
    """
    m, t, s, lo = config.model, config.tiles, config.sampler, config.loss
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S", time.localtime(when))
    return (
        f"{m.encoder}-d{m.embedding_dim}-t{t.tile_seconds:g}s-{s.mode}-{lo.negatives}"
        f"-m{lo.margin:g}-s{config.train.seed}-{stamp}"
    )


def _claim_run_dir(out: Path, name: str) -> Path:
    """Create ``out/name`` (or ``name-2``, ``name-3``, ...) exclusively: one new run per directory."""
    atomic.ensure_dir(out, "runs folder")
    for i in range(1, 1000):
        path = out / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise Tile2AudioError(f"{path}: cannot create the run folder: {exc.strerror or exc}") from exc
    raise Tile2AudioError(f"{out}: 999 runs named {name}* already exist; choose another -o")


def _resolve_run_dir(out: Path, config: TrainingConfig, resume: bool, exact: bool,
                     stamp: str | None = None) -> tuple[Path, bool]:
    """Pick the run directory; returns (run_dir, resuming). A new named run's folder is created here."""
    if is_run_dir(out):
        if not resume:
            raise Tile2AudioError(f"{out} already holds a run; pass --resume to continue it or choose another -o")
        return out, True
    if resume and not exact:
        found = latest_run(out)
        if found is None:
            raise Tile2AudioError(f"--resume: no run directory found in {out}")
        return found, True
    if exact:
        return out, False
    if stamp is not None:  # multi-worker: every worker uses the same shared folder
        return out / run_name(config, stamp=stamp), False
    return _claim_run_dir(out, run_name(config)), False


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(run_dir: Path, model: Any, optimizer: Any, step: int, keep: int = 2) -> Path:
    """Write weights, optimizer variables and the step atomically (a temp dir renamed)."""
    root = run_dir / "checkpoints"
    final = root / f"step_{step:09d}"
    if (final / "state.json").is_file():
        return final
    tmp = root / f".tmp_step_{step:09d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        model.save_weights(str(tmp / "model.weights.h5"))
        opt_vars = {f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(optimizer.variables)}
        atomic.save_npz(tmp / "optimizer.npz", **opt_vars)
        atomic.write_json(tmp / "state.json", {"step": int(step), "n_optimizer_vars": len(opt_vars)})
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except OSError as exc:  # full disk, lost mount: the older checkpoints stay usable
        shutil.rmtree(tmp, ignore_errors=True)
        raise Tile2AudioError(f"{final}: cannot write the checkpoint at step {step}: {exc.strerror or exc}; "
                              "the earlier checkpoints are kept, free space and rerun with --resume") from exc
    for old in _checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete ``checkpoints/.tmp_step_*`` folders a killed or failed checkpoint write left behind."""
    root = run_dir / "checkpoints"
    stale = sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale:
        log.info("removed %d unfinished checkpoint folder(s) in %s", len(stale), root)
    return stale


def _trim_log(run_dir: Path, step: int, steps_per_epoch: int) -> None:
    """Drop log.csv rows of epochs the checkpoint at ``step`` does not cover (they are redone)."""
    path = run_dir / "log.csv"
    if not path.is_file():
        return
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    done = step // steps_per_epoch
    keep = [r for r in rows if int(float(r.get("epoch") or 0)) < done]
    if len(keep) == len(rows):
        return
    if not keep:
        path.unlink()
        return
    with atomic.atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(keep)


def restore_checkpoint(ckpt: Path, model: Any, optimizer: Any) -> int:
    """Load a checkpoint written by :func:`save_checkpoint`; returns its step."""
    model.load_weights(str(ckpt / "model.weights.h5"))
    optimizer.build(model.trainable_variables)
    with np.load(ckpt / "optimizer.npz", allow_pickle=False) as z:
        values = [z[k] for k in sorted(z.files)]
    if len(values) != len(optimizer.variables):
        raise Tile2AudioError(
            f"checkpoint {ckpt} has {len(values)} optimizer variables, the model needs {len(optimizer.variables)}"
        )
    for var, value in zip(optimizer.variables, values):
        var.assign(value)
    return int(json.loads((ckpt / "state.json").read_text())["step"])


# --------------------------------------------------------------------------- strategy


def make_strategy(name: str = "auto"):
    """A ``tf.distribute`` strategy: ``one``, ``mirrored``, ``multiworker`` or ``auto``.

    ``auto`` picks MultiWorkerMirroredStrategy when ``TF_CONFIG`` names more than one
    worker, MirroredStrategy when more than one GPU is visible, else the default.
    """
    if name == "auto":
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        n_workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        if n_workers > 1:
            name = "multiworker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "one"
    if name == "one":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise Tile2AudioError("--strategy multiworker needs the TF_CONFIG environment variable (see README)")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise Tile2AudioError(f"unknown strategy {name!r}; use auto, one, mirrored or multiworker")


def _worker_info(strategy) -> tuple[int, int, bool]:
    """(worker index, number of workers, is chief) for the strategy in use."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None):
        return 0, 1, True
    spec = resolver.cluster_spec().as_dict()
    n = sum(len(v) for k, v in spec.items() if k in ("worker", "chief"))
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    index = task_id + (1 if "chief" in spec and task_type == "worker" else 0)
    chief = (task_type == "chief") or (task_type == "worker" and task_id == 0 and "chief" not in spec)
    return index, max(n, 1), chief


# --------------------------------------------------------------------------- model


def resolve_precision(name: str = "auto") -> str:
    """The Keras dtype policy that ``train.precision`` names on this machine.

    ``auto``: ``mixed_float16`` when TensorFlow sees a GPU (untested: no GPU on the
    development machines), ``mixed_bfloat16`` on a CPU whose flags include
    ``avx512_bf16`` or ``amx_bf16`` (oneDNN then runs convolutions on the bf16 units),
    else ``float32``. Any other value is returned as it is.
    """
    if name != "auto":
        return name
    if tf.config.list_physical_devices("GPU"):
        return "mixed_float16"
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no cheap way to read the CPU's flags
        return "float32"
    return "mixed_bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


# ------------------------------------------------------------------ Keras / TensorFlow compatibility
# The only two places that touch private Keras or TensorFlow API. Checked against keras
# 3.3 to 3.15.1 with TensorFlow 2.16 to 2.20; setup.cfg bounds keras below 3.16 and
# tests/test_train.py::test_keras_compatibility_block fails when either hook disappears.
KERAS_CHECKED = ("3.3", "3.15.1")


def _in_multi_worker_mode(strategy) -> bool:
    """True under a multi-worker strategy (TensorFlow's private ``extended._in_multi_worker_mode``)."""
    extended = getattr(strategy, "extended", None)
    return bool(getattr(extended, "_in_multi_worker_mode", lambda: False)())


class _PrebuiltModel(keras.Model):
    """A Keras model that skips Keras 3's symbolic build once it is built (private ``_maybe_symbolic_build``)."""

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Under a distribution strategy Keras 3 builds symbolically from a batch it
        # takes off the iterator (and fails to reduce dict batches). The model and
        # optimizer are built before fit, so that batch would only be lost.
        if self.built and self.optimizer is not None and self.optimizer.built:
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)


# ------------------------------------------------------------------ the triplet model


class TripletModel(_PrebuiltModel):
    """Encoder (+ decoder) trained with the triplet (+ MSE) loss in a custom step.

    Parameters
    ----------
    encoder : keras.Model
        Maps (B, T, M, 1) tiles to (B, D).
    decoder : keras.Model or None
        Maps (B, D) back to (B, T, M, 1) for the MSE term.
    config : TrainingConfig
        ``loss`` drives :func:`tile2audio.losses.compute_losses`; ``model`` the export.
    precision : str
        The Keras dtype policy the encoder is exported in.
    multi_worker : bool
        Reshape the step's scalar outputs to (1,) for Keras's multi-worker reduction.
    """

    def __init__(self, encoder, decoder=None, *, config: TrainingConfig, precision: str,
                 multi_worker: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder
        self.trackers = {k: keras.metrics.Mean(name=k) for k in LOG_KEYS}
        self.run_config = config
        self.export_precision = precision
        self.multi_worker = multi_worker

    def export(self):
        """The encoder as plain Keras layers in the run's precision (what is saved)."""
        return export_encoder(self.encoder, self.run_config.model, self.export_precision)

    def call(self, x, training=False):
        return self.encoder(x, training=training)

    @property
    def metrics(self):
        return list(self.trackers.values())

    def train_step(self, data):
        xa, xn, xo = data["anchor"], data["neighbour"], data["opposite"]
        n = tf.shape(xa)[0]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            # One pass over the three tiles: faster, and batch norm sees all of them.
            z = self.encoder(tf.concat([xa, xn, xo], axis=0), training=True)
            za, zn, zo = z[:n], z[n : 2 * n], z[2 * n :]
            recon = None
            if self.decoder is not None:
                r = self.decoder(z, training=True)
                recon = (r[:n], r[n : 2 * n], r[2 * n :])
            # Looked up at trace time, so tests can patch tile2audio.losses.compute_losses.
            out = losses.compute_losses(self.run_config.loss, za, zn, zo, data, reconstructions=recon,
                                        tiles=(xa, xn, xo))
            # Gradients are summed over replicas, so each replica contributes its share.
            scaled = out["loss"] / tf.cast(replicas, out["loss"].dtype)
            # Loss scaling under mixed_float16 (the optimizer unscales in apply); else identity.
            scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        for k, tracker in self.trackers.items():
            tracker.update_state(out[k])
        results = {k: t.result() for k, t in self.trackers.items()}
        if self.multi_worker:
            # Keras reduces multi-worker step outputs along axis 0, which a scalar lacks.
            results = {k: tf.reshape(v, [1]) for k, v in results.items()}
        return results


def build_triplet_model(config: TrainingConfig, tile_shape: tuple[int, int, int], normalize: str,
                        *, baseline: bool = False) -> TripletModel:
    """The Keras model that owns the triplet train step (used by training and the benchmark).

    Parameters
    ----------
    config : TrainingConfig
        ``train.precision`` (``auto`` is resolved here) sets the encoder's dtype policy.
    tile_shape : (T, M, 1)
        Input tile shape.
    normalize : str
        The cache's ``features.normalize``; ``minmax`` gives the decoder a sigmoid output.
    baseline : bool
        Build the model the pre-speed-work way (float32, Keras's unfused batch norm),
        whatever the config says: ``tile2audio bench train --baseline`` compares with it.

    Returns
    -------
    keras.Model
        ``.encoder`` maps (B, T, M, 1) to (B, D); ``train_step`` takes the sampler's dict
        batches; ``.export()`` gives the encoder with plain Keras layers, for saving.
        Build it inside the strategy's scope. On one replica the encoder uses
        :class:`~tile2audio.models.FusedBatchNorm`; on several, synchronised Keras batch norm.
    """
    strategy = tf.distribute.get_strategy()
    multi_worker = _in_multi_worker_mode(strategy)
    seed = config.train.seed
    precision = "float32" if baseline else resolve_precision(config.train.precision)
    fused = strategy.num_replicas_in_sync == 1 and not baseline
    encoder = build_encoder(config.model, tile_shape, seed=seed, precision=precision, fused_batch_norm=fused)
    decoder = None
    if config.model.decoder or config.loss.mse_weight > 0:
        activation = "sigmoid" if normalize == "minmax" else "linear"
        decoder = build_decoder(config.model, tile_shape, output_activation=activation, seed=seed + 1)
    if strategy.num_replicas_in_sync > 1:
        # Batch statistics over all replicas: every worker then holds the same moving
        # averages, and each replica's small batch does not skew them.
        for net in (encoder, decoder):
            for layer in _all_layers(net):
                if isinstance(layer, keras.layers.BatchNormalization):
                    layer.synchronized = True
    return TripletModel(encoder, decoder, config=config, precision=precision, multi_worker=multi_worker)


def _all_layers(model) -> list:
    """Every layer of a (possibly nested) Keras model; [] for None."""
    if model is None:
        return []
    out = []
    for layer in getattr(model, "layers", []):
        out.append(layer)
        out.extend(_all_layers(layer) if hasattr(layer, "layers") else [])
    return out


def make_optimizer(config: TrainingConfig):
    """Adam with the run's learning rate: constant, or warmup then cosine decay."""
    t = config.train
    lr: Any = t.learning_rate
    if t.lr_schedule == "cosine":
        decay_steps = max(1, t.total_steps - t.warmup_steps)
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if t.warmup_steps else t.learning_rate,
            decay_steps=decay_steps,
            alpha=0.0,
            warmup_target=t.learning_rate if t.warmup_steps else None,
            warmup_steps=t.warmup_steps,
        )
    elif t.warmup_steps:
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0, decay_steps=1, alpha=1.0,
            warmup_target=t.learning_rate, warmup_steps=t.warmup_steps,
        )
    optimizer = keras.optimizers.Adam(learning_rate=lr)
    if resolve_precision(t.precision) == "mixed_float16":
        # float16 gradients underflow without loss scaling (bfloat16 has float32's range).
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# --------------------------------------------------------------------------- callbacks


def _healthy(model) -> bool:
    """True until :class:`NonFiniteStop` has seen a NaN or infinite loss."""
    return getattr(model, "non_finite_step", None) is None


class NonFiniteStop(keras.callbacks.Callback):
    """Stop at the first step whose loss is NaN or inf (sets ``model.non_finite_step``)."""

    def __init__(self, model):
        super().__init__()
        self.net = model

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.all(np.isfinite(np.asarray(loss, dtype=np.float64))):
            self.net.non_finite_step = int(self.net.optimizer.iterations.numpy())
            self.net.stop_training = True


class Checkpointer(keras.callbacks.Callback):
    """Checkpoint every N steps and at each epoch end (chief only), never non-finite weights.

    The epoch's last step is left to :meth:`on_epoch_end`, which runs after the log
    row is written: a kill between the two then loses the checkpoint, not the row.
    """

    def __init__(self, run_dir: Path, model, train_config, chief: bool):
        super().__init__()
        self.run_dir, self.net, self.t, self.chief = run_dir, model, train_config, chief

    def on_train_batch_end(self, batch, logs=None):
        t = self.t
        step = int(self.net.optimizer.iterations.numpy())
        if (self.chief and _healthy(self.net) and t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0
                and step % t.steps_per_epoch):
            save_checkpoint(self.run_dir, self.net, self.net.optimizer, step)

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.net.optimizer.iterations.numpy())
        if self.chief and _healthy(self.net):
            save_checkpoint(self.run_dir, self.net, self.net.optimizer, step)
            update_run_json(self.run_dir, step=step, epoch=epoch + 1, status="training")


class Monitor(keras.callbacks.Callback):
    """Warn on collapse; add the optional probe accuracy and the learning rate to the logs."""

    def __init__(self, model, train_config, probe_fn):
        super().__init__()
        self.net, self.t, self.probe_fn = model, train_config, probe_fn

    def on_epoch_end(self, epoch, logs=None):
        t, model = self.t, self.net
        logs = logs if logs is not None else {}
        spread = logs.get("spread")
        if spread is not None and spread < t.collapse_threshold:
            log.warning(
                "epoch %d: embedding spread across the batch is %.2e (< %.0e): the embeddings are "
                "collapsing; lower the learning rate or the margin, or use more negatives",
                epoch + 1, spread, t.collapse_threshold,
            )
        lr = model.optimizer.learning_rate
        logs["learning_rate"] = float(lr.numpy() if hasattr(lr, "numpy") else lr)
        logs["step"] = int(model.optimizer.iterations.numpy())
        if self.probe_fn is not None:
            do = t.probe_every_epochs and (epoch + 1) % t.probe_every_epochs == 0
            logs["probe_accuracy"] = float(self.probe_fn(model.encoder)) if do else float("nan")
            if do:
                log.info("epoch %d: probe accuracy %.3f", epoch + 1, logs["probe_accuracy"])


class EpochLog(keras.callbacks.Callback):
    """Append one row per epoch to log.csv (Keras's CSVLogger adds empty val_* columns)."""

    def __init__(self, run_dir: Path, model):
        super().__init__()
        self.run_dir, self.net = run_dir, model

    def on_epoch_end(self, epoch, logs=None):
        if not _healthy(self.net):  # the epoch did not finish
            return
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        path = self.run_dir / "log.csv"
        new = not path.is_file()
        try:
            with open(path, "a", encoding="utf-8", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as exc:
            raise Tile2AudioError(f"{path}: cannot write the training log: {exc.strerror or exc}") from exc


class EpochLine(keras.callbacks.Callback):
    """Print one line per epoch to stdout: epoch, step, seconds, the logs."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        step = int(logs.pop("step", 0))
        values = " - ".join(f"{k} {float(v):.4g}" for k, v in logs.items())
        print(f"epoch {epoch + 1}/{self.epochs} - step {step} - {time.time() - self.started:.1f} s - {values}",
              flush=True)


def _callbacks(run_dir: Path, model, config: TrainingConfig, chief: bool, probe_fn):
    """Checkpoint, collapse warning, probe, CSV and TensorBoard callbacks."""
    t = config.train
    # Order matters: the NaN check runs before the checkpoint, the log row before the epoch's checkpoint.
    cbs = [NonFiniteStop(model), Monitor(model, t, probe_fn)]
    if chief:
        cbs.append(EpochLog(run_dir, model))
    cbs.append(Checkpointer(run_dir, model, t, chief))
    if chief:
        cbs.append(keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard"), write_graph=False))
    return cbs


def _make_probe_fn(cache, config: TrainingConfig, geometry: TileGeometry, max_clips: int = 300):
    """A function encoder -> held-out logistic-probe accuracy, or None without labels.

    The splits are :func:`tile2audio.probes.make_splits` of (up to ``max_clips``) labelled
    clips, with the report's protocol (``auto``: split, fold, else 2-fold grouped k-fold),
    so the monitor never mixes a group across sides; C is fixed at 1 and the figure is
    the mean test accuracy over the splits.
    """
    labels = cache.index["label"].astype(str)
    if (labels == "").all() or labels[labels != ""].nunique() < 2:
        log.info("probe callback off: the cache has no labels")
        return None
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .config import ProbeConfig
    from .embed import embed_frames
    from .probes import make_splits

    rng = np.random.default_rng(config.train.seed)
    idx = cache.index[labels != ""].reset_index(drop=True)
    if len(idx) > max_clips:
        idx = idx.iloc[np.sort(rng.choice(len(idx), max_clips, replace=False))].reset_index(drop=True)
    try:
        splits = make_splits(idx, ProbeConfig(n_splits=2, seed=config.train.seed))
    except Tile2AudioError as exc:
        log.warning("probe callback off: %s", exc)
        return None
    y = idx["label"].astype(str).to_numpy()
    frames = [cache.frames(c) for c in idx["clip_id"]]

    def probe(encoder) -> float:
        reader = embedding_model(encoder, config.model.embedding_layer)
        X = np.stack([embed_frames(reader, f, geometry)[0].mean(axis=0) for f in frames])
        scores = []
        for split in splits:
            fit = np.concatenate([split.train, split.valid])
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            clf.fit(X[fit], y[fit])
            scores.append(float((clf.predict(X[split.test]) == y[split.test]).mean()))
        return float(np.mean(scores))

    return probe


# --------------------------------------------------------------------------- entry point


def _is_terminal() -> bool:
    """True when stdout is an interactive terminal (not a pipe, a file or a CI log)."""
    return bool(getattr(sys.stdout, "isatty", None) and sys.stdout.isatty())


def _flat(cfg: TrainingConfig) -> dict:
    """``section.key -> value`` of a training config."""
    return {f"{sec}.{k}": v for sec, d in to_dict(cfg).items() if isinstance(d, dict) for k, v in d.items()}


def resume_config(run_dir: str | os.PathLike, config: TrainingConfig | None) -> TrainingConfig:
    """The config to resume a run with: its saved one, with ``train.epochs`` possibly raised.

    Only ``train.epochs`` may change on resume, and only upwards: with a larger value a
    complete run continues from its last checkpoint to the new number of epochs (its
    ``config.yaml`` is updated; a cosine learning-rate schedule is rebuilt for the new
    length and continues from the step reached). The keys compared are those of
    ``config`` that differ from the defaults (what ``--config`` / ``--set`` gave; a key
    set to its default value cannot be told from one not given).

    Parameters
    ----------
    run_dir : path of an existing run
    config : TrainingConfig or None
        The config given now.

    Returns
    -------
    TrainingConfig

    Raises
    ------
    Tile2AudioError
        Naming every other key whose given value differs from the run's, or a
        ``train.epochs`` smaller than the run's.
    """
    run_dir = Path(run_dir)
    saved = load_run_config(run_dir)
    if config is None or config == saved:
        return saved
    given, default, old = _flat(config), _flat(TrainingConfig()), _flat(saved)
    changed = sorted(k for k, v in given.items() if v != default[k] and v != old[k])
    others = [k for k in changed if k != "train.epochs"]
    if others:
        raise Tile2AudioError(
            f"--resume: {run_dir} was trained with other settings for "
            + ", ".join(f"{k} (run: {old[k]!r}, given: {given[k]!r})" for k in others)
            + "; only train.epochs may change on resume (to train longer)"
        )
    if "train.epochs" not in changed:
        return saved
    epochs = config.train.epochs
    if epochs < saved.train.epochs:
        raise Tile2AudioError(f"--resume: train.epochs can only grow ({run_dir} has {saved.train.epochs}, "
                              f"given {epochs})")
    longer = dataclasses.replace(saved, train=dataclasses.replace(saved.train, epochs=epochs))
    log.info("training %s longer: %d -> %d epochs", run_dir, saved.train.epochs, epochs)
    atomic.write_text(run_dir / "config.yaml", dump_yaml(longer))
    update_run_json(run_dir, status="training")  # no longer complete until the new epochs are done
    return longer


def train(
    cache: str | os.PathLike,
    out: str | os.PathLike,
    config: TrainingConfig | None = None,
    *,
    resume: bool = False,
    exact: bool = False,
    strategy: str | None = None,
    progress: bool = True,
) -> Path:
    """Train an encoder on a feature cache without labels.

    Parameters
    ----------
    cache : path
        A feature cache written by :func:`tile2audio.features.build_cache`.
    out : path
        Where runs go: a new run directory named by :func:`run_name` is made inside it.
        If ``out`` already is a run directory (or ``exact=True``), it is used as is.
    config : TrainingConfig, optional
        Defaults to ``TrainingConfig()``. When resuming, the run's saved config is used,
        except that a larger ``train.epochs`` trains a run longer (see
        :func:`resume_config`).
    resume : bool
        Continue the newest checkpoint of the run (``out``, or the newest run in ``out``).
    exact : bool
        Treat ``out`` as the run directory itself.
    strategy : str, optional
        ``auto``, ``one``, ``mirrored`` or ``multiworker``; defaults to ``train.strategy``.
    progress : bool
        Show Keras's progress bar when stdout is a terminal; otherwise (and without
        progress) print one line per epoch (``epoch 3/10 - step 300 - 12.1 s - loss ...``).

    Returns
    -------
    Path
        The run directory, holding ``encoder.keras`` when training finished.
    """
    from .features import open_cache
    from .rules import choose_training

    given = config = config or TrainingConfig()
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
    strat = make_strategy(strategy or config.train.strategy)
    worker, n_workers, chief = _worker_info(strat)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise Tile2AudioError(f"{out}: -o names an existing file, not a runs folder or run directory")
    auto: dict = {}
    fc = None
    if (not resume or (exact and not is_run_dir(out))) and config.rule_pending:
        # A new run: the automatic rule reads the cache's clips first, as the run's name uses the tile length.
        fc = open_cache(cache)
        config, auto = choose_training(config, fc.index, fc.frames_per_second)
    existed = out.exists()
    run_dir, resuming = _resolve_run_dir(out, config, resume, exact, stamp="multiworker" if n_workers > 1 else None)
    # Non-chief workers keep their own copy of the outputs, so nothing is written twice.
    own_dir = run_dir if chief else run_dir / f"worker_{worker}"
    new_dir = not resuming and n_workers == 1 and (own_dir != out or not existed)
    atomic.ensure_dir(own_dir, "run folder")
    try:
        with lock_run(own_dir):
            if resuming:  # _resolve_run_dir only resumes existing run directories
                # Compared as given: "auto" values equal the defaults, so they never count as a change.
                config = resume_config(run_dir, given)
                fc = _resume_cache(run_dir, cache)
            fc = fc or open_cache(cache)  # opened once: a new run's rule has read it already
            try:
                return _train_locked(fc, run_dir, own_dir, config, auto, strat, worker, n_workers, chief, progress,
                                     resuming)
            except KeyboardInterrupt as exc:
                if not (own_dir / "config.yaml").is_file():
                    raise KeyboardInterrupt("nothing was trained yet; rerun the same command") from exc
                raise KeyboardInterrupt(
                    f"run {own_dir} kept; continue it with: {resume_command(run_dir, fc.path)}") from exc
    except BaseException:
        # A new run that failed before writing anything leaves no empty folder behind.
        if new_dir and not (own_dir / "config.yaml").is_file() and own_dir.is_dir():
            if all(p.name == ".lock" for p in own_dir.iterdir()):
                shutil.rmtree(own_dir, ignore_errors=True)
        raise


def _resume_cache(run_dir: Path, cache: str | os.PathLike | None):
    """The feature cache to resume ``run_dir`` on, checked against the features it was trained on.

    The cache given (``--cache``) is used when its feature parameters and normalisation
    statistics (:func:`tile2audio.runs.feature_fingerprint`) are the run's; a cache
    rebuilt in place with other settings, or another cache, is refused by name, since
    training on would change what the encoder's input means (or its tile length).
    """
    from .features import open_cache

    feat_path = run_dir / "features.json"
    if not feat_path.is_file():
        raise Tile2AudioError(f"{run_dir} is not a tile2audio run directory (no features.json)")
    info = read_run(run_dir)
    trained_on = info.get("features_sha256") or feature_fingerprint(read_json_object(feat_path), feat_path)
    recorded = info.get("cache")
    path = Path(cache if cache is not None else recorded)
    fc = open_cache(path)
    now = feature_fingerprint(read_json_object(Path(fc.path) / "params.json"), Path(fc.path) / "params.json")
    if now != trained_on:
        same = recorded is not None and Path(recorded).resolve() == path.resolve()
        raise Tile2AudioError(
            f"--resume: the cache {path} "
            + ("was rebuilt with other feature settings since the run was trained"
               if same else f"has other feature parameters or statistics than the one run {run_dir} was trained on "
                            f"({recorded})")
            + f" (params.json differs from {feat_path}); resume with the cache the run was trained on, "
            "or start a new run"
        )
    if recorded is not None and Path(recorded).resolve() != path.resolve():
        log.info("resuming %s on %s (same features as its cache %s)", run_dir, path, recorded)
    return fc


def _keep_interrupted(run_dir: Path, own_dir: Path, model, chief: bool) -> None:
    """After Ctrl-C or SIGTERM: checkpoint the step reached and remove half-written files."""
    step = int(model.optimizer.iterations.numpy())
    if chief and _healthy(model) and step:
        try:
            save_checkpoint(run_dir, model, model.optimizer, step)
            log.info("interrupted: checkpoint at step %d written", step)
        except Tile2AudioError as exc:  # the earlier checkpoints stay usable
            log.warning("interrupted: %s", exc)
    if chief:
        remove_stale_temporaries(run_dir)
    for tmp in own_dir.glob(".*.tmp.keras"):
        tmp.unlink(missing_ok=True)


def check_tile_settings(config: TrainingConfig, geometry: TileGeometry, clip_frames: np.ndarray) -> None:
    """Refuse tile settings that cannot train, and warn about ones the clips make pointless.

    A tile of one frame has no time structure for the encoder to learn from: an error.
    Tiles longer than most clips (every such tile is the clip looped end to end) and a
    neighbourhood shorter than the tile (every neighbour overlaps its anchor) train, but
    are rarely what was meant: a warning naming the numbers.

    Parameters
    ----------
    config : TrainingConfig
    geometry : TileGeometry
    clip_frames : np.ndarray
        int, shape (n_clips,): frames of each clip of the cache.
    """
    t, fps = config.tiles, geometry.frames_per_second
    if geometry.tile_frames < 2:
        raise Tile2AudioError(
            f"tiles.tile_seconds {t.tile_seconds:g} is {geometry.tile_frames} frame at {fps:g} frames/s: a tile "
            f"needs at least 2 frames (>= {2 / fps:.3g} s) for the encoder to see any time structure"
        )
    clip_frames = np.asarray(clip_frames)
    short = int(np.sum(clip_frames < geometry.tile_frames))
    if len(clip_frames) and short > len(clip_frames) // 2:
        log.warning(
            "tiles.tile_seconds %g is longer than %d of %d clips (longest clip %.3g s): each of their tiles is "
            "the clip looped end to end; choose tiles shorter than the clips (or leave tiles.tile_seconds auto)",
            t.tile_seconds, short, len(clip_frames), float(clip_frames.max()) / fps,
        )
    if config.sampler.positive == "neighbour" and geometry.neighbourhood_frames < geometry.tile_frames:
        log.warning(
            "tiles.neighbourhood_seconds %g is shorter than tiles.tile_seconds %g: every neighbour overlaps its "
            "anchor, so the positive pair is nearly the same tile; use a neighbourhood of at least one tile "
            "(the rule's default is two)", t.neighbourhood_seconds, t.tile_seconds,
        )


def _memory_bytes() -> int | None:
    """Physical memory of the machine in bytes, if the OS says."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def check_batch_size(batch_size: int, geometry: TileGeometry, n_mels: int, n_clips: int) -> None:
    """Refuse a ``train.batch_size`` whose input tiles alone cannot fit in memory.

    A batch holds 3 x batch_size tiles of (tile_frames, n_mels) float32; the encoder's
    activations need several times more. A batch whose tiles alone take more than a
    quarter of the machine's memory fails (after minutes, deep in TensorFlow) anyway,
    so it is refused at start; a batch larger than the cache's clips times 100 is too.
    """
    tile_bytes = 3 * geometry.tile_frames * n_mels * 4
    total = _memory_bytes()
    need = batch_size * tile_bytes
    if total is not None and need > total // 4:
        raise Tile2AudioError(
            f"train.batch_size {batch_size:g} needs {need / 2**30:.3g} GiB for its input tiles alone, more than a "
            f"quarter of this machine's {total / 2**30:.3g} GiB; use at most {max(1, total // 4 // tile_bytes):,}"
            " (typical: 32 to 256)"
        )
    if batch_size > 100 * max(n_clips, 1):
        raise Tile2AudioError(
            f"train.batch_size {batch_size:,} is more than 100 triplets per clip of the cache ({n_clips} clips); "
            "use a smaller batch (typical: 32 to 256)"
        )


def resume_command(run_dir: str | os.PathLike, cache: str | os.PathLike) -> str:
    """The shell command that continues ``run_dir`` from its newest checkpoint."""
    return (f"tile2audio train --resume --cache {shlex.quote(str(cache))} "
            f"-o {shlex.quote(str(run_dir))}")


def _train_locked(fc, run_dir: Path, own_dir: Path, config: TrainingConfig, auto: dict, strat, worker: int,
                  n_workers: int, chief: bool, progress: bool, resuming: bool) -> Path:
    """The body of :func:`train`, run while holding the run's lock."""
    from .sampler import TripletSampler

    if config.sampler.mode == "supervised" and (fc.index["label"].astype(str) == "").all():
        raise Tile2AudioError("sampler.mode 'supervised' needs labels, and the cache has none")
    if config.model.embed_layer != config.model.embedding_layer:
        # Recorded resolved, as every automatic choice, so a later default cannot change what a run embeds.
        config = replace(config, model=replace(config.model, embed_layer=config.model.embedding_layer))
    if config.train.precision == "auto":
        # The run directory records the value chosen, so a resume on another machine keeps it.
        config = replace(config, train=replace(config.train, precision=resolve_precision("auto")))
        log.info("train.precision auto -> %s", config.train.precision)
    t = config.train
    keras.utils.set_random_seed(t.seed)
    # Seconds become frames here once; run.json keeps the result for every later reader.
    geometry = TileGeometry.from_config(config.tiles, fc.frames_per_second)
    check_tile_settings(config, geometry, fc.index["n_frames"].to_numpy())
    check_batch_size(t.batch_size, geometry, fc.n_mels, len(fc.index))
    if not is_run_dir(own_dir):
        atomic.write_text(own_dir / "config.yaml", dump_yaml(config))
        shutil.copyfile(Path(fc.path) / "params.json", own_dir / "features.json")
        atomic.write_json(
            own_dir / "run.json",
            {"cache": str(Path(fc.path).resolve()), "status": "started", "step": 0, "epoch": 0,
             "label_free": config.sampler.label_free, "mode": config.sampler.mode,
             "encoder": config.model.encoder, "seed": t.seed, "workers": n_workers, "train_seconds": 0.0,
             "auto": auto, "geometry": geometry_record(geometry), "embed_layer": config.model.embed_layer,
             "features_sha256": feature_fingerprint(read_json_object(own_dir / "features.json"),
                                                    own_dir / "features.json")},
        )
    log.info("run directory: %s", own_dir)

    replicas = strat.num_replicas_in_sync
    if t.batch_size % replicas:
        raise Tile2AudioError(f"train.batch_size {t.batch_size} is not divisible by {replicas} replicas")

    def sampler_for(worker_index: int, workers: int, batch: int):
        return TripletSampler(fc, config.tiles, config.sampler, batch_size=batch, seed=t.seed,
                              worker_index=worker_index, num_workers=workers)

    local_sampler = sampler_for(worker, n_workers, t.batch_size // n_workers)
    tile_shape = tuple(local_sampler.tile_shape)

    with strat.scope():
        model = build_triplet_model(config, tile_shape, fc.params.normalize)
        model(np.zeros((1,) + tile_shape, np.float32))
        model.compile(optimizer=make_optimizer(config), jit_compile=t.jit_compile)
        model.optimizer.build(model.trainable_variables)

    if not (own_dir / "encoder_init.keras").is_file():
        save_keras_atomic(model.export(), own_dir / "encoder_init.keras")

    if chief:
        remove_stale_temporaries(run_dir)
    step = 0
    if resuming:
        ckpts = _checkpoint_dirs(run_dir)
        if ckpts:
            step = restore_checkpoint(ckpts[-1], model, model.optimizer)
            log.info("resumed from %s (step %d)", ckpts[-1].name, step)
        else:
            log.warning("no checkpoint in %s: starting from step 0", run_dir)
    if chief:
        _trim_log(run_dir, step, t.steps_per_epoch)
    total = t.total_steps
    if step >= total and (run_dir / "encoder.keras").is_file():
        log.info("run %s is already complete (%d steps)", run_dir, step)
        return run_dir

    def dataset_from(start: int):
        if n_workers == 1 and replicas == 1:
            return local_sampler.dataset(start_step=start)

        def per_worker(ctx):
            s = sampler_for(ctx.input_pipeline_id, ctx.num_input_pipelines, ctx.get_per_replica_batch_size(t.batch_size))
            return s.dataset(start_step=start)

        return strat.distribute_datasets_from_function(per_worker)

    probe_fn = _make_probe_fn(fc, config, geometry) if t.probe_every_epochs and chief else None
    callbacks = _callbacks(run_dir, model, config, chief, probe_fn)
    started = time.time()
    epoch, offset = divmod(step, t.steps_per_epoch)
    # Keras's bar is for terminals; in a CI log, `| tee` or nohup it is one line per epoch.
    verbose = 1 if progress and _is_terminal() else 0
    if not verbose:
        callbacks = callbacks + [EpochLine(t.epochs)]
    try:
        if offset:
            # Finish the interrupted epoch first, then run whole epochs.
            model.fit(dataset_from(step), epochs=epoch + 1, initial_epoch=epoch,
                      steps_per_epoch=t.steps_per_epoch - offset, callbacks=callbacks, verbose=verbose, shuffle=False)
            epoch += 1
        if epoch < t.epochs and getattr(model, "non_finite_step", None) is None:
            model.fit(dataset_from(epoch * t.steps_per_epoch), epochs=t.epochs, initial_epoch=epoch,
                      steps_per_epoch=t.steps_per_epoch, callbacks=callbacks, verbose=verbose, shuffle=False)
    except KeyboardInterrupt:
        _keep_interrupted(run_dir, own_dir, model, chief)
        raise
    elapsed = time.time() - started
    bad_step = getattr(model, "non_finite_step", None)
    if bad_step is not None:
        ckpts = _checkpoint_dirs(run_dir)
        last = ckpts[-1].name if ckpts else None
        update_run_json(own_dir, status="failed", failed_step=bad_step, error="non-finite loss",
                         last_good_checkpoint=last)
        raise Tile2AudioError(
            f"{own_dir}: training stopped at step {bad_step}: the loss is NaN or infinite; "
            + (f"the last good checkpoint is {last}. " if last else "no checkpoint was written. ")
            + "Lower train.learning_rate (or check the cache for bad values) and train again"
        )

    save_keras_atomic(model.export(), own_dir / "encoder.keras")
    previous = read_run(own_dir).get("train_seconds", 0.0)
    update_run_json(own_dir, status="complete", step=int(model.optimizer.iterations.numpy()),
                     epoch=t.epochs, train_seconds=round(previous + elapsed, 2))
    log.info("training finished: %s (%.1f s)", own_dir / "encoder.keras", elapsed)
    return own_dir
