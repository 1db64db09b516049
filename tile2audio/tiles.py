"""Segmenter: cut a clip's log-mel frames into fixed-length tiles.

A tile is ``tile_frames`` consecutive spectrogram frames. Tiles start every
``hop_frames``; when the hop does not land exactly on the end of the clip, one last tile
is aligned to the end so the tail is always covered. A clip shorter than one tile is
looped (:func:`tile2audio.audio.loop_pad`, the front end's one padding rule) up to one
tile, and gives a single tile whose timestamps stop at the clip's real end.

Pure numpy: no TensorFlow, so embedding and probing code can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import loop_pad
from .config import TileConfig, frames_for
from .errors import Tile2AudioError


@dataclass(frozen=True)
class TileGeometry:
    """Tile sizes in spectrogram frames.

    Attributes
    ----------
    tile_frames : int
        Frames per tile (>= 1).
    hop_frames : int
        Frames between consecutive tile starts when segmenting a clip (>= 1).
    neighbourhood_frames : int
        Largest ``|anchor_start - neighbour_start|`` the sampler draws (>= 0).
    min_gap_frames : int
        Smallest ``|anchor_start - neighbour_start|`` allowed (0 <= gap <= neighbourhood).
    frames_per_second : float
        Spectrogram frame rate the frame counts were computed for.
    """

    tile_frames: int
    hop_frames: int
    neighbourhood_frames: int
    min_gap_frames: int
    frames_per_second: float

    def __post_init__(self) -> None:
        if self.tile_frames < 1 or self.hop_frames < 1:
            raise Tile2AudioError(
                f"tile_frames and hop_frames must be >= 1, got {self.tile_frames} and {self.hop_frames}"
            )
        if not 0 <= self.min_gap_frames <= self.neighbourhood_frames:
            raise Tile2AudioError(
                "need 0 <= min_gap_frames <= neighbourhood_frames, got "
                f"{self.min_gap_frames} and {self.neighbourhood_frames}"
            )
        if self.frames_per_second <= 0:
            raise Tile2AudioError(f"frames_per_second must be > 0, got {self.frames_per_second}")

    @classmethod
    def from_config(cls, tiles: TileConfig, frames_per_second: float) -> "TileGeometry":
        """Convert a :class:`~tile2audio.config.TileConfig` (seconds) to frame counts.

        Parameters
        ----------
        tiles : TileConfig
            Tile, hop, neighbourhood and minimum-gap lengths in seconds.
        frames_per_second : float
            Frame rate of the log-mel features (``FeatureParams.frames_per_second``).

        Returns
        -------
        TileGeometry
            Rounded frame counts; tile and hop are at least one frame.
        """
        if tiles.is_auto:
            raise Tile2AudioError("tile settings are 'auto': resolve them with tile2audio.rules.choose_training "
                                  "(training does) before cutting tiles")
        fps = float(frames_per_second)
        if fps <= 0:
            raise Tile2AudioError(f"frames_per_second must be > 0, got {frames_per_second}")
        return cls(
            tile_frames=max(1, frames_for(tiles.tile_seconds, fps)),
            hop_frames=max(1, frames_for(tiles.tile_hop_seconds, fps)),
            neighbourhood_frames=frames_for(tiles.neighbourhood_seconds, fps),
            min_gap_frames=frames_for(tiles.min_gap_seconds, fps),
            frames_per_second=fps,
        )

    @property
    def tile_seconds(self) -> float:
        """Length of one tile in seconds."""
        return self.tile_frames / self.frames_per_second


def tile_starts(n_frames: int, tile_frames: int, hop_frames: int) -> np.ndarray:
    """First frame of every tile of a clip.

    Parameters
    ----------
    n_frames : int
        Frames in the clip (>= 1).
    tile_frames, hop_frames : int
        Tile length and hop, in frames (>= 1).

    Returns
    -------
    np.ndarray
        int64, shape (n_tiles,), increasing. Starts are ``0, hop, 2 hop, ...`` while a
        tile fits; if the last of them does not end exactly at ``n_frames``, a final
        start ``n_frames - tile_frames`` is appended so the tail is covered. A clip no
        longer than one tile gives ``[0]``.
    """
    n_frames, tile_frames, hop_frames = int(n_frames), int(tile_frames), int(hop_frames)
    if n_frames < 1:
        raise Tile2AudioError(f"a clip needs at least one frame to be tiled, got {n_frames}")
    if tile_frames < 1 or hop_frames < 1:
        raise Tile2AudioError(f"tile_frames and hop_frames must be >= 1, got {tile_frames} and {hop_frames}")
    last = n_frames - tile_frames
    if last <= 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.arange(0, last + 1, hop_frames, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, np.int64(last))
    return starts


def tile_timestamps(starts: np.ndarray, n_frames: int, tile_frames: int,
                    frames_per_second: float) -> np.ndarray:
    """Start and end time of each tile, in seconds.

    Parameters
    ----------
    starts : np.ndarray
        int, shape (n_tiles,): first frame of each tile (from :func:`tile_starts`).
    n_frames : int
        Real (unpadded) frames of the clip; ends are clipped to ``n_frames``, so a tile
        of a looped short clip ends at the clip's real duration.
    tile_frames : int
        Tile length in frames.
    frames_per_second : float
        Frame rate.

    Returns
    -------
    np.ndarray
        float64, shape (n_tiles, 2): ``[start_s, end_s]`` per tile.
    """
    if frames_per_second <= 0:
        raise Tile2AudioError(f"frames_per_second must be > 0, got {frames_per_second}")
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    ends = np.minimum(starts + int(tile_frames), int(n_frames))
    return np.stack([starts, ends], axis=1).astype(np.float64) / float(frames_per_second)


def cut_tiles(frames: np.ndarray, geometry: TileGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Cut one clip's frames into tiles (the embedding-time segmentation).

    Parameters
    ----------
    frames : np.ndarray
        shape (n_frames, n_mels), the clip's (normalised) log-mel frames.
    geometry : TileGeometry
        Tile and hop lengths.

    Returns
    -------
    tiles : np.ndarray
        float32, shape (n_tiles, tile_frames, n_mels). A clip shorter than one tile is
        looped to one tile first.
    timestamps : np.ndarray
        float64, shape (n_tiles, 2), from :func:`tile_timestamps` with the real length.
    """
    frames = np.asarray(frames)
    if frames.ndim != 2 or frames.shape[0] < 1 or frames.shape[1] < 1:
        raise Tile2AudioError(f"cut_tiles expects frames of shape (n_frames, n_mels), got {frames.shape}")
    n_frames = frames.shape[0]
    starts = tile_starts(n_frames, geometry.tile_frames, geometry.hop_frames)
    timestamps = tile_timestamps(starts, n_frames, geometry.tile_frames, geometry.frames_per_second)
    if n_frames < geometry.tile_frames:
        frames = loop_pad(frames, geometry.tile_frames)
    # One fancy-indexing gather builds every tile at once (a copy, so callers may mutate).
    rows = starts[:, None] + np.arange(geometry.tile_frames, dtype=np.int64)[None, :]
    return np.ascontiguousarray(frames[rows], dtype=np.float32), timestamps
