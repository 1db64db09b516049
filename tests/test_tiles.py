"""Tests of the segmenter (tile2audio.tiles): starts, timestamps, tiles, geometry."""

from __future__ import annotations

import numpy as np
import pytest

from tile2audio import Tile2AudioError
from tile2audio.config import TileConfig
from tile2audio.tiles import TileGeometry, cut_tiles, tile_starts, tile_timestamps


def _frames(n: int, n_mels: int = 3) -> np.ndarray:
    """Frames whose value encodes (frame, band) so tiles can be traced back."""
    return (np.arange(n)[:, None] * 10 + np.arange(n_mels)[None, :]).astype(np.float32)


@pytest.mark.parametrize(
    "n_frames, tile, hop, expected",
    [
        (10, 4, 3, [0, 3, 6]),  # exact fit: the last hop ends on the last frame
        (11, 4, 3, [0, 3, 6, 7]),  # tail tile aligned to the end
        (4, 4, 2, [0]),  # exactly one tile
        (3, 4, 2, [0]),  # shorter than a tile
        (1, 4, 2, [0]),
        (20, 4, 7, [0, 7, 14, 16]),  # hop larger than the tile: gaps, tail still covered
        (8, 4, 9, [0, 4]),  # hop larger than the clip
        (9, 3, 3, [0, 3, 6]),
    ],
)
def test_tile_starts_edge_cases(n_frames, tile, hop, expected):
    starts = tile_starts(n_frames, tile, hop)
    assert starts.dtype == np.int64
    np.testing.assert_array_equal(starts, expected)
    assert starts[-1] + tile >= n_frames or n_frames < tile  # the tail is covered


def test_tile_starts_rejects_bad_input():
    with pytest.raises(Tile2AudioError):
        tile_starts(0, 4, 2)
    with pytest.raises(Tile2AudioError):
        tile_starts(10, 0, 2)
    with pytest.raises(Tile2AudioError):
        tile_starts(10, 4, 0)


def test_tile_timestamps_clip_end_to_real_duration():
    ts = tile_timestamps(np.array([0, 3, 6, 7]), 11, 4, frames_per_second=2.0)
    assert ts.dtype == np.float64 and ts.shape == (4, 2)
    np.testing.assert_allclose(ts, [[0, 2], [1.5, 3.5], [3, 5], [3.5, 5.5]])
    short = tile_timestamps(tile_starts(3, 4, 2), 3, 4, frames_per_second=2.0)
    np.testing.assert_allclose(short, [[0.0, 1.5]])  # a looped clip ends at its real end
    with pytest.raises(Tile2AudioError):
        tile_timestamps(np.array([0]), 3, 4, frames_per_second=0)


def test_cut_tiles_content_and_timestamps():
    geometry = TileGeometry(tile_frames=4, hop_frames=3, neighbourhood_frames=4, min_gap_frames=0,
                            frames_per_second=2.0)
    frames = _frames(11)
    tiles, ts = cut_tiles(frames, geometry)
    assert tiles.shape == (4, 4, 3) and tiles.dtype == np.float32
    for tile, start in zip(tiles, [0, 3, 6, 7]):
        np.testing.assert_array_equal(tile, frames[start:start + 4])
    np.testing.assert_allclose(ts[-1], [3.5, 5.5])
    tiles[0, 0, 0] = -1.0  # a copy, not a view of the caller's frames
    assert frames[0, 0] == 0.0


def test_cut_tiles_loops_a_short_clip():
    geometry = TileGeometry(tile_frames=5, hop_frames=2, neighbourhood_frames=0, min_gap_frames=0,
                            frames_per_second=4.0)
    frames = _frames(2)
    tiles, ts = cut_tiles(frames, geometry)
    assert tiles.shape == (1, 5, 3)
    np.testing.assert_array_equal(tiles[0], frames[[0, 1, 0, 1, 0]])
    np.testing.assert_allclose(ts, [[0.0, 0.5]])


def test_cut_tiles_rejects_bad_shapes():
    geometry = TileGeometry(4, 2, 0, 0, 10.0)
    with pytest.raises(Tile2AudioError):
        cut_tiles(np.zeros(10, np.float32), geometry)
    with pytest.raises(Tile2AudioError):
        cut_tiles(np.zeros((0, 3), np.float32), geometry)


def test_geometry_from_config_rounds_seconds_to_frames():
    fps = 22050 / 512
    g = TileGeometry.from_config(
        TileConfig(tile_seconds=1.5, tile_hop_seconds=0.75, neighbourhood_seconds=3.0, min_gap_seconds=0.5), fps)
    assert (g.tile_frames, g.hop_frames, g.neighbourhood_frames, g.min_gap_frames) == (65, 32, 129, 22)
    assert g.tile_seconds == pytest.approx(65 / fps)
    tiny = TileGeometry.from_config(TileConfig(tile_seconds=0.001, tile_hop_seconds=0.001,
                                               neighbourhood_seconds=0.0, min_gap_seconds=0.0), fps)
    assert tiny.tile_frames == 1 and tiny.hop_frames == 1 and tiny.neighbourhood_frames == 0


def test_geometry_validates():
    with pytest.raises(Tile2AudioError):
        TileGeometry(tile_frames=4, hop_frames=2, neighbourhood_frames=2, min_gap_frames=3, frames_per_second=10)
    with pytest.raises(Tile2AudioError):
        TileGeometry(tile_frames=0, hop_frames=2, neighbourhood_frames=2, min_gap_frames=0, frames_per_second=10)
    with pytest.raises(Tile2AudioError):
        TileGeometry.from_config(TileConfig(1.5, 0.75, 3.0, 0.0), 0.0)
