"""Tests of the tf.data triplet sampler (tile2audio.sampler), on tiny caches."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

tf = pytest.importorskip("tensorflow")

from tile2audio import Tile2AudioError  # noqa: E402
from tile2audio.config import FeatureParams, SamplerConfig, TileConfig  # noqa: E402
from tile2audio.bench import measure_sampler  # noqa: E402
from tile2audio.sampler import TripletSampler  # noqa: E402

FPS = 40.0  # 16 kHz / hop 400
def _sampler(**kw) -> "SamplerConfig":
    """Explicit neighbour positives, no augmentation, group exclusion (the auto rule is tested apart)."""
    return SamplerConfig(**{"positive": "neighbour", "augment": False, "exclude_group_opposites": True,
                            "views": "plain", **kw})


TILES = TileConfig(tile_seconds=1.0, tile_hop_seconds=0.5, neighbourhood_seconds=1.0, min_gap_seconds=0.25)
T, HOOD, GAP = 40, 40, 10  # the frame counts of TILES at FPS


class FakeCache:
    """The documented FeatureCache members the sampler uses, over in-memory frames.

    Band 0 of every frame holds the clip's row number and band 1 the frame number, so a
    tile can be traced back to its clip and start.
    """

    def __init__(self, lengths, shards=None, labels=None, groups=None, n_mels=4, normalize="standardize"):
        self.params = FeatureParams(sample_rate=16000, hop_length=400, n_mels=n_mels, normalize=normalize)
        self.n_mels = n_mels
        self.frames_per_second = self.params.frames_per_second
        n = len(lengths)
        shards = list(shards or ["s0"] * n)
        self.shards = list(dict.fromkeys(shards))
        rng = np.random.default_rng(0)
        self._data = {}
        for i, length in enumerate(lengths):
            x = rng.standard_normal((length, n_mels)).astype(np.float32)
            x[:, 0], x[:, 1] = i, np.arange(length)
            self._data[f"c{i}"] = x
        self.index = pd.DataFrame({
            "clip_id": [f"c{i}" for i in range(n)], "shard": shards, "n_frames": list(lengths),
            "min": -4.0, "max": 4.0, "label": list(labels or [""] * n), "group": list(groups or [""] * n),
        })
        self.stats = {"mean": np.zeros(n_mels, np.float32), "std": np.full(n_mels, 2.0, np.float32)}
        self.block_calls: list[list[str]] = []

    def shard_nbytes(self, name):
        return int(self.index.loc[self.index["shard"] == name, "n_frames"].sum()) * self.n_mels * 4

    def frames_block(self, clip_ids):
        self.block_calls.append(list(clip_ids))
        arrays = [self._data[c] for c in clip_ids]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        return np.concatenate(arrays), offsets, lengths


def _batches(sampler: TripletSampler, n: int, start_step: int = 0, with_indices: bool = True) -> list[dict]:
    """The first ``n`` batches as numpy dicts."""
    ds = sampler.dataset(start_step=start_step, with_indices=with_indices)
    return [{k: v.numpy() for k, v in b.items()} for b in ds.take(n)]


def _cat(batches: list[dict], key: str) -> np.ndarray:
    return np.concatenate([b[key] for b in batches])


def _check_tiles_trace_back(batch: dict, cache: FakeCache) -> None:
    """Each tile holds frames start..start+T-1 (looped for short clips) of its clip."""
    lengths = cache.index["n_frames"].to_numpy()
    for tile_key, clip_key, start_key in (("anchor", "anchor_clip", "anchor_start"),
                                          ("neighbour", "neighbour_clip", "neighbour_start"),
                                          ("opposite", "opposite_clip", "opposite_start")):
        tiles = batch[tile_key][..., 0]
        clips, starts = batch[clip_key], batch[start_key]
        np.testing.assert_array_equal(tiles[:, :, 0], np.repeat(clips[:, None], T, axis=1))
        expected = (starts[:, None] + np.arange(T)[None, :]) % lengths[clips][:, None]
        np.testing.assert_array_equal(tiles[:, :, 1], expected)


@pytest.fixture(scope="module")
def mixed_cache():
    # 7 clips over 3 shards; clips 0-1 share group "a", 2-3 group "b"; clip 5 is shorter than a tile.
    return FakeCache([200, 150, 120, 90, 300, 25, 60], shards=["s0", "s0", "s1", "s1", "s2", "s2", "s2"],
                     labels=["x", "x", "y", "y", "z", "x", "y"], groups=["a", "a", "b", "b", "", "", ""])


def test_batch_shapes_dtypes_and_tile_shape(mixed_cache):
    sampler = TripletSampler(mixed_cache, TILES, _sampler(), batch_size=8, seed=0)
    assert sampler.tile_shape == (T, 4, 1) and not sampler.rotating
    ds = sampler.dataset()
    spec = ds.element_spec
    assert set(spec) == {"anchor", "neighbour", "opposite", "anchor_clip", "opposite_clip",
                         "anchor_group", "opposite_group"}
    (batch,) = list(ds.take(1))
    for key in ("anchor", "neighbour", "opposite"):
        assert batch[key].shape == (8, T, 4, 1) and batch[key].dtype == tf.float32
    for key in ("anchor_clip", "opposite_clip", "anchor_group", "opposite_group"):
        assert batch[key].shape == (8,) and batch[key].dtype == tf.int32


def test_tile2vec_neighbourhood_gap_and_opposites(mixed_cache):
    sampler = TripletSampler(mixed_cache, TILES, _sampler(), batch_size=64, seed=3)
    batches = _batches(sampler, 4)
    for b in batches:
        _check_tiles_trace_back(b, mixed_cache)
    a_clip, n_clip = _cat(batches, "anchor_clip"), _cat(batches, "neighbour_clip")
    o_clip = _cat(batches, "opposite_clip")
    a_s, n_s = _cat(batches, "anchor_start"), _cat(batches, "neighbour_start")
    np.testing.assert_array_equal(a_clip, n_clip)
    span = mixed_cache.index["n_frames"].to_numpy()[a_clip] - T
    dist = np.abs(a_s - n_s)
    assert (dist <= HOOD).all()
    roomy = span >= GAP  # where the clip allows the minimum gap, it is respected
    assert (dist[roomy] >= GAP).all() and roomy.sum() > 100
    assert (n_s >= 0).all() and (n_s <= np.maximum(span, 0)).all()
    assert (o_clip != a_clip).all()
    assert (_cat(batches, "opposite_group") != _cat(batches, "anchor_group")).all()
    group = mixed_cache.index["group"].to_numpy()
    same_named_group = (group[a_clip] == group[o_clip]) & (group[a_clip] != "")
    assert not same_named_group.any()
    assert len(np.unique(a_clip)) == 7  # every clip, the short one too, gets drawn
    # Group codes: named groups share one code, clips without group have their own.
    codes = dict(zip(a_clip, _cat(batches, "anchor_group")))
    assert codes[0] == codes[1] and codes[2] == codes[3] and len({codes[4], codes[5], codes[6], codes[0]}) == 4


def test_same_seed_same_batches_other_seed_differs(mixed_cache):
    first = _batches(TripletSampler(mixed_cache, TILES, _sampler(), 16, seed=5), 2)
    again = _batches(TripletSampler(mixed_cache, TILES, _sampler(), 16, seed=5), 2)
    other = _batches(TripletSampler(mixed_cache, TILES, _sampler(), 16, seed=6), 2)
    for x, y in zip(first, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert not np.array_equal(first[0]["anchor_start"], other[0]["anchor_start"])
    assert not np.array_equal(first[0]["anchor_start"], first[1]["anchor_start"])  # steps differ


def test_supervised_labels(mixed_cache):
    sampler = TripletSampler(mixed_cache, TILES, _sampler(mode="supervised"), 64, seed=1)
    batches = _batches(sampler, 2)
    _check_tiles_trace_back(batches[0], mixed_cache)
    labels = mixed_cache.index["label"].to_numpy()
    a, n, o = _cat(batches, "anchor_clip"), _cat(batches, "neighbour_clip"), _cat(batches, "opposite_clip")
    assert (labels[a] == labels[n]).all()
    alone = labels[a] == "z"  # the only clip of its label: the neighbour comes from the clip itself
    assert alone.any() and (a[alone] == n[alone]).all()
    assert (a[~alone] != n[~alone]).all()
    assert (labels[a] != labels[o]).all()


def test_supervised_needs_labels():
    with pytest.raises(Tile2AudioError, match="needs labels"):
        TripletSampler(FakeCache([100, 100]), TILES, _sampler(mode="supervised"), 4, seed=0)
    with pytest.raises(Tile2AudioError, match="two distinct labels"):
        TripletSampler(FakeCache([100, 100], labels=["x", "x"]), TILES, _sampler(mode="supervised"), 4, seed=0)


def test_distant_mode_uses_far_tiles_of_long_clips():
    # clips 0-1 are long enough for a far tile (span 360 > 2 x neighbourhood), clips 2-3 are not.
    cache = FakeCache([400, 400, 60, 60], groups=["", "", "", ""])
    config = _sampler(mode="tile2vec-distant", distant_prob=1.0)
    sampler = TripletSampler(cache, TILES, config, 64, seed=2)
    assert sampler.distant_frames == 2 * HOOD
    batches = _batches(sampler, 2)
    _check_tiles_trace_back(batches[0], cache)
    a, o = _cat(batches, "anchor_clip"), _cat(batches, "opposite_clip")
    a_s, o_s = _cat(batches, "anchor_start"), _cat(batches, "opposite_start")
    long_anchor = a < 2
    assert long_anchor.any() and (~long_anchor).any()
    assert (o[long_anchor] == a[long_anchor]).all()
    assert (np.abs(a_s - o_s)[long_anchor] >= 2 * HOOD).all()
    assert (o[~long_anchor] != a[~long_anchor]).all()
    half = TripletSampler(cache, TILES, _sampler(mode="tile2vec-distant", distant_prob=0.5), 256, seed=2)
    (b,) = _batches(half, 1)
    share = (b["opposite_clip"] == b["anchor_clip"])[b["anchor_clip"] < 2].mean()
    assert 0.3 < share < 0.7


def test_one_group_falls_back_to_other_clips(caplog):
    cache = FakeCache([100, 100, 100], groups=["g", "g", "g"])
    with caplog.at_level(logging.WARNING, logger="tile2audio.sampler"):
        sampler = TripletSampler(cache, TILES, _sampler(), 32, seed=0)
    assert "share one group" in caplog.text
    (b,) = _batches(sampler, 1)
    assert (b["opposite_clip"] != b["anchor_clip"]).all()


def test_bad_arguments():
    cache = FakeCache([100, 100])
    with pytest.raises(Tile2AudioError):
        TripletSampler(cache, TILES, _sampler(), batch_size=0, seed=0)
    with pytest.raises(Tile2AudioError):
        TripletSampler(cache, TILES, _sampler(), 4, seed=0, worker_index=2, num_workers=2)
    with pytest.raises(Tile2AudioError):
        TripletSampler(FakeCache([100]), TILES, _sampler(), 4, seed=0)
    with pytest.raises(Tile2AudioError):
        TripletSampler(cache, TILES, _sampler(), 4, seed=0).dataset(start_step=-1)


def _rotating_cache() -> FakeCache:
    """6 shards of 2 clips of 100 frames x 4 mels (3,200 bytes per shard as float32)."""
    return FakeCache([100] * 12, shards=[f"s{i // 2}" for i in range(12)])


def test_rotating_pool_visits_all_shards_within_budget():
    cache = _rotating_cache()
    budget = 2 * 3200 + 100  # two shards fit, three do not
    config = _sampler(memory_gb=budget / 2**30, rotate_steps=2)
    sampler = TripletSampler(cache, TILES, config, 8, seed=0)
    assert sampler.rotating and sampler.total_nbytes == 6 * 3200
    batches = _batches(sampler, 12)  # 6 pools = two rounds of 3 pools
    records = sampler.loaded_pools
    assert len(records) >= 6
    assert all(r.nbytes <= sampler.budget_nbytes for r in records)
    assert max(len(call) for call in cache.block_calls) <= 4  # never more than two shards at once
    assert {s for r in records[:3] for s in r.shards} == set(cache.shards)  # round 1 visits all
    assert {s for r in records[3:6] for s in r.shards} == set(cache.shards)  # and so does round 2
    assert [r.shards for r in records[:3]] != [r.shards for r in records[3:6]]  # new order per round
    shard_of = cache.index["shard"].to_numpy()
    for step, b in enumerate(batches):  # every triplet of a step comes from that step's pool
        pool = set(records[step // 2].shards)
        assert set(shard_of[b["anchor_clip"]]) <= pool and set(shard_of[b["opposite_clip"]]) <= pool
        _check_tiles_trace_back(b, cache)


def test_resume_equals_continuation_across_pools():
    cache = _rotating_cache()
    config = _sampler(memory_gb=(2 * 3200 + 100) / 2**30, rotate_steps=2)
    full = _batches(TripletSampler(cache, TILES, config, 8, seed=4), 7)
    resumed = _batches(TripletSampler(cache, TILES, config, 8, seed=4), 4, start_step=3)
    for x, y in zip(full[3:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    in_memory = _sampler()
    full = _batches(TripletSampler(cache, TILES, in_memory, 8, seed=4), 3)
    resumed = _batches(TripletSampler(cache, TILES, in_memory, 8, seed=4), 1, start_step=2)
    for key in full[2]:
        np.testing.assert_array_equal(full[2][key], resumed[0][key])


def test_single_oversized_shard_is_split_into_clip_runs():
    cache = FakeCache([100] * 6, shards=["big"] * 6)
    config = _sampler(memory_gb=(2 * 1600 + 10) / 2**30, rotate_steps=1)
    sampler = TripletSampler(cache, TILES, config, 4, seed=0)
    _batches(sampler, 3, with_indices=False)
    assert all(r.nbytes <= sampler.budget_nbytes and r.n_clips == 2 for r in sampler.loaded_pools)
    loaded = {c for call in cache.block_calls for c in call}
    assert loaded == set(cache.index["clip_id"])


def test_two_workers_read_disjoint_shards():
    cache = FakeCache([100] * 8, shards=[f"s{i // 2}" for i in range(8)])
    workers = [TripletSampler(cache, TILES, _sampler(), 16, seed=0, worker_index=w, num_workers=2)
               for w in range(2)]
    shards = [set(w.worker_shards) for w in workers]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(cache.shards)
    shard_of = cache.index["shard"].to_numpy()
    for w, sampler in enumerate(workers):
        (b,) = _batches(sampler, 1, with_indices=False)
        assert set(shard_of[b["anchor_clip"]]) <= shards[w] and set(shard_of[b["opposite_clip"]]) <= shards[w]
        loaded = {c for call in cache.block_calls[-1:] for c in call}
        assert set(shard_of[cache.index["clip_id"].isin(loaded).to_numpy()]) == shards[w]


def test_fewer_shards_than_workers_split_clips():
    cache = FakeCache([100] * 6, shards=["s0"] * 6)
    clips = []
    for w in range(2):
        sampler = TripletSampler(cache, TILES, _sampler(), 32, seed=0, worker_index=w, num_workers=2)
        (b,) = _batches(sampler, 1, with_indices=False)
        clips.append(set(b["anchor_clip"]) | set(b["opposite_clip"]))
    assert clips[0].isdisjoint(clips[1])
    assert clips[0] <= {0, 2, 4} and clips[1] <= {1, 3, 5}


@pytest.mark.parametrize("normalize", ["standardize", "minmax"])
def test_augmentation_changes_values_keeps_shapes_and_is_deterministic(normalize):
    cache = FakeCache([200, 150, 120], n_mels=16, normalize=normalize)
    plain = _batches(TripletSampler(cache, TILES, _sampler(), 16, seed=7), 1)[0]
    config = _sampler(augment=True, gain_db=6.0, time_masks=2, freq_masks=1, mix_prob=0.5)
    aug = _batches(TripletSampler(cache, TILES, config, 16, seed=7), 1)[0]
    again = _batches(TripletSampler(cache, TILES, config, 16, seed=7), 1)[0]
    for key in plain:
        assert aug[key].shape == plain[key].shape and aug[key].dtype == plain[key].dtype
        np.testing.assert_array_equal(aug[key], again[key])
    for key in ("anchor_clip", "opposite_clip", "anchor_start", "neighbour_start", "opposite_start"):
        np.testing.assert_array_equal(aug[key], plain[key])  # augmentation never changes the draws
    for key in ("anchor", "neighbour", "opposite"):
        assert np.isfinite(aug[key]).all()
        assert not np.allclose(aug[key], plain[key])


def test_gain_only_is_an_additive_offset_in_db():
    cache = FakeCache([200, 150], n_mels=4)  # standardize with std 2: 1 dB is 0.5 normalised units
    plain = _batches(TripletSampler(cache, TILES, _sampler(), 32, seed=1), 1)[0]
    config = _sampler(augment=True, gain_db=6.0, time_masks=0, freq_masks=0, mix_prob=0.0)
    aug = _batches(TripletSampler(cache, TILES, config, 32, seed=1), 1)[0]
    diff = (aug["anchor"] - plain["anchor"])[..., 0]
    per_tile = diff[:, 0, 0]
    np.testing.assert_allclose(diff, np.broadcast_to(per_tile[:, None, None], diff.shape), atol=1e-4)
    assert (np.abs(per_tile) <= 3.0 + 1e-4).all() and np.ptp(per_tile) > 0.5


def test_real_cache_from_synthetic_wavs(tmp_path, write_audio, tone_fn):
    features = pytest.importorskip("tile2audio.features")
    if not hasattr(features, "build_cache"):
        pytest.skip("tile2audio.features.build_cache is not there yet")
    sr = 16000
    audio = tmp_path / "audio"
    clips = {"a": tone_fn(2.0, sr, 440.0), "b": tone_fn(3.0, sr, 880.0, chirp_to=1760.0),
             "c": tone_fn(1.2, sr, 220.0, noise=0.05), "short": tone_fn(0.6, sr, 660.0)}
    rows = []
    for name, y in clips.items():
        write_audio(audio / f"{name}.wav", y, sr)
        rows.append({"clip_id": name, "path": f"{name}.wav", "root": str(audio), "label": "",
                     "split": "", "fold": pd.NA, "group": ""})
    params = FeatureParams(sample_rate=sr, hop_length=400, n_mels=16, min_seconds=0.5)
    cache = features.build_cache(pd.DataFrame(rows), tmp_path / "cache", params=params, jobs=1, progress=False)
    sampler = TripletSampler(cache, TILES, _sampler(), 8, seed=0)
    (b,) = _batches(sampler, 1)
    assert b["anchor"].shape == (8, T, 16, 1) and np.isfinite(b["anchor"]).all()
    assert (b["opposite_clip"] != b["anchor_clip"]).all()
    frames = cache.frames(cache.index["clip_id"].iloc[int(b["anchor_clip"][0])])
    start = int(b["anchor_start"][0])
    expected = np.resize(frames, (max(len(frames), T), 16))[start:start + T]  # np.resize loops rows
    np.testing.assert_allclose(b["anchor"][0, :, :, 0], expected, atol=0.02)  # float16 pool
    stats = measure_sampler(cache, TILES, _sampler(), 8, seconds=0.2,
                            reference_paths=[audio / "a.wav", audio / "b.wav"], reference_seconds=0.1)
    assert stats["triplets_per_s"] > 0 and stats["reference_triplets_per_s"] > 0
    assert stats["ratio"] == pytest.approx(stats["triplets_per_s"] / stats["reference_triplets_per_s"])
    assert stats["peak_rss_mb"] > 0


def test_mix_is_a_power_sum_in_db():
    cache = FakeCache([100, 100], n_mels=4)  # standardize, mean 0, std 2
    values = {"c0": 5.0, "c1": 3.0}  # normalised: raw dB 10 and 6
    for clip_id, v in values.items():
        cache._data[clip_id][:] = v
    config = _sampler(augment=True, gain_db=0.0, time_masks=0, freq_masks=0, mix_prob=1.0, mix_gain_db=-6.0)
    (b,) = _batches(TripletSampler(cache, TILES, config, 16, seed=0), 1)
    raw = {c: 2.0 * v for c, v in values.items()}
    for tile_key, clip_key in (("anchor", "anchor_clip"), ("opposite", "opposite_clip")):
        for tile, clip in zip(b[tile_key][..., 0], b[clip_key]):
            own, other = f"c{clip}", f"c{1 - clip}"  # with two clips the partner is the other one
            expected = 10 * np.log10(10 ** (raw[own] / 10) + 10 ** ((raw[other] - 6.0) / 10)) / 2.0
            np.testing.assert_allclose(tile, expected, rtol=2e-3)


# --------------------------------------------------------------------------- positives and groups


def test_view_positives_are_shifted_crops_of_the_anchor_clip_even_below_one_tile():
    # Clip 0 is shorter than one tile (looped to two tiles), clip 1 is 1.5 tiles long.
    cache = FakeCache([25, 60, 200, 200])
    sampler = TripletSampler(cache, TILES, _sampler(positive="view"), 64, seed=0)
    batches = _batches(sampler, 4)
    lengths = cache.index["n_frames"].to_numpy()
    for b in batches:
        np.testing.assert_array_equal(b["neighbour_clip"], b["anchor_clip"])
        for key, start in (("anchor", "anchor_start"), ("neighbour", "neighbour_start")):
            tiles, clips, starts = b[key][..., 0], b["anchor_clip"], b[start]
            expected = (starts[:, None] + np.arange(T)[None, :]) % lengths[clips][:, None]
            np.testing.assert_array_equal(tiles[:, :, 1], expected)
    short = _cat(batches, "anchor_clip") == 0
    a, n = _cat(batches, "anchor_start")[short], _cat(batches, "neighbour_start")[short]
    assert short.any() and (a != n).mean() > 0.5, "views of a sub-tile clip must be time-shifted"
    # Two views are independent: their starts are not bound to a neighbourhood.
    long = _cat(batches, "anchor_clip") >= 2
    gap = np.abs(_cat(batches, "anchor_start")[long] - _cat(batches, "neighbour_start")[long])
    assert gap.max() > HOOD


def test_group_exclusion_is_a_setting_of_its_own():
    groups = ["spk1"] * 4 + ["spk2"] * 4
    cache = FakeCache([100] * 8, groups=groups)
    on = _cat(_batches(TripletSampler(cache, TILES, _sampler(exclude_group_opposites=True), 64, seed=0), 3),
              "opposite_clip")
    anchors_on = _cat(_batches(TripletSampler(cache, TILES, _sampler(exclude_group_opposites=True), 64, seed=0), 3),
                      "anchor_clip")
    assert ((on < 4) != (anchors_on < 4)).all()
    off_batches = _batches(TripletSampler(cache, TILES, _sampler(exclude_group_opposites=False), 64, seed=0), 3)
    a, o = _cat(off_batches, "anchor_clip"), _cat(off_batches, "opposite_clip")
    assert (a != o).all() and ((a < 4) == (o < 4)).any(), "same-speaker opposites must be allowed"
    # The loss's in-batch negatives follow the same choice: every clip is its own group.
    np.testing.assert_array_equal(_cat(off_batches, "anchor_group"), a)


def test_same_group_opposites_come_at_the_set_rate_and_change_nothing_else():
    # Three speakers of 4 clips and two clips without a group (a group of one: no mate).
    groups = ["spk1"] * 4 + ["spk2"] * 4 + ["spk3"] * 4 + ["", ""]
    cache = FakeCache([100] * 14, groups=groups)
    spk = np.array([g or f"solo{i}" for i, g in enumerate(groups)])

    def draw(prob):
        cfg = _sampler(exclude_group_opposites=False, same_group_prob=prob)
        batches = _batches(TripletSampler(cache, TILES, cfg, 256, seed=0), 4)
        return {k: _cat(batches, k) for k in ("anchor_clip", "opposite_clip", "anchor_group", "anchor_start")}

    base, half, always = draw(0.0), draw(0.5), draw(1.0)
    for d in (half, always):
        # Anchors and their starts do not move; an opposite is never the anchor's own clip.
        np.testing.assert_array_equal(d["anchor_clip"], base["anchor_clip"])
        np.testing.assert_array_equal(d["anchor_start"], base["anchor_start"])
        assert (d["opposite_clip"] != d["anchor_clip"]).all()
        # The loss still treats every clip as its own group (same-speaker opposites are negatives).
        np.testing.assert_array_equal(d["anchor_group"], d["anchor_clip"])
    same = lambda d: spk[d["anchor_clip"]] == spk[d["opposite_clip"]]  # noqa: E731
    grouped = np.isin(base["anchor_clip"], np.arange(12))
    # Always: every anchor with a mate gets one; the two solo clips keep other clips' opposites.
    assert same(always)[grouped].all() and not same(always)[~grouped].any()
    # By chance 3 of 13 other clips are mates (0.23); half of the draws add 0.5 of the rest.
    rate = same(half)[grouped].mean()
    assert 0.55 < rate < 0.70, rate
    assert same(base)[grouped].mean() < 0.35


def test_same_group_opposites_need_groups_not_barred():
    cache = FakeCache([100] * 8, groups=["a"] * 4 + ["b"] * 4)
    with pytest.raises(Tile2AudioError, match="same_group_prob"):
        TripletSampler(cache, TILES, _sampler(exclude_group_opposites=True, same_group_prob=0.5), 8, seed=0)


def test_clip_fraction_draws_from_a_seeded_subset_only():
    cache = FakeCache([100] * 20)
    sampler = TripletSampler(cache, TILES, _sampler(clip_fraction=0.25), 64, seed=3)
    seen = set(_cat(_batches(sampler, 4), "anchor_clip")) | set(_cat(_batches(sampler, 4), "opposite_clip"))
    assert len(seen) == 5
    again = TripletSampler(cache, TILES, _sampler(clip_fraction=0.25), 64, seed=3)
    assert set(_cat(_batches(again, 4), "anchor_clip")) <= seen
    with pytest.raises(Tile2AudioError, match="clip_fraction"):
        _sampler(clip_fraction=0.0)


def test_fake_and_real_caches_are_feature_sources_and_pools_are_named(tiny_cache):
    from tile2audio.features import open_cache
    from tile2audio.sampler import FeatureSource, PoolArrays

    fake = FakeCache([40, 50, 60], labels=["a", "b", "a"])
    assert isinstance(fake, FeatureSource) and isinstance(open_cache(tiny_cache), FeatureSource)
    assert not isinstance(object(), FeatureSource)
    ts = TripletSampler(fake, TILES, _sampler(), batch_size=4, seed=0)
    pool = ts._pool_arrays(0)
    assert isinstance(pool, PoolArrays) and len(pool.offsets) == len(pool.rows) == 3
    assert pool.frames.shape[1] == fake.n_mels and pool.s_clip.dtype == np.float32


# --------------------------------------------------------------------------- BYOL-A views


def _views(**kw) -> "SamplerConfig":
    """BYOL-A views with every part off unless given (each test turns on the part it checks)."""
    parts = {"views": "byola", "mixup_ratio": 0.0, "view_gain_db": 0.0, "eq_db": 0.0, "crop_scale_min": 1.0,
             "crop_scale_max": 1.0}
    return _sampler(**{**parts, **kw})


def test_view_settings_do_nothing_while_views_are_plain(mixed_cache):
    plain = _batches(TripletSampler(mixed_cache, TILES, _sampler(), 16, seed=2), 2)
    tuned = _sampler(mixup_ratio=0.2, crop_scale_min=0.8, crop_scale_max=1.2, crop_canvas=2.0, view_gain_db=3.0,
                     eq_db=9.0, eq_points=3)
    same = _batches(TripletSampler(mixed_cache, TILES, tuned, 16, seed=2), 2)
    assert SamplerConfig().views == "plain" and not SamplerConfig().byola
    for x, y in zip(plain, same):
        assert set(x) == set(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("normalize", ["standardize", "minmax"])
def test_log_mixup_exp_mixes_powers_with_partners_outside_the_anchor_group(normalize):
    # Constant clips (raw dB levels below); clips 0 and 1 share group "a".
    cache = FakeCache([100, 100, 100, 100, 100], groups=["a", "a", "", "", ""], n_mels=4, normalize=normalize)
    raw_db = np.array([0.0, 6.0, -10.0, 12.0, 3.0])
    scale, offset = (2.0, 0.0) if normalize == "standardize" else (8.0, -4.0)  # the fake's std / min-max
    for i, level in enumerate(raw_db):
        cache._data[f"c{i}"][:] = (level - offset) / scale
    config = _views(mixup_ratio=0.4)
    sampler = TripletSampler(cache, TILES, config, 64, seed=0)
    batches = _batches(sampler, 3)
    again = _batches(TripletSampler(cache, TILES, config, 64, seed=0), 3)
    group = cache.index["group"].to_numpy()
    lams = []
    for b, b2 in zip(batches, again):
        for key in b:
            np.testing.assert_array_equal(b[key], b2[key])
        a = b["anchor_clip"]
        for tile_key, clip_key, partner_key in (("anchor", "anchor_clip", "anchor_partner"),
                                                ("neighbour", "neighbour_clip", "neighbour_partner"),
                                                ("opposite", "opposite_clip", "opposite_partner")):
            partner = b[partner_key]
            assert (partner != a).all()
            named = group[a] != ""
            assert (group[partner][named] != group[a][named]).all(), "a partner of the anchor's group"
            own = b[clip_key]
            y = (b[tile_key][..., 0] * scale + offset) * np.log(10) / 10  # natural-log power
            np.testing.assert_allclose(y, y[:, :1, :1] * np.ones_like(y), atol=1e-5)
            other = partner != own  # an opposite may be mixed with its own clip (then nothing to solve)
            x = raw_db[own][other] * np.log(10) / 10
            m = raw_db[partner][other] * np.log(10) / 10
            lam = (np.exp(y[other, 0, 0]) - np.exp(x)) / (np.exp(m) - np.exp(x))
            assert (lam > -1e-4).all() and (lam < 0.4 + 1e-4).all()
            lams.append(lam)
        assert (b["neighbour_partner"] != b["anchor_partner"]).all(), "anchor and positive share a partner"
    lams = np.concatenate(lams)
    assert lams.min() < 0.05 and lams.max() > 0.35  # l ~ U(0, 0.4), per tile


def test_mixup_partners_fall_back_to_other_clips_when_one_group_holds_all():
    cache = FakeCache([100, 100, 100], groups=["g", "g", "g"])
    (b,) = _batches(TripletSampler(cache, TILES, _views(mixup_ratio=0.4), 64, seed=1), 1)
    for key in ("anchor_partner", "neighbour_partner", "opposite_partner"):
        assert (b[key] != b["anchor_clip"]).all()


def test_resize_crop_stretches_time_and_mel_bands_inside_a_zero_canvas():
    # Every frame holds 100 + frame number + 0.25 x band: affine, so bilinear resizing keeps it affine.
    lengths = [200, 150, 120]
    cache = FakeCache(lengths, n_mels=16)
    for i, n in enumerate(lengths):
        cache._data[f"c{i}"][:] = 100.0 + np.arange(n)[:, None] + 0.25 * np.arange(16)[None, :]
    config = _views(crop_scale_min=0.6, crop_scale_max=1.5, crop_canvas=1.5)
    plain = _batches(TripletSampler(cache, TILES, _sampler(), 64, seed=4), 2)
    batches = _batches(TripletSampler(cache, TILES, config, 64, seed=4), 2)
    rows, cols = np.arange(T, dtype=float), np.arange(16, dtype=float)
    canvas = int(1.5 * T)
    slopes = {}
    padded = 0
    for b, p in zip(batches, plain):
        for key in ("anchor_start", "neighbour_start", "opposite_start", "anchor_clip"):
            np.testing.assert_array_equal(b[key], p[key])  # the views never change the draws
        for tile_key, start_key in (("anchor", "anchor_start"), ("neighbour", "neighbour_start")):
            for tile, start in zip(b[tile_key][..., 0], b[start_key]):
                pad = (tile == 0).all(axis=1)
                padded += pad.any()
                assert not pad.all() and np.isin(tile[pad], [0.0]).all()
                r, c = np.meshgrid(rows[~pad], cols, indexing="ij")
                design = np.stack([np.ones(r.size), r.ravel(), c.ravel()], 1)
                coef, *_ = np.linalg.lstsq(design, tile[~pad].ravel(), rcond=None)
                np.testing.assert_allclose(design @ coef, tile[~pad].ravel(), atol=2e-3)
                assert (int(0.6 * T) - 1) / (T - 1) - 1e-3 <= coef[1] <= (canvas - 1) / (T - 1) + 1e-3
                assert 0.25 * (int(0.6 * 16) - 1) / 15 - 1e-3 <= coef[2] <= 0.25 + 1e-3
                assert tile[~pad].min() >= 100 + start - 1e-3 and tile[~pad].max() <= 100 + start + T - 1 + 4
                slopes.setdefault(tile_key, []).append(coef[1])
    assert padded > 10
    assert np.ptp(slopes["anchor"]) > 0.5
    assert np.mean(np.abs(np.subtract(slopes["anchor"], slopes["neighbour"])) > 1e-3) > 0.9  # independent crops


def test_view_gain_and_eq_add_a_smooth_curve_in_db_per_tile():
    from tile2audio.augment import eq_weights

    cache = FakeCache([200, 150, 120], n_mels=16)  # standardize, std 2: 1 dB is 0.5 normalised units
    plain = _batches(TripletSampler(cache, TILES, _sampler(), 32, seed=1), 1)[0]
    aug = _batches(TripletSampler(cache, TILES, _views(view_gain_db=6.0, eq_db=6.0, eq_points=4), 32, seed=1), 1)[0]
    gain = _batches(TripletSampler(cache, TILES, _views(view_gain_db=6.0), 32, seed=1), 1)[0]
    weights = eq_weights(4, 16)
    curves = []
    for key in ("anchor", "neighbour", "opposite"):
        diff_db = 2.0 * (aug[key] - plain[key])[..., 0]
        np.testing.assert_allclose(diff_db, np.broadcast_to(diff_db[:, :1, :], diff_db.shape), atol=2e-3)
        curve = diff_db[:, 0, :]  # (n, M): gain + EQ
        assert (np.abs(curve) <= 12.0 + 1e-3).all()
        coef, *_ = np.linalg.lstsq(weights.T, curve.T, rcond=None)
        np.testing.assert_allclose(weights.T @ coef, curve.T, atol=2e-3)  # smooth: a blend of 4 points
        curves.append(curve)
        gain_db = 2.0 * (gain[key] - plain[key])[..., 0]
        np.testing.assert_allclose(gain_db, np.broadcast_to(gain_db[:, :1, :1], gain_db.shape), atol=2e-3)
        assert (np.abs(gain_db) <= 6.0 + 1e-3).all() and np.ptp(gain_db[:, 0, 0]) > 3.0
    curves = np.concatenate(curves)
    assert np.ptp(curves[:, -1] - curves[:, 0]) > 6.0  # tilts differ from tile to tile
    assert np.abs(np.diff(curves, 2, axis=1)).max() < 3.0  # no band-to-band jumps
    assert (np.abs(np.diff(curves, axis=1)).max(axis=1) > 0.1).mean() > 0.9  # but not flat


def test_eq_views_are_byola_views_without_mixup_and_crop():
    cache = FakeCache([200, 150, 120], n_mels=16)
    # Left at their defaults, mixup (0.4) and the crop (0.6-1.5) would change every tile.
    eq = _batches(TripletSampler(cache, TILES, _sampler(views="eq"), 32, seed=1), 1)[0]
    byola = _batches(TripletSampler(cache, TILES, _views(view_gain_db=6.0, eq_db=6.0),
                                    32, seed=1), 1)[0]
    plain = _batches(TripletSampler(cache, TILES, _sampler(), 32, seed=1), 1)[0]
    assert "anchor_partner" not in eq
    for key in ("anchor", "neighbour", "opposite"):
        np.testing.assert_array_equal(eq[key], byola[key])
        assert not np.allclose(eq[key], plain[key])


def test_views_are_deterministic_and_resume_exactly():
    cache = _rotating_cache()
    config = _views(mixup_ratio=0.4, view_gain_db=6.0, eq_db=6.0, crop_scale_min=0.6, crop_scale_max=1.5,
                    memory_gb=(2 * 3200 + 100) / 2**30, rotate_steps=2)
    sampler = TripletSampler(cache, TILES, config, 8, seed=4)
    full = _batches(sampler, 6)
    resumed = _batches(TripletSampler(cache, TILES, config, 8, seed=4), 3, start_step=3)
    for x, y in zip(full[3:], resumed):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    shard_of = cache.index["shard"].to_numpy()
    for step, b in enumerate(full):  # partners come from the pool in memory at that step
        pool = set(sampler.loaded_pools[step // 2].shards)
        for key in ("anchor_partner", "neighbour_partner", "opposite_partner"):
            assert set(shard_of[b[key]]) <= pool


# --------------------------------------------------------------------------- silence-aware tiles


def _silent_cache(normalize: str = "standardize") -> FakeCache:
    """Clips with silent parts: bands 2-5 are 20 dB where voiced and -40 dB elsewhere (raw, std 2).

    Bands 0 and 1 hold -200 - clip and -200 - frame (far below the sound, so they add no
    power): a tile is traced with :func:`_trace`.
    """
    lengths = [200, 150, 100, 60, 25, 160]
    voiced = [(50, 150), (100, 150), (0, 0), (0, 10), (0, 25), (0, 160)]
    cache = FakeCache(lengths, n_mels=6, normalize=normalize, groups=["", "", "", "", "", ""])
    scale, offset = (2.0, 0.0) if normalize == "standardize" else (8.0, -4.0)
    cache.index["min"], cache.index["max"] = -440.0, 40.0  # the minmax fake: raw = x * 480 - 440
    if normalize == "minmax":
        scale, offset = 480.0, -440.0
    for i, (n, (lo, hi)) in enumerate(zip(lengths, voiced)):
        raw = np.full((n, 6), -40.0)
        raw[lo:hi, 2:] = 20.0
        raw[:, 0], raw[:, 1] = -200.0 - i, -200.0 - np.arange(n)
        cache._data[f"c{i}"] = ((raw - offset) / scale).astype(np.float32)
    cache.voiced = voiced
    cache.raw_affine = (scale, offset)
    return cache


def _trace(cache, tiles):
    """(clip, frame numbers (n, T), voiced (n, T)) of normalised tiles (n, T, M, 1) of the silent cache."""
    scale, offset = cache.raw_affine
    raw = np.rint(tiles[..., 0] * scale + offset)
    clip = (-200 - raw[:, :, 0]).astype(int)
    frame = (-200 - raw[:, :, 1]).astype(int)
    return clip[:, 0], frame, raw[:, :, 2] > 0


def test_pools_mark_mostly_non_silent_starts_and_keep_all_of_a_silent_clip():
    from tile2audio.pools import SilenceRule, band_normalisation, non_silent_starts

    cache = _silent_cache()
    frames, offsets, lengths = cache.frames_block(list(cache.index["clip_id"]))
    ones = np.ones(len(lengths), np.float32)
    rule = SilenceRule(40.0, 0.5, T, band_normalisation(cache), 10 / np.log(10))
    rank, starts, first, count = non_silent_starts(frames, offsets, lengths, ones, 0 * ones, rule)
    by_clip = [starts[f:f + c] for f, c in zip(first, count)]
    np.testing.assert_array_equal(by_clip[0], np.arange(30, 131))  # >= 20 of 40 frames in 50..149
    np.testing.assert_array_equal(by_clip[1], np.arange(80, 111))
    for c in (2, 3):  # all silent, or too little sound for one tile: every start
        np.testing.assert_array_equal(by_clip[c], np.arange(lengths[c] - T + 1))
    np.testing.assert_array_equal(by_clip[5], np.arange(121))
    for c, o in enumerate(offsets):  # the rank table counts allowed starts below each position
        table = rank[o + c:o + c + lengths[c] + 1]
        expected = [(by_clip[c] < p).sum() for p in range(lengths[c] + 1)]
        np.testing.assert_array_equal(table, expected)
    loose = non_silent_starts(frames, offsets, lengths, ones, 0 * ones, rule._replace(silence_db=70.0))
    assert loose[3][0] == 161  # at 70 dB the -40 dB frames count as sound: every start of clip 0


@pytest.mark.parametrize("normalize", ["standardize", "minmax"])
@pytest.mark.parametrize("kw", [{}, {"positive": "view"}, {"mode": "tile2vec-distant", "distant_prob": 1.0},
                                {"mode": "supervised"}],
                         ids=["neighbour", "view", "distant", "supervised"])
def test_skip_silence_draws_tiles_from_the_sound(normalize, kw):
    cache = _silent_cache(normalize)
    cache.index["label"] = ["x", "y", "x", "y", "x", "y"]
    config = _sampler(skip_silence=True, **kw)
    sampler = TripletSampler(cache, TILES, config, 64, seed=5)
    batches = _batches(sampler, 3)
    off = _batches(TripletSampler(cache, TILES, _sampler(**kw), 64, seed=5), 3)
    for tile_key, start_key in (("anchor", "anchor_start"), ("neighbour", "neighbour_start"),
                                ("opposite", "opposite_start")):
        clip, frame, voiced = _trace(cache, _cat(batches, tile_key))
        lengths = cache.index["n_frames"].to_numpy()[clip]
        np.testing.assert_array_equal(frame[:, 0], _cat(batches, start_key) % lengths)  # short clips loop
        sounding = np.isin(clip, [0, 1, 5])  # clips with a tile's worth of sound
        assert sounding.sum() > 20
        assert (voiced[sounding].mean(axis=1) >= 0.5).all(), f"{tile_key}: a mostly silent tile"
        silent = clip == 2  # all silent: it keeps every start (0..60)
        if silent.sum() > 10:
            assert np.ptp(frame[silent, 0]) > 30
        c0, _, v0 = _trace(cache, _cat(off, tile_key))
        if tile_key != "neighbour" or kw:
            assert (v0[np.isin(c0, [0, 1])].mean(axis=1) < 0.5).any(), "the check could not fail"
    a, n = _cat(batches, "anchor_start"), _cat(batches, "neighbour_start")
    roomy = cache.index["n_frames"].to_numpy()[_cat(batches, "anchor_clip")] - T >= GAP
    if not kw:  # neighbours keep the neighbourhood and, where the clip allows, the gap
        assert (np.abs(a - n) <= HOOD).all() and (np.abs(a - n)[roomy] >= GAP).all()
    if kw.get("mode") == "tile2vec-distant":
        far = _cat(batches, "opposite_clip") == _cat(batches, "anchor_clip")
        assert far.any() and (np.abs(a - _cat(batches, "opposite_start"))[far] >= 2 * HOOD).all()
