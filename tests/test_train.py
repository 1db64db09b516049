"""Training: run directory contents, logs, safe loading, resume after SIGKILL, errors."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import keras
import numpy as np
import pandas as pd
import pytest

from conftest import TINY_TRAIN
from tile2audio.config import load_training
from tile2audio.errors import Tile2AudioError
from tile2audio.features import open_cache
from tile2audio.rules import choose_training
from tile2audio.runs import load_encoder, read_run
from tile2audio.train import resolve_precision, run_name, train


def _cfg(*extra):
    return load_training(None, TINY_TRAIN + ["train.epochs=2", "train.steps_per_epoch=3", *extra])


def test_train_writes_a_complete_run_directory(tiny_cache, tmp_path):
    run = train(tiny_cache, tmp_path / "runs", _cfg(), progress=False)
    assert run.parent == tmp_path / "runs" and run.name.startswith("cnn-d8-t0.5s-tile2vec-batch_all")
    for name in ("config.yaml", "features.json", "run.json", "encoder.keras", "encoder_init.keras", "log.csv"):
        assert (run / name).is_file(), name
    # The run records the precision that auto chose on this machine, not "auto".
    # ... and the tile / sampler values the automatic rule chose from the cache's clips.
    saved = load_training(run / "config.yaml")
    assert saved.train.precision == resolve_precision("auto") != "auto"
    cache = open_cache(tiny_cache)
    chosen, facts = choose_training(_cfg(f"train.precision={saved.train.precision}"), cache.index,
                                    cache.frames_per_second)
    # ... and the layer embed reads (auto resolves to the output without a projection head).
    assert saved.model.embed_layer == "output" and chosen.model.embed_layer == "auto"
    chosen = replace(chosen, model=replace(chosen.model, embed_layer="output"))
    assert saved == chosen and not saved.tiles.is_auto and not saved.sampler.is_auto
    assert read_run(run)["auto"] == facts and "tiles.min_gap_seconds" in facts["settings"]
    log = pd.read_csv(run / "log.csv")
    assert list(log["epoch"]) == [0, 1]
    for col in ("loss", "triplet", "active_fraction", "d_an", "d_ao", "spread", "learning_rate"):
        assert col in log.columns and log[col].notna().all(), col
    assert ((log["active_fraction"] >= 0) & (log["active_fraction"] <= 1)).all()
    info = read_run(run)
    assert info["status"] == "complete" and info["step"] == 6 and info["label_free"] is True
    trained = load_encoder(run)
    init = load_encoder(run, "init")
    x = np.random.default_rng(0).standard_normal((2,) + tuple(trained.input_shape[1:])).astype("float32")
    assert trained(x).shape == (2, 8)
    assert not np.allclose(trained(x), init(x)), "training changed nothing"
    assert keras.saving.load_model(run / "encoder.keras", safe_mode=True) is not None


def test_decoder_and_mse_are_logged(tiny_cache, tmp_path):
    run = train(tiny_cache, tmp_path, _cfg("loss.mse_weight=1.0", "train.epochs=1"), exact=True, progress=False)
    log = pd.read_csv(run / "log.csv")
    assert (log["mse"] > 0).all()


def test_existing_run_needs_resume(tiny_cache, tmp_path):
    run = train(tiny_cache, tmp_path / "r", _cfg("train.epochs=1"), exact=True, progress=False)
    with pytest.raises(Tile2AudioError, match="--resume"):
        train(tiny_cache, run, _cfg("train.epochs=1"), progress=False)
    # A finished run resumed is a no-op that keeps the step count.
    train(tiny_cache, run, _cfg("train.epochs=1"), resume=True, progress=False)
    assert read_run(run)["step"] == 3


def test_run_name_has_key_hyperparameters():
    name = run_name(_cfg("train.seed=5"), when=0)
    assert name.startswith("cnn-d8-t0.5s-tile2vec-batch_all-m0.5-s5-")


def test_supervised_needs_labels(tiny_cache, tmp_path):
    import shutil

    unlabelled = tmp_path / "cache"
    shutil.copytree(tiny_cache, unlabelled)
    idx = pd.read_csv(unlabelled / "index.csv", dtype=str, keep_default_na=False)
    idx["label"] = ""
    idx.to_csv(unlabelled / "index.csv", index=False)
    with pytest.raises(Tile2AudioError, match="supervised"):
        train(unlabelled, tmp_path / "runs", _cfg("sampler.mode=supervised"), progress=False)


def test_killed_run_resumes_to_the_same_step_count(tiny_cache, tmp_path):
    out = tmp_path / "run"
    sets = TINY_TRAIN + ["train.epochs=3", "train.steps_per_epoch=4", "train.checkpoint_every_steps=2"]
    cmd = [sys.executable, "-m", "tile2audio", "-q", "train", "--cache", str(tiny_cache), "-o", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    killed = False
    while time.time() < deadline and proc.poll() is None:
        ckpts = list(out.glob("*/checkpoints/step_*/state.json"))
        if ckpts:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    (run,) = [d for d in out.iterdir() if d.is_dir()]
    assert not (run / "encoder.keras").exists()
    result = subprocess.run(cmd[:-len(sets) * 2] + ["--resume"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    info = read_run(run)
    assert info["status"] == "complete" and info["step"] == 12
    log = pd.read_csv(run / "log.csv")
    assert log["epoch"].max() == 2 and log["step"].iloc[-1] == 12


def test_probe_callback_logs_accuracy_and_collapse_warns(tiny_cache, tmp_path, caplog):
    cfg = _cfg("train.probe_every_epochs=1", "train.collapse_threshold=100.0")
    with caplog.at_level("WARNING", logger="tile2audio.train"):
        run = train(tiny_cache, tmp_path, cfg, exact=True, progress=False)
    log = pd.read_csv(run / "log.csv")
    assert log["probe_accuracy"].between(0, 1).all() and len(log) == 2
    assert any("collapsing" in r.getMessage() for r in caplog.records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard" / "train"))
    events.Reload()  # the epoch probe accuracy is a TensorBoard scalar too
    assert "epoch_probe_accuracy" in events.Tags()["tensors"] + events.Tags()["scalars"]


def test_keras_compatibility_block():
    """The private Keras / TensorFlow hooks train.py relies on still exist, within setup.cfg's bounds."""
    import configparser
    from pathlib import Path

    import tensorflow as tf
    from packaging.requirements import Requirement
    from packaging.version import Version

    from tile2audio import train as train_module

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    (req,) = [Requirement(r) for r in cfg["options"]["install_requires"].split("\n") if r.strip().startswith("keras")]
    assert any(s.operator == "<" for s in req.specifier), "keras needs an upper bound in setup.cfg"
    assert req.specifier.contains(keras.__version__), f"keras {keras.__version__} is outside {req.specifier}"
    low, high = (Version(v) for v in train_module.KERAS_CHECKED)
    assert low <= Version(keras.__version__) <= high, "update KERAS_CHECKED after checking this Keras version"
    # The overridden private method must still be a Keras method with the same arguments.
    import inspect

    params = list(inspect.signature(keras.Model._maybe_symbolic_build).parameters)
    assert params == ["self", "iterator", "data_batch"]
    assert "_maybe_symbolic_build" in vars(train_module._PrebuiltModel)
    assert hasattr(tf.distribute.get_strategy().extended, "_in_multi_worker_mode")
    assert train_module._in_multi_worker_mode(tf.distribute.get_strategy()) is False
