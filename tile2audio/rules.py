"""The automatic training rule: tile geometry and positive-pair policy from the data.

Every ``auto`` setting of ``tiles``, ``sampler`` and ``loss.symmetric`` is chosen here
from two facts a feature cache already holds, never from a data set's name:

* the **median clip duration** ``d`` (seconds, before any padding), and
* the **group share**: the probability that two clips drawn at random share a ``group``
  (a clip without a group is its own group).

The rule (:func:`choose_training`):

``tiles.tile_seconds = min(1.5, max(d / 3, min(d, 0.5)))``
    At most a third of the median clip, so that a clip holds about three tiles; never
    above 1.5 s (enough for a note or an event) and never below 0.5 s unless the clips
    themselves are shorter (then a tile is the whole clip).
``tile_hop_seconds = tile / 2``, ``neighbourhood_seconds = 2 x tile``, ``min_gap_seconds = tile / 2``
    A neighbour overlaps its anchor by at most half a tile.
``sampler.positive = view`` when the median clip holds fewer than 3 tiles, else ``neighbour``
    In a clip that short, a neighbour tile is nearly the anchor's own audio (a clip
    shorter than one tile would even be looped onto itself), and the encoder learns
    recording identity. A *view* is an independent random crop of the clip (a time
    shift through the looped clip when it is shorter than a tile), augmented on its own.
``sampler.augment = loss.symmetric = True`` when the median clip holds fewer than 8 tiles
    Short clips make same-clip positives too easy without augmentation (gain, two time
    and two frequency masks of up to 20 %); symmetric anchors double the triplets of a
    batch. On 30 s music both cost accuracy on the development sets (experiments/README.md).
``sampler.exclude_group_opposites = group share <= 0.02``
    Groups that small are source recordings (slices of one file): barring them as
    negatives costs under 2 % of the negatives and removes false negatives. Larger
    groups are speakers, artists or sessions; excluding them would leave only other
    speakers as negatives and teach the loss who is speaking, while other clips of the
    same speaker are useful hard negatives. The probes split by group either way.

An explicit value in the config always wins; the values chosen are returned, logged,
and written to the run's config.yaml by :func:`tile2audio.train.train`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from .config import TrainingConfig, is_auto
from .errors import Tile2AudioError

log = logging.getLogger(__name__)

__all__ = ["choose_training", "group_share", "clip_durations", "MAX_TILE_SECONDS", "MIN_TILE_SECONDS",
           "VIEW_BELOW_TILES", "SHORT_BELOW_TILES", "SOURCE_GROUP_SHARE"]

#: Longest and (clips permitting) shortest automatic tile, in seconds.
MAX_TILE_SECONDS = 1.5
MIN_TILE_SECONDS = 0.5
#: Median clips holding fewer tiles than this get augmented views as positives.
VIEW_BELOW_TILES = 3.0
#: Median clips holding fewer tiles than this get augmentation and symmetric anchors.
SHORT_BELOW_TILES = 8.0
#: Groups whose share (chance two random clips share one) is at most this are source recordings.
SOURCE_GROUP_SHARE = 0.02


def clip_durations(index: pd.DataFrame, frames_per_second: float) -> np.ndarray:
    """Clip durations in seconds (n_clips,) float64: ``duration_s``, else ``n_frames / fps``."""
    if "duration_s" in index.columns:
        d = pd.to_numeric(index["duration_s"], errors="coerce").to_numpy(dtype=np.float64)
        if np.isfinite(d).all() and (d > 0).all():
            return d
    return index["n_frames"].to_numpy(dtype=np.float64) / float(frames_per_second)


def group_share(groups: Any) -> float:
    """Probability that two clips drawn at random (with replacement) share a group.

    Parameters
    ----------
    groups : sequence of str, shape (n_clips,)
        Group names; ``""`` or missing means the clip is its own group.

    Returns
    -------
    float
        ``sum_g (n_g / n)**2``; ``1 / n`` when no clip has a group.
    """
    names = pd.Series(list(groups), dtype=object).fillna("").astype(str).str.strip()
    n = len(names)
    if n == 0:
        raise Tile2AudioError("group_share needs at least one clip")
    counts = names[names != ""].value_counts().to_numpy(dtype=np.float64)
    singles = float((names == "").sum())
    return float(((counts / n) ** 2).sum() + singles / n**2)


def choose_training(config: TrainingConfig, index: pd.DataFrame,
                    frames_per_second: float) -> tuple[TrainingConfig, dict]:
    """Resolve every ``auto`` training setting from the clips of a feature cache.

    Parameters
    ----------
    config : TrainingConfig
        Settings; fields equal to ``"auto"`` are chosen, the others kept.
    index : pandas.DataFrame
        The cache's ``index.csv`` (``n_frames``, ``duration_s``, ``group``), one row per clip.
    frames_per_second : float
        Frame rate of the cache.

    Returns
    -------
    config : TrainingConfig
        With no ``auto`` left in ``tiles``, ``sampler`` and ``loss.symmetric``.
    chosen : dict
        ``{"median_seconds", "group_share", "settings": {"section.key": value}}``: the
        facts the rule read and every value it chose (empty settings when nothing was auto).
    """
    if len(index) == 0:
        raise Tile2AudioError("cannot choose tile settings: the cache holds no clips")
    median = float(np.median(clip_durations(index, frames_per_second)))
    groups = index["group"] if "group" in index.columns else [""] * len(index)
    share = group_share(groups)
    t, s, lo = config.tiles, config.sampler, config.loss
    chosen: dict[str, Any] = {}

    def pick(section: str, key: str, current: Any, value: Any) -> Any:
        if not is_auto(current):
            return current
        chosen[f"{section}.{key}"] = value
        return value

    rule_tile = round(min(MAX_TILE_SECONDS, max(median / 3.0, min(median, MIN_TILE_SECONDS))), 3)
    tile = rule_tile if is_auto(t.tile_seconds) else float(t.tile_seconds)
    tiles = replace(
        t,
        tile_seconds=pick("tiles", "tile_seconds", t.tile_seconds, tile),
        tile_hop_seconds=pick("tiles", "tile_hop_seconds", t.tile_hop_seconds, round(tile / 2, 3)),
        neighbourhood_seconds=pick("tiles", "neighbourhood_seconds", t.neighbourhood_seconds, round(2 * tile, 3)),
    )
    gap = round(min(tile / 2, float(tiles.neighbourhood_seconds)), 3)
    tiles = replace(tiles, min_gap_seconds=pick("tiles", "min_gap_seconds", t.min_gap_seconds, gap))
    per_clip = median / float(tiles.tile_seconds)
    short = per_clip < SHORT_BELOW_TILES
    sampler = replace(
        s,
        positive=pick("sampler", "positive", s.positive, "view" if per_clip < VIEW_BELOW_TILES else "neighbour"),
        augment=pick("sampler", "augment", s.augment, bool(short)),
        exclude_group_opposites=pick("sampler", "exclude_group_opposites", s.exclude_group_opposites,
                                     bool(share <= SOURCE_GROUP_SHARE)),
    )
    loss = replace(lo, symmetric=pick("loss", "symmetric", lo.symmetric, bool(short)))
    out = replace(config, tiles=tiles, sampler=sampler, loss=loss)
    if chosen:
        log.info("auto settings (median clip %.2f s, %.1f tiles; group share %.4f): %s", median, per_clip, share,
                 ", ".join(f"{k}={v}" for k, v in chosen.items()))
    return out, {"median_seconds": round(median, 4), "tiles_per_median_clip": round(per_clip, 3),
                 "group_share": round(share, 6), "settings": chosen}
