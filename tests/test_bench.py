"""The speed benchmark runs on a tiny folder of audio and reports every figure it promises."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from tile2audio.bench import forward_flops, run_bench
from tile2audio.config import ExperimentConfig, FeatureParams, ModelConfig, SamplerConfig, TileConfig, TrainConfig
from tile2audio.errors import Tile2AudioError
from tile2audio.models import build_encoder
from tile2audio.train import resolve_precision

SR = 8000
TINY = ExperimentConfig(
    features=FeatureParams(sample_rate=SR, n_fft=256, hop_length=128, n_mels=16),
    tiles=TileConfig(tile_seconds=0.5, tile_hop_seconds=0.25, neighbourhood_seconds=1.0),
    model=ModelConfig(widths=(4, 8), embedding_dim=8, resnet_width=4, rnn_units=8),
    train=TrainConfig(batch_size=8),
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two labels x three 1.5 s clips (tones, a chirp, noise, a stereo file)."""
    root = tmp_path_factory.mktemp("bench_audio")
    rng = np.random.default_rng(0)
    t = np.arange(int(1.5 * SR)) / SR
    clips = {
        "tones/a.wav": 0.3 * np.sin(2 * np.pi * 440 * t),
        "tones/b.wav": 0.3 * np.sin(2 * np.pi * (300 * t + 400 * t**2)),
        "tones/c.wav": np.stack([0.2 * np.sin(2 * np.pi * 660 * t)] * 2, axis=1),
        "noise/a.wav": 0.1 * rng.standard_normal(t.size),
        "noise/b.wav": 0.05 * rng.standard_normal(t.size),
        "noise/c.wav": 0.2 * rng.standard_normal(t.size) * np.sin(2 * np.pi * 2 * t),
    }
    for rel, y in clips.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / rel), y.astype(np.float32), SR)
    return root


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def test_features_and_sampler(folder, tmp_path):
    out = tmp_path / "bench.json"
    result = run_bench("features", data=folder, seconds=0.2, json_path=out, settings=TINY)
    f = result["features"]
    for key in ("clips_per_s", "realtime_factor", "peak_rss_mb"):
        assert _positive(f[key]), key
    for part in ("per_process", "all_cores"):
        assert _positive(f[part]["clips_per_s"]) and _positive(f[part]["realtime_factor"])
        assert 1 <= f[part]["clips"] <= 6
    assert f["per_process"]["jobs"] == 1
    assert json.loads(out.read_text())["features"]["clips_per_s"] == f["clips_per_s"]
    assert "sampler" not in result and "train" not in result

    # The sampler with BYOL-A views and silence-aware tiles, against the trainer's step.
    views = replace(TINY, sampler=SamplerConfig(views="byola", skip_silence=True))
    result = run_bench("sampler", data=folder, seconds=0.2, settings=views)
    s = result["sampler"]
    for key in ("triplets_per_s", "reference_triplets_per_s", "ratio", "peak_rss_mb", "train_step_triplets_per_s",
                "train_step_ms", "train_ratio"):
        assert _positive(s[key]), key
    assert s["ratio"] == pytest.approx(s["triplets_per_s"] / s["reference_triplets_per_s"])
    assert s["train_ratio"] == pytest.approx(s["triplets_per_s"] / s["train_step_triplets_per_s"])
    assert s["train_encoder"] == "cnn" and result["settings"]["sampler"]["views"] == "byola"


def test_train_one_encoder(folder):
    result = run_bench("train", data=folder, seconds=0.2, settings=TINY, encoders=["cnn"], baseline=True,
                       matmul_size=64)
    tr = result["train"]
    assert tr["device"] == "cpu" or tr["device"].startswith("/physical_device:GPU")
    cnn = tr["cnn"]
    for key in ("triplets_per_s", "model_only_triplets_per_s", "ms_per_step", "model_only_ms_per_step",
                "peak_rss_mb"):
        assert _positive(cnn[key]), key
    assert cnn["batch_size"] == 8 and cnn["steps_timed"] >= 2
    assert cnn["triplets_per_s"] == pytest.approx(8000.0 / cnn["ms_per_step"])
    assert "crnn" not in tr and _positive(tr["peak_rss_mb"])
    # Work and hardware use: the figures must agree with each other and with the model.
    assert cnn["precision"] == resolve_precision("auto")
    peaks = cnn["matmul_peaks"]
    assert peaks["size"] == 64
    assert _positive(peaks["float32_gflop_per_s"]) and _positive(peaks["bfloat16_gflop_per_s"])
    expected = 9 * forward_flops(build_encoder(TINY.model, tuple(cnn["tile_shape"]))) / 1e9
    for figures in (cnn, cnn["baseline"]):
        for key in ("triplets_per_s", "model_only_triplets_per_s", "ms_per_step", "gflop_per_s"):
            assert _positive(figures[key]), key
        assert figures["gflop_per_triplet"] == pytest.approx(expected)
        assert figures["gflop_per_s"] == pytest.approx(figures["gflop_per_triplet"] * figures["model_only_triplets_per_s"])
        assert figures["pct_of_fp32_peak"] == pytest.approx(100 * figures["gflop_per_s"] / peaks["float32_gflop_per_s"])
        assert figures["pct_of_bf16_peak"] == pytest.approx(100 * figures["gflop_per_s"] / peaks["bfloat16_gflop_per_s"])
        assert figures["model_only_triplets_per_s"] == pytest.approx(8000.0 / figures["model_only_ms_per_step"])
    assert cnn["speedup"] == pytest.approx(cnn["triplets_per_s"] / cnn["baseline"]["triplets_per_s"])
    assert cnn["model_only_speedup"] == pytest.approx(
        cnn["model_only_triplets_per_s"] / cnn["baseline"]["model_only_triplets_per_s"])
    assert _positive(cnn["embed_tiles_per_s"]) and _positive(cnn["embed_float32_tiles_per_s"])
    mem = tr["memory_bounded"]
    assert mem["rotating"] is True
    assert mem["budget_mb"] == pytest.approx(mem["cache_float32_mb"] / 4)
    for key in ("peak_rss_mb", "unbounded_peak_rss_mb", "cache_float32_mb"):
        assert _positive(mem[key]), key


@pytest.mark.parametrize("kwargs, match", [
    ({"what": "everything"}, "what must be one of"),
    ({"what": "train", "encoders": ["transformer"]}, "encoders must be"),
    ({"what": "features", "seconds": 0}, "seconds must be > 0"),
    ({"what": "train", "matmul_size": 0}, "matmul_size must be a positive integer"),
])
def test_bad_arguments(kwargs, match, folder):
    with pytest.raises(Tile2AudioError, match=match):
        run_bench(data=folder, **kwargs)


def test_forward_flops_counts_conv_dense_and_gru_layer_by_layer():
    import keras

    x = keras.Input((10, 6, 1))
    y = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(x)  # 10*6 positions x 3*3*1*4
    y = keras.layers.MaxPooling2D((1, 6))(y)
    y = keras.layers.Reshape((10, 4))(y)
    y = keras.layers.Bidirectional(keras.layers.GRU(5))(y)  # 2 directions x 10 steps x (4*15 + 5*15)
    y = keras.layers.Dense(3)(y)  # 10*3
    model = keras.Model(x, y)
    assert forward_flops(model) == 2 * (10 * 6 * 9 * 4 + 2 * 10 * (4 * 15 + 5 * 15) + 10 * 3)
    outer = keras.Sequential([keras.Input((10, 6, 1)), model])
    assert forward_flops(outer) == forward_flops(model)


def test_missing_data_folder_is_a_clear_error(tmp_path):
    with pytest.raises(Tile2AudioError):
        run_bench("features", data=tmp_path / "nowhere", seconds=0.1, settings=TINY)


def test_embed_stage_reports_embedding_and_training_tile_rates(folder):
    result = run_bench("embed", data=folder, seconds=0.2, settings=TINY, encoders=["cnn"])
    e = result["embed"]["cnn"]
    for key in ("train_tiles_per_s", "train_pipeline_tiles_per_s", "embed_tiles_per_s", "embed_cache_tiles_per_s",
                "saved_model_tiles_per_s", "saved_model_run_precision_tiles_per_s", "peak_rss_mb"):
        assert _positive(e[key]), key
    assert e["clips"] == 6 and e["tiles"] >= 6  # every clip gives at least one tile
    assert e["embed_vs_train"] == pytest.approx(e["embed_tiles_per_s"] / e["train_tiles_per_s"])
    assert e["saved_model_vs_train"] == pytest.approx(e["saved_model_tiles_per_s"] / e["train_tiles_per_s"])
    assert "train" not in result
