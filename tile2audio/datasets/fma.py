"""Free Music Archive (FMA) small / medium / large: manifest loader.

Expected layout::

    ROOT/fma_metadata/tracks.csv                  two header rows, then a "track_id,,," row
    ROOT/fma_<subset>/<tid // 1000:03d>/<tid:06d>.mp3

``fma_small`` holds only the small tracks, ``fma_medium`` small + medium, ``fma_large``
all of them (the ``set/subset`` column is cumulative in the same way).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from ..console import show_progress
from ..errors import Tile2AudioError
from ._files import MISSING, ZERO_BYTE, file_problem, require_dir, require_file, summarise
from .schema import assemble

log = logging.getLogger(__name__)

SUBSETS: tuple[str, ...] = ("small", "medium", "large")
SPLIT_NAMES: dict[str, str] = {"training": "train", "validation": "valid", "test": "test"}
# Listed in tracks.csv (small subset) but without usable audio (fma issue tracker).
KNOWN_BAD: frozenset[int] = frozenset({99134, 108925, 133297})
KNOWN_BAD_NOTE = "known bad: no usable audio"
_COLUMNS = {
    "subset": ("set", "subset"),
    "split": ("set", "split"),
    "label": ("track", "genre_top"),
    "group": ("artist", "id"),
}


def audio_relpath(track_id: int, subset: str) -> str:
    """Path of a track's MP3 relative to ROOT, e.g. ``fma_small/000/000002.mp3``."""
    return f"fma_{subset}/{track_id // 1000:03d}/{track_id:06d}.mp3"


def read_tracks(path: str | os.PathLike) -> pd.DataFrame:
    """Read FMA's ``tracks.csv`` (two header rows plus the ``track_id`` row) as strings.

    Parameters
    ----------
    path : str or path-like
        ``fma_metadata/tracks.csv``.

    Returns
    -------
    pandas.DataFrame
        Index: track id (str); columns: a 2-level MultiIndex such as
        ``('set', 'subset')``; all cells str, ``""`` for empty.
    """
    path = require_file(path, "FMA tracks.csv")
    try:
        tracks = pd.read_csv(path, index_col=0, header=[0, 1], dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise Tile2AudioError(f"cannot read FMA {path}: {exc}") from exc
    if not isinstance(tracks.columns, pd.MultiIndex):
        raise Tile2AudioError(f"FMA {path} must have two header rows (e.g. 'set' / 'subset')")
    missing = [f"{a}/{b}" for a, b in _COLUMNS.values() if (a, b) not in tracks.columns]
    if missing:
        raise Tile2AudioError(f"FMA {path} lacks column(s) {', '.join(missing)}")
    return tracks


def load(
    root: str | os.PathLike,
    *,
    subset: str = "small",
    progress: bool = True,
) -> pd.DataFrame:
    """Manifest of an FMA subset with its official train / valid / test split.

    Parameters
    ----------
    root : str or path-like
        Folder holding ``fma_metadata/tracks.csv`` and ``fma_<subset>/NNN/NNNNNN.mp3``.
    subset : {"small", "medium", "large"}
        Which audio folder to use; tracks whose ``set/subset`` is this size or smaller
        are listed (medium includes small, large includes all).
    progress : bool
        Show a progress bar while checking the audio files.

    Returns
    -------
    pandas.DataFrame
        Shape (n_tracks, 9): the manifest columns (clip_id = 6-digit track id, label =
        ``track/genre_top`` or ``""``, split from ``set/split``, fold empty, group =
        ``artist/id``) and extras ``subset`` (the track's own subset) and ``note``
        (``""``, ``"zero-byte"`` or ``"known bad: no usable audio"``; such tracks are
        kept and warned about). Tracks whose MP3 is missing are dropped with a warning.
        Some tracks are shorter than 30 s; the feature stage loop-pads them.
    """
    if subset not in SUBSETS:
        raise Tile2AudioError(f"FMA subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    root = require_dir(root, "FMA root")
    tracks = read_tracks(root / "fma_metadata" / "tracks.csv")
    audio_dir = root / f"fma_{subset}"
    if not audio_dir.is_dir():
        raise Tile2AudioError(f"FMA audio folder not found: {audio_dir} (subset={subset!r})")
    chosen = _select_subset(tracks, subset)
    ids = [_track_id(t) for t in chosen.index]
    order = sorted(range(len(ids)), key=ids.__getitem__)
    chosen, ids = chosen.iloc[order], [ids[i] for i in order]
    rel_paths = [audio_relpath(tid, subset) for tid in ids]
    problems = _check_files(root, rel_paths, progress)
    _report(ids, problems)
    keep = [p != MISSING for p in problems]
    notes = [_note(t, p) for t, p, k in zip(ids, problems, keep) if k]
    rel_paths = [r for r, k in zip(rel_paths, keep) if k]
    ids = [t for t, k in zip(ids, keep) if k]
    chosen = chosen.loc[keep]
    df = assemble(
        {"clip_id": [f"{t:06d}" for t in ids], "path": rel_paths, "root": str(root),
         "label": chosen[_COLUMNS["label"]].str.strip().tolist(),
         "split": _map_splits(chosen[_COLUMNS["split"]]),
         "group": chosen[_COLUMNS["group"]].str.strip().tolist()},
        extras={"subset": chosen[_COLUMNS["subset"]].str.strip().tolist(), "note": notes},
    )
    log.info("fma: %d tracks of subset %s, %d genres", len(df), subset, df["label"].replace("", pd.NA).nunique())
    return df


def _track_id(value: str) -> int:
    """A track id from the tracks.csv index, or raise."""
    try:
        return int(str(value).strip())
    except ValueError:
        raise Tile2AudioError(f"FMA tracks.csv has a non-integer track id {value!r}") from None


def _select_subset(tracks: pd.DataFrame, subset: str) -> pd.DataFrame:
    """Rows whose set/subset is ``subset`` or smaller (cumulative)."""
    rank = {name: i for i, name in enumerate(SUBSETS)}
    sizes = tracks[_COLUMNS["subset"]].str.strip()
    unknown = sorted(set(sizes) - set(SUBSETS))
    if unknown:
        log.warning("FMA: ignoring %d track(s) with unknown set/subset %s",
                    int((~sizes.isin(SUBSETS)).sum()), summarise(unknown))
    mask = sizes.map(lambda s: rank.get(s, len(SUBSETS)) <= rank[subset])
    return tracks.loc[mask.to_numpy(dtype=bool)]


def _map_splits(values: pd.Series) -> list[str]:
    """set/split values (training / validation / test) as train / valid / test."""
    raw = values.str.strip()
    unknown = sorted(set(raw) - set(SPLIT_NAMES))
    if unknown:
        log.warning("FMA: %d track(s) have an unknown set/split (%s); their split is ''",
                    int((~raw.isin(SPLIT_NAMES)).sum()), summarise(unknown))
    return [SPLIT_NAMES.get(v, "") for v in raw]


def _check_files(root: Path, rel_paths: list[str], progress: bool) -> list[str]:
    """``file_problem`` of each track's MP3 (no decoding: MP3 headers are slow to scan)."""
    return [file_problem(root / rel) for rel in
            tqdm(rel_paths, desc="fma: checking files", unit="file", disable=not show_progress(progress))]


def _note(track_id: int, problem: str) -> str:
    """The ``note`` of a kept track."""
    if track_id in KNOWN_BAD:
        return KNOWN_BAD_NOTE
    return problem


def _report(ids: list[int], problems: list[str]) -> None:
    """Warn about missing, zero-byte and known-bad tracks."""
    missing = [f"{t:06d}" for t, p in zip(ids, problems) if p == MISSING]
    if missing:
        log.warning("FMA: dropped %d track(s) listed in tracks.csv whose MP3 is missing: %s",
                    len(missing), summarise(missing))
    empty = [f"{t:06d}" for t, p in zip(ids, problems) if p == ZERO_BYTE]
    if empty:
        log.warning("FMA: %d zero-byte MP3(s) kept with note 'zero-byte': %s", len(empty), summarise(empty))
    bad = [f"{t:06d}" for t, p in zip(ids, problems) if t in KNOWN_BAD and p != MISSING]
    if bad:
        log.warning("FMA: %d known-bad track(s) without usable audio kept with note %r: %s",
                    len(bad), KNOWN_BAD_NOTE, summarise(bad))
