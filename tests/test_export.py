"""The exported model: agreement with `tile2audio embed`, loading without tile2audio, TFLite, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf

from conftest import SHARED_DATASETS, TINY_FEATURES, TINY_TRAIN
from tile2audio.audio import load_audio, loop_pad
from tile2audio.cli import main
from tile2audio.config import FeatureParams, ModelConfig, load_training
from tile2audio.embed import embed
from tile2audio.errors import Tile2AudioError
from tile2audio.export import EmbeddingGraph, export_run, float32_encoder, load_exported, model_card
from tile2audio.features import log_mel, normalize_frames
from tile2audio.models import build_encoder
from tile2audio.runs import open_run
from tile2audio.tiles import TileGeometry, tile_starts

SR = TINY_FEATURES["sample_rate"]


@pytest.fixture(scope="module")
def float_run(tiny_cache, tmp_path_factory):
    """A tiny run trained (two steps) in float32, the agreement's reference precision."""
    from tile2audio.train import train

    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2", "train.precision=float32"])
    return train(tiny_cache, tmp_path_factory.mktemp("export_run") / "run", cfg, exact=True, progress=False)


@pytest.fixture(scope="module")
def saved(float_run, tmp_path_factory):
    return export_run(float_run, tmp_path_factory.mktemp("export") / "model")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_exported_model_agrees_with_embed(float_run, saved, tmp_path, write_audio, tone_fn):
    model = load_exported(saved)
    for seconds in (0.3, 4.0, 60.0):
        path = write_audio(tmp_path / f"c{seconds}.wav", tone_fn(seconds, sr=SR, freq=300, chirp_to=3000, noise=0.05),
                           sr=SR, subtype="FLOAT")
        ref = embed(float_run, [path], progress=False)
        e_ref, ts_ref = ref.tiles(ref.clips["clip_id"][0])
        out = model.embed(load_audio(path, SR))
        assert out["embeddings"].shape == e_ref.shape, seconds
        assert _cosine(out["embeddings"], e_ref).min() >= 0.999, seconds
        np.testing.assert_allclose(out["timestamps"], ts_ref, atol=1e-4)
        np.testing.assert_allclose(out["clip_embedding"], ref.pooled("meanstd")[0], atol=1e-4)


DEV_SETS = sorted(p for p in SHARED_DATASETS.glob("*") if p.is_dir()) if SHARED_DATASETS.is_dir() else []


@pytest.mark.skipif(not DEV_SETS, reason=f"no development data sets at {SHARED_DATASETS}")
def test_exported_model_agrees_on_real_clips(float_run, saved):
    """Two clips of each development set (TILE2AUDIO_DATASETS points elsewhere)."""
    model = load_exported(saved)
    for root in DEV_SETS:
        files = sorted(f for f in root.rglob("*") if f.suffix.lower() in (".wav", ".mp3", ".ogg", ".flac"))[:2]
        for path in files:
            ref = embed(float_run, [path], progress=False)
            e_ref, ts_ref = ref.tiles(ref.clips["clip_id"][0])
            out = model.embed(load_audio(path, SR))
            assert out["embeddings"].shape == e_ref.shape, path
            assert _cosine(out["embeddings"], e_ref).min() >= 0.999, path
            np.testing.assert_allclose(out["timestamps"], ts_ref, atol=1e-3)


@pytest.mark.parametrize("changes", [
    {},
    {"normalize": "minmax"},
    {"log": "log", "normalize": "none"},
    {"top_db": None, "win_length": 200},
    {"n_fft": 255, "fmin": 100.0, "fmax": 3000.0},
])
def test_front_end_matches_log_mel(changes, tone_fn):
    params = replace(FeatureParams(**TINY_FEATURES), **changes)
    stats = {"mean": np.linspace(-60, -20, 16).astype(np.float32), "std": np.linspace(5, 15, 16).astype(np.float32)}
    geometry = TileGeometry(tile_frames=31, hop_frames=31, neighbourhood_frames=0, min_gap_frames=0,
                            frames_per_second=params.frames_per_second)
    encoder = build_encoder(ModelConfig(widths=(4,), embedding_dim=4), (geometry.tile_frames, 16, 1))
    graph = EmbeddingGraph(encoder, params, stats, geometry)
    # Two clips in one batch: top_db and minmax are per clip, not per batch.
    y = np.stack([tone_fn(0.7, sr=SR, freq=500, amp=0.5), tone_fn(0.7, sr=SR, freq=900, amp=0.001, noise=1e-4)])
    frames = graph._frames(tf.constant(y)).numpy()
    for row, clip in zip(frames, y):
        ref = normalize_frames(log_mel(loop_pad(clip, SR), params), params, stats)
        assert row.shape == ref.shape
        np.testing.assert_allclose(row, ref, atol=1e-3 * max(1.0, float(np.abs(ref).max())))


def test_loads_in_a_fresh_process_without_tile2audio(saved, tmp_path, tone_fn):
    wave = tone_fn(2.5, sr=SR, freq=440, noise=0.01)
    np.save(tmp_path / "wave.npy", wave)
    script = (
        "import sys, json, numpy as np, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(saved)!r})\n"
        f"out = m.embed(np.load({str(tmp_path / 'wave.npy')!r}))\n"
        f"np.save({str(tmp_path / 'emb.npy')!r}, out['embeddings'].numpy())\n"
        "served = m.signatures['serving_default'](waveform=tf.constant(np.load('wave.npy')))\n"
        "assert served['embeddings'].shape == out['embeddings'].shape\n"
        "assert 'tile2audio' not in sys.modules\n"
        "print(json.dumps({'sr': int(m.info()['sample_rate']), 'shape': out['embeddings'].shape.as_list(),"
        " 'mods': sorted(k for k in sys.modules if k.startswith('tile2audio'))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sr"] == SR and result["mods"] == []
    here = load_exported(saved).embed(wave)["embeddings"]
    assert result["shape"] == list(here.shape)
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), here, atol=1e-5)


def test_tflite_runs_in_the_interpreter(float_run, saved, tmp_path, tone_fn):
    out = export_run(float_run, tmp_path / "lite", format="tflite")
    assert (out / "model.tflite").is_file() and (out / "model_card.md").is_file()
    interpreter = tf.lite.Interpreter(model_path=str(out / "model.tflite"))
    runner = interpreter.get_signature_runner()
    wave = tone_fn(1.5, sr=SR, freq=700, noise=0.02)
    try:
        got = runner(waveform=wave)
    except RuntimeError as exc:  # only a model with Flex ops meets this
        if "Select TensorFlow op(s)" in str(exc):
            pytest.skip("this TensorFlow's Python TFLite interpreter cannot run select TF (Flex) ops")
        raise
    ref = load_exported(saved).embed(wave)
    for key in ("embeddings", "timestamps", "clip_embedding"):
        np.testing.assert_allclose(got[key], ref[key], atol=1e-4)


def test_bad_input(saved, tone_fn):
    model = load_exported(saved)
    wave = tone_fn(1.0, sr=SR)
    bad = {
        "no samples": np.zeros(0, np.float32),
        "NaN or inf": np.where(np.arange(len(wave)) == 10, np.nan, wave).astype(np.float32),
        "stereo": np.stack([wave, wave], axis=1),
        "int16": (wave * 32767).astype(np.int16),
    }
    for words, x in bad.items():
        with pytest.raises(Tile2AudioError, match=words):
            model.embed(x)
    # The bare graph (no tile2audio) refuses the same inputs with its own messages.
    graph_bad = {**bad, "int16": (wave * 32767).astype(np.int16).astype(np.float32)}
    for words, x in zip(("STFT hop", "NaN or inf", "stereo given", "int16 PCM"), graph_bad.values()):
        with pytest.raises(tf.errors.InvalidArgumentError, match=words):
            model.module.embed(x)
    # A clip shorter than a tile (and than min_seconds) is looped: the documented padding.
    short = model.embed(tone_fn(0.05, sr=SR))
    looped_frames = 1 + SR // TINY_FEATURES["hop_length"]  # 1 s of looped audio
    assert len(short["embeddings"]) == len(tile_starts(looped_frames, 31, 31))
    assert np.isfinite(short["embeddings"]).all()
    np.testing.assert_allclose(short["timestamps"][-1, 1], 1.0, atol=0.02)  # looped to min_seconds = 1 s


def test_batch_input_prepends_the_batch_axis(saved, tone_fn):
    model = load_exported(saved)
    a, b = tone_fn(2.0, sr=SR, freq=300), tone_fn(2.0, sr=SR, freq=1200, noise=0.05)
    batch = model.embed(np.stack([a, b]))
    for i, y in enumerate((a, b)):
        one = model.embed(y)
        for key in one:
            np.testing.assert_allclose(batch[key][i], one[key], atol=1e-5)


def test_export_folder_rules_and_cli(float_run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(Tile2AudioError, match="not a tile2audio export"):
        export_run(float_run, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert main(["-q", "export", str(float_run), "-o", str(tmp_path / "m"), "--weights", "init"]) == 0
    first = json.loads((tmp_path / "m" / "export.json").read_text())
    assert first["weights"] == "init" and first["embedding_size"] == 8
    assert main(["-q", "export", str(float_run), "-o", str(tmp_path / "m")]) == 0  # replaces the earlier export
    assert json.loads((tmp_path / "m" / "export.json").read_text())["weights"] == "trained"
    assert main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 2


def test_float32_encoder_rebuilds_mixed_precision():
    encoder = build_encoder(ModelConfig(widths=(4, 8), embedding_dim=4), (16, 8, 1), precision="mixed_bfloat16")
    twin = float32_encoder(encoder)
    assert twin is not encoder
    assert {layer.dtype_policy.name for layer in twin.layers} == {"float32"}
    x = np.random.default_rng(0).standard_normal((3, 16, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(twin(x).numpy(), encoder(x).numpy(), atol=0.05)
    assert float32_encoder(twin) is twin


def test_model_card_lists_probe_figures(float_run, tmp_path):
    experiment = tmp_path / "exp"
    shutil.copytree(float_run, experiment / "run")
    (experiment / "probe").mkdir()
    row = {"name": "run", "kind": "trained", "probe": "linear", "pooling": "meanstd", "accuracy": 0.75,
           "macro_f1": 0.7, "macro_f1_std": 0.05}
    (experiment / "probe" / "probe.json").write_text(json.dumps({"rows": [row]}))
    out = export_run(experiment / "run", tmp_path / "model")
    card = (out / "model_card.md").read_text()
    assert "| run | trained | linear | meanstd | 0.750 | 0.700 ± 0.050 |" in card
    assert f"**{SR} Hz**" in card and "tile_seconds: 0.5" in card  # the input contract and the run's config
    bare = model_card(open_run(float_run), json.loads((out / "export.json").read_text()))
    assert "No report" in bare
