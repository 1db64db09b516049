"""Embedding export: per-clip tile files, clip matrices, the one-line API, resume."""

import numpy as np
import pandas as pd
import pytest

import tile2audio
from conftest import TINY_TRAIN
from tile2audio.config import load_training
from tile2audio.embed import load_embeddings, pool_tiles, safe_file_name
from tile2audio.embed import embed as embed_fn
from tile2audio.errors import Tile2AudioError
from tile2audio.train import train


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2"])
    return train(tiny_cache, tmp_path_factory.mktemp("run") / "run", cfg, exact=True, progress=False)


def test_embed_cache_writes_tiles_and_clip_matrices(tiny_run, tiny_cache, tmp_path):
    out = tmp_path / "emb"
    emb = embed_fn(tiny_run, tiny_cache, out, progress=False)
    clips = pd.read_csv(out / "clips.csv", dtype=str, keep_default_na=False)
    index = pd.read_csv(tiny_cache / "index.csv", dtype=str, keep_default_na=False)
    assert list(clips["clip_id"]) == list(index["clip_id"])
    assert list(clips["label"]) == list(index["label"]) and "group" in clips and "fold" in clips
    e, ts = emb.tiles(clips["clip_id"][0])
    assert e.ndim == 2 and e.shape[1] == 8 and ts.shape == (len(e), 2)
    assert (ts[:, 1] > ts[:, 0]).all() and ts[0, 0] == 0
    again = load_embeddings(out)
    np.testing.assert_allclose(again.pooled("mean")[0], e.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert again.pooled("meanstd").shape == (len(clips), 16)
    assert again.kind == "trained" and again.label_free


def test_one_line_api_on_audio_files(tiny_run, tiny_dataset, tmp_path, write_audio, tone_fn):
    stereo = write_audio(tmp_path / "stereo44k.wav", tone_fn(2.0, sr=44100, channels=2), sr=44100)
    short = write_audio(tmp_path / "short.wav", tone_fn(0.1, sr=8000), sr=8000)
    emb = tile2audio.embed_audio(tiny_run, [stereo, short], progress=False)
    assert list(emb.clips["clip_id"]) == ["stereo44k", "short"]
    assert emb.pooled("mean").shape == (2, 8)
    # The front end loops a clip shorter than features.min_seconds (1 s) up to 1 s.
    e_short, ts_short = emb.tiles("short")
    assert len(e_short) >= 1 and ts_short[-1, 1] == pytest.approx(1.0, abs=0.02)


def test_skip_existing_resumes(tiny_run, tiny_cache, tmp_path):
    out = tmp_path / "emb"
    embed_fn(tiny_run, tiny_cache, out, progress=False)
    first = sorted((out / "tiles").iterdir())[0]
    first.write_bytes(first.read_bytes())  # same content, new mtime
    stamp = first.stat().st_mtime_ns
    embed_fn(tiny_run, tiny_cache, out, skip_existing=True, progress=False)
    assert first.stat().st_mtime_ns == stamp


def test_random_weights_embedding_differs(tiny_run, tiny_cache):
    trained = embed_fn(tiny_run, tiny_cache, progress=False)
    random = embed_fn(tiny_run, tiny_cache, weights="init", progress=False)
    assert random.kind == "random" and not np.allclose(trained.pooled(), random.pooled())


def test_errors(tiny_run, tmp_path):
    with pytest.raises(Tile2AudioError, match="not found"):
        embed_fn(tiny_run, [tmp_path / "missing.wav"], progress=False)
    with pytest.raises(Tile2AudioError, match="not a tile2audio run"):
        embed_fn(tmp_path, [tmp_path / "x.wav"], progress=False)
    with pytest.raises(Tile2AudioError, match="not a complete embedding directory"):
        load_embeddings(tmp_path)


def test_pooling_and_file_names():
    e = np.array([[0.0, 2.0], [2.0, 4.0]], np.float32)
    p = pool_tiles(e)
    assert p["mean"].tolist() == [1.0, 3.0] and p["meanstd"].tolist() == [1.0, 3.0, 1.0, 1.0]
    assert p["max"].tolist() == [2.0, 4.0]
    assert safe_file_name("rock/track 1") != safe_file_name("rock_track 1")
    assert "/" not in safe_file_name("a/b") and safe_file_name("plain-id") == "plain-id"


def test_tile2audio_embed_is_the_module_and_embed_audio_the_function():
    import types

    import tile2audio.embed as module

    assert isinstance(tile2audio.embed, types.ModuleType) and tile2audio.embed is module
    assert not callable(tile2audio.embed) and callable(tile2audio.embed_audio)


def test_label_free_result_is_false_for_supervised_kind():
    from tile2audio.embed import from_clip_matrix

    clips = pd.DataFrame({"clip_id": ["a", "b"], "label": ["x", "y"]})
    m = np.zeros((2, 3), np.float32)
    assert from_clip_matrix(clips, m, "t", kind="trained").label_free_result
    assert not from_clip_matrix(clips, m, "s", kind="supervised").label_free_result
    assert not from_clip_matrix(clips, m, "l", kind="trained", label_free=False).label_free_result


@pytest.mark.parametrize("layer, dim", [("auto", 12), ("pooled", 8), ("output", 8)])
def test_head_runs_embed_at_the_recorded_layer_for_trained_and_random(tiny_cache, tmp_path, layer, dim):
    import yaml

    from tile2audio.runs import read_run

    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2", "model.head_units=12",
                                            f"model.embed_layer={layer}"])
    run = train(tiny_cache, tmp_path / "run", cfg, exact=True, progress=False)
    resolved = "hidden" if layer == "auto" else layer
    assert read_run(run)["embed_layer"] == resolved
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["embed_layer"] == resolved
    for weights in ("trained", "init"):
        emb = embed_fn(run, tiny_cache, weights=weights, progress=False)
        assert emb.pooled("mean").shape[1] == dim


def test_embed_many_batches_across_clips_like_cut_tiles():
    """Tiles of several clips share forward passes; each clip gets exactly cut_tiles' tiles, in order."""
    from tile2audio.embed import embed_many
    from tile2audio.tiles import TileGeometry, cut_tiles

    class Recorder:
        """A stand-in encoder: each tile's embedding is its mean and its first value; records batch sizes."""

        def __init__(self):
            self.sizes = []

        def __call__(self, x, training=False):
            import tensorflow as tf

            # embed_many runs the encoder inside a tf.function: record each call's size at run time.
            logged = tf.py_function(lambda n: self.sizes.append(int(n)) or 0, [tf.shape(x)[0]], tf.int32)
            with tf.control_dependencies([logged]):
                return tf.stack([tf.reduce_mean(x, axis=[1, 2, 3]), x[:, 0, 0, 0]], axis=1)

    geometry = TileGeometry(tile_frames=8, hop_frames=3, neighbourhood_frames=0, min_gap_frames=0, frames_per_second=10)
    rng = np.random.default_rng(0)
    clips = [("a", rng.standard_normal((5, 4))), ("b", rng.standard_normal((40, 4))), ("c", rng.standard_normal((9, 4))),
             ("d", rng.standard_normal((300, 4)))]
    encoder = Recorder()
    got = list(embed_many(encoder, clips, geometry, batch_size=16))
    assert [g[0] for g in got] == ["a", "b", "c", "d"]
    for (key, frames), (_, e, ts) in zip(clips, got):
        tiles, ref_ts = cut_tiles(frames, geometry)
        np.testing.assert_allclose(e, np.stack([tiles.mean(axis=(1, 2)), tiles[:, 0, 0]], axis=1), atol=1e-6)
        np.testing.assert_array_equal(ts, ref_ts)
    total = sum(len(e) for _, e, _ in got)
    # Every pass is full: the last one is padded (and its padding dropped).
    assert encoder.sizes == [16] * (-(-total // 16))

