"""Run directories: open_run, the recorded tile geometry and its check against the encoder."""

import json
import shutil

import pytest

from conftest import TINY_TRAIN
from tile2audio.config import dump_yaml, load_training
from tile2audio.errors import Tile2AudioError
from tile2audio.runs import is_run_dir, latest_run, load_run_config, open_run, read_run
from tile2audio.tiles import TileGeometry
from tile2audio.train import train


@pytest.fixture(scope="module")
def tiny_run(tiny_cache, tmp_path_factory):
    cfg = load_training(None, TINY_TRAIN + ["train.epochs=1", "train.steps_per_epoch=2"])
    return train(tiny_cache, tmp_path_factory.mktemp("run") / "run", cfg, exact=True, progress=False)


def test_open_run_reads_config_features_and_the_recorded_geometry(tiny_run):
    run = open_run(tiny_run)
    assert is_run_dir(tiny_run) and latest_run(tiny_run.parent) == tiny_run
    assert run.config == load_run_config(tiny_run)
    assert run.features.frames_per_second == run.feature_file["params"]["sample_rate"] / run.feature_file["params"]["hop_length"]
    assert set(run.stats) <= {"mean", "std"}
    recorded = read_run(tiny_run)["geometry"]
    assert recorded["tile_frames"] == run.geometry.tile_frames
    assert recorded["tile_seconds"] == pytest.approx(run.geometry.tile_seconds)
    assert run.geometry == TileGeometry.from_config(run.config.tiles, run.features.frames_per_second)
    assert run.info["status"] == "complete"
    for weights in ("trained", "init"):
        assert run.encoder(weights).input_shape[1] == run.geometry.tile_frames


def _edited_copy(tiny_run, tmp_path, tile_seconds):
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    cfg = load_run_config(copy)
    cfg = cfg.__class__(**{**cfg.__dict__, "tiles": cfg.tiles.__class__(**{**cfg.tiles.__dict__,
                                                                           "tile_seconds": tile_seconds})})
    (copy / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    return copy


def test_an_edited_config_disagrees_with_run_json(tiny_run, tmp_path):
    run = open_run(tiny_run)
    copy = _edited_copy(tiny_run, tmp_path, 2 * run.config.tiles.tile_seconds)
    with pytest.raises(Tile2AudioError, match="run.json: tiles of"):
        open_run(copy)


def test_the_encoder_input_is_checked_when_run_json_has_no_geometry(tiny_run, tmp_path):
    run = open_run(tiny_run)
    copy = _edited_copy(tiny_run, tmp_path, 2 * run.config.tiles.tile_seconds)
    info = json.loads((copy / "run.json").read_text(encoding="utf-8"))
    del info["geometry"]  # a run trained before the geometry was recorded
    (copy / "run.json").write_text(json.dumps(info), encoding="utf-8")
    with pytest.raises(Tile2AudioError, match="encoder takes tiles of"):
        open_run(copy).encoder()


def test_not_a_run(tmp_path):
    with pytest.raises(Tile2AudioError, match="not a tile2audio run"):
        read_run(tmp_path)
    with pytest.raises(Tile2AudioError, match="no features.json"):
        open_run_dir = tmp_path / "r"
        open_run_dir.mkdir()
        (open_run_dir / "config.yaml").write_text("{}\n", encoding="utf-8")
        open_run(open_run_dir)
