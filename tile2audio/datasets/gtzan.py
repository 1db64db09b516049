"""GTZAN genre collection (1000 x 30 s, 10 genres): manifest loader.

Expected layout (either is detected)::

    ROOT/genres_original/<genre>/<genre>.000NN.wav      (the common WAV copy)
    ROOT/genres/<genre>/<genre>.000NN.au                (the original .au release)

``ROOT/Data/genres_original/...`` (Kaggle copy) and ROOT holding the genre folders
directly are accepted too. The artist-filtered split (Kereliuk, Sturm & Larsen) is three
text files, one clip per line (``blues/blues.00012.wav``)::

    SPLIT_DIR/train_filtered.txt   valid_filtered.txt   test_filtered.txt
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..console import show_progress
from ..errors import Tile2AudioError
from ._files import UNREADABLE, file_problem, require_dir, summarise
from .schema import assemble, to_posix

log = logging.getLogger(__name__)

GENRES: tuple[str, ...] = (
    "blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock",
)
SPLIT_FILES: dict[str, str] = {
    "train": "train_filtered.txt",
    "valid": "valid_filtered.txt",
    "test": "test_filtered.txt",
}
# the last entry is ROOT itself, for a root that holds the genre folders directly
_LAYOUTS: tuple[str, ...] = ("genres_original", "genres", "Data/genres_original", "")
_EXTENSIONS = (".wav", ".au")
_CLIP_NAME = re.compile(r"^([A-Za-z0-9_-]+)\.(\d{5})$")


def load(
    root: str | os.PathLike,
    *,
    split_dir: str | os.PathLike | None = None,
    n_folds: int = 10,
    seed: int = 0,
    check_audio: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Manifest of a GTZAN copy.

    Parameters
    ----------
    root : str or path-like
        The data root holding ``genres_original/<genre>/<genre>.000NN.wav`` or
        ``genres/<genre>/<genre>.000NN.au`` (see the module docstring).
    split_dir : str or path-like, optional
        Folder with ``train_filtered.txt``, ``valid_filtered.txt`` and
        ``test_filtered.txt`` (lines like ``blues/blues.00012.wav``, matched by clip id so
        an ``.au`` copy works too). Clips in none of the lists get split ``""`` (the
        filtered split leaves some out on purpose) and are reported. Without it, clips
        get ``n_folds`` stratified folds and a WARNING: random GTZAN splits put one
        artist on both sides and inflate accuracy.
    n_folds : int
        Number of stratified folds when ``split_dir`` is not given (folds 1..n_folds).
    seed : int
        Seed of the fold assignment (deterministic for a given seed and file list).
    check_audio : bool
        Open each file's header with soundfile to flag unreadable files (common copies
        hold an unreadable ``jazz.00054.wav``); they are kept with ``note='unreadable'``
        and a warning, and the feature stage records them in its failures.
    progress : bool
        Show a progress bar while checking files.

    Returns
    -------
    pandas.DataFrame
        Shape (n_clips, 8): the manifest columns (clip_id ``<genre>.000NN``, label = the
        genre, group ``""``) and ``note`` (``""`` or ``"unreadable"``).
    """
    root = require_dir(root, "GTZAN root")
    audio_dir = _find_audio_dir(root)
    files = _list_clips(audio_dir)
    if not files:
        raise Tile2AudioError(f"no GTZAN clips (<genre>/<genre>.000NN.wav|.au) found under {audio_dir}")
    clip_ids = [cid for cid, _ in files]
    labels = [cid.split(".")[0] for cid in clip_ids]
    rel_paths = [to_posix(p.relative_to(root).as_posix()) for _, p in files]
    notes = _health_notes(files, check_audio, progress)
    if split_dir is not None:
        splits, folds = _apply_split_lists(clip_ids, split_dir), None
    else:
        splits, folds = None, _stratified_folds(labels, n_folds, seed)
        log.warning(
            "GTZAN without split_dir: assigned %d random stratified folds. Random GTZAN splits "
            "leak artists between train and test and inflate accuracy; pass split_dir=DIR "
            "with the artist-filtered train/valid/test lists for honest numbers.",
            n_folds,
        )
    df = assemble(
        {"clip_id": clip_ids, "path": rel_paths, "root": str(root), "label": labels,
         "split": splits, "fold": folds},
        extras={"note": notes},
    )
    log.info("gtzan: %d clips, %d genres from %s", len(df), df["label"].nunique(), audio_dir)
    return df


def _find_audio_dir(root: Path) -> Path:
    """The folder holding the genre folders, trying the known layouts in order."""
    found = [root / sub for sub in _LAYOUTS if _has_gtzan_files(root / sub)]
    if not found:
        raise Tile2AudioError(
            f"{root} does not look like GTZAN: expected genres_original/<genre>/<genre>.000NN.wav "
            f"or genres/<genre>/<genre>.000NN.au"
        )
    if len(found) > 1:
        log.warning("GTZAN: both %s and %s hold clips; using %s", found[0], found[1], found[0])
    return found[0]


def _has_gtzan_files(folder: Path) -> bool:
    """True if ``folder`` has a ``<genre>/<genre>.NNNNN.(wav|au)`` file."""
    if not folder.is_dir():
        return False
    for sub in folder.iterdir():
        if sub.is_dir() and any(_clip_id(f, sub.name) for f in sub.iterdir()):
            return True
    return False


def _clip_id(path: Path, genre: str) -> str | None:
    """``<genre>.NNNNN`` when ``path`` is a GTZAN clip of ``genre``, else None."""
    if path.suffix.lower() not in _EXTENSIONS or not path.is_file():
        return None
    m = _CLIP_NAME.match(path.stem)
    return path.stem if m and m.group(1) == genre else None


def _list_clips(audio_dir: Path) -> list[tuple[str, Path]]:
    """Sorted (clip_id, path) pairs; odd files and duplicate ids are warned about and skipped."""
    out: dict[str, Path] = {}
    odd: list[str] = []
    for genre_dir in sorted(p for p in audio_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if genre_dir.name not in GENRES:
            log.warning("GTZAN: folder %s is not one of the 10 GTZAN genres; its clips are kept", genre_dir.name)
        for f in sorted(genre_dir.iterdir()):
            if f.name.startswith("."):
                continue
            cid = _clip_id(f, genre_dir.name)
            if cid is None:
                odd.append(f"{genre_dir.name}/{f.name}")
            elif cid in out:
                log.warning("GTZAN: %s and %s share clip id %s; keeping the first", out[cid].name, f.name, cid)
            else:
                out[cid] = f
    if odd:
        log.warning("GTZAN: ignored %d file(s) not named <genre>.000NN.wav|.au: %s", len(odd), summarise(odd))
    return sorted(out.items())


def _health_notes(files: list[tuple[str, Path]], check_audio: bool, progress: bool) -> list[str]:
    """``note`` per clip: ``"unreadable"`` for empty or undecodable files, else ``""``."""
    notes, bad = [], []
    for cid, path in tqdm(files, desc="gtzan: checking files", unit="file", disable=not show_progress(progress)):
        problem = file_problem(path, decode=check_audio)
        notes.append(UNREADABLE if problem else "")
        if problem:
            bad.append(f"{cid} ({problem})")
    if bad:
        log.warning(
            "GTZAN: %d unreadable file(s) kept with note 'unreadable' (the feature stage will "
            "skip them and list them in failures.csv): %s", len(bad), summarise(bad),
        )
    return notes


def _read_list(path: Path) -> list[str]:
    """Clip ids listed in one split file (``genre/genre.000NN.ext`` per line)."""
    ids = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name = PurePosixPath(line.replace("\\", "/")).name
        ids.append(re.sub(r"\.(wav|au)$", "", name, flags=re.IGNORECASE))
    return ids


def _apply_split_lists(clip_ids: list[str], split_dir: str | os.PathLike) -> list[str]:
    """Split per clip from the three filtered lists; unlisted clips get ``""``."""
    split_dir = require_dir(split_dir, "GTZAN split_dir")
    split_of: dict[str, str] = {}
    for split, fname in SPLIT_FILES.items():
        path = split_dir / fname
        if not path.is_file():
            raise Tile2AudioError(
                f"GTZAN split_dir {split_dir} has no {fname}; it needs {', '.join(SPLIT_FILES.values())}"
            )
        for cid in _read_list(path):
            if cid in split_of and split_of[cid] != split:
                raise Tile2AudioError(
                    f"GTZAN split lists disagree: {cid} is in both {split_of[cid]} and {split}"
                )
            split_of[cid] = split
    on_disk = set(clip_ids)
    absent = sorted(set(split_of) - on_disk)
    if absent:
        log.warning("GTZAN: %d clip(s) in the split lists are not on disk: %s", len(absent), summarise(absent))
    unlisted = [cid for cid in clip_ids if cid not in split_of]
    if unlisted:
        log.warning(
            "GTZAN: %d clip(s) are in none of the filtered split lists and get split '' "
            "(kept out of train/valid/test): %s", len(unlisted), summarise(unlisted),
        )
    return [split_of.get(cid, "") for cid in clip_ids]


def _stratified_folds(labels: list[str], n_folds: int, seed: int) -> list[int]:
    """Folds 1..n_folds, each label's clips shuffled and dealt round-robin (sizes balanced overall)."""
    if n_folds < 2:
        raise Tile2AudioError(f"n_folds must be >= 2, got {n_folds}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=object)
    folds = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for label in sorted(set(labels)):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        folds[idx] = (offset + np.arange(len(idx))) % n_folds + 1
        offset += len(idx)
    return folds.tolist()
