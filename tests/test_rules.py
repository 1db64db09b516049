"""The automatic training rule: tile geometry and positive policy from the clips, never from a name."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tile2audio.config import load_training
from tile2audio.errors import Tile2AudioError
from tile2audio.rules import SOURCE_GROUP_SHARE, choose_training, group_share

FPS = 22050 / 512


def _index(durations, groups=None) -> pd.DataFrame:
    d = np.asarray(durations, dtype=float)
    return pd.DataFrame({"clip_id": [f"c{i}" for i in range(len(d))], "n_frames": np.ceil(d * FPS).astype(int),
                         "duration_s": d, "group": groups if groups is not None else [""] * len(d)})


@pytest.mark.parametrize("seconds, tile, positive, short", [
    (30.0, 1.5, "neighbour", False),   # music excerpts
    (10.0, 1.5, "neighbour", True),    # 10 s crops: 6.7 tiles per clip
    (4.0, 1.333, "neighbour", True),   # urban-sound slices: three tiles per clip
    (2.5, 0.833, "neighbour", True),
    (0.5, 0.5, "view", True),          # spoken words: the tile is the clip, views as positives
    (0.3, 0.3, "view", True),
])
def test_tiles_and_positives_follow_the_median_clip(seconds, tile, positive, short):
    rng = np.random.default_rng(0)
    # 25 shorter and 25 longer clips around the median one.
    durations = seconds * np.concatenate([rng.uniform(0.8, 1.0, 25), [1.0], rng.uniform(1.0, 1.2, 25)])
    cfg, facts = choose_training(load_training(), _index(rng.permutation(durations)), FPS)
    t = cfg.tiles
    assert t.tile_seconds == pytest.approx(tile, abs=1e-3)
    assert (t.tile_hop_seconds, t.neighbourhood_seconds, t.min_gap_seconds) == pytest.approx(
        (tile / 2, 2 * tile, tile / 2), abs=1e-3)
    assert cfg.sampler.positive == positive
    assert cfg.sampler.augment is short and cfg.loss.symmetric is short
    assert facts["median_seconds"] == pytest.approx(seconds)
    assert facts["settings"]["tiles.tile_seconds"] == t.tile_seconds


def test_explicit_settings_always_win():
    cfg = load_training(None, ["tiles.tile_seconds=1.0", "sampler.positive=view", "sampler.augment=false",
                               "loss.symmetric=false", "sampler.exclude_group_opposites=true"])
    out, facts = choose_training(cfg, _index([30.0] * 5), FPS)
    assert out.tiles.tile_seconds == 1.0 and out.tiles.tile_hop_seconds == 0.5
    assert out.sampler.positive == "view" and out.sampler.augment is False and out.loss.symmetric is False
    assert out.sampler.exclude_group_opposites is True
    assert "tiles.tile_seconds" not in facts["settings"] and "tiles.tile_hop_seconds" in facts["settings"]


def test_group_share_separates_source_recordings_from_speakers():
    # 300 recordings of 1-6 slices each: small groups, excluded as opposites.
    rng = np.random.default_rng(1)
    sources = [f"rec{i}" for i in range(300) for _ in range(rng.integers(1, 7))]
    share = group_share(sources)
    assert share < SOURCE_GROUP_SHARE
    assert choose_training(load_training(), _index([4.0] * len(sources), sources), FPS)[0] \
        .sampler.exclude_group_opposites is True
    # 6 speakers of 50 clips: every opposite would be another speaker, so they are not excluded.
    speakers = [f"spk{i % 6}" for i in range(300)]
    assert group_share(speakers) == pytest.approx(1 / 6)
    assert choose_training(load_training(), _index([0.5] * 300, speakers), FPS)[0] \
        .sampler.exclude_group_opposites is False
    # Without groups every clip is its own group.
    assert group_share([""] * 4) == pytest.approx(0.25)


def test_auto_values_are_validated_and_resolved_before_use():
    with pytest.raises(Tile2AudioError, match="tiles.tile_seconds"):
        load_training(None, ["tiles.tile_seconds=often"])
    with pytest.raises(Tile2AudioError, match="sampler.positive"):
        load_training(None, ["sampler.positive=mirror"])
    with pytest.raises(Tile2AudioError, match="no clips"):
        choose_training(load_training(), _index([]), FPS)
