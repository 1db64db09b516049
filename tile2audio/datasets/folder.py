"""A folder of audio, labelled by sub-folder: manifest loader.

Layout::

    ROOT/<label>/<clip>.wav            label = name of the file's parent folder
    ROOT/<any>/<label>/<clip>.flac     (searched recursively)
    ROOT/<clip>.mp3                    files directly in ROOT get label ""

Non-audio files (a ``labels.csv``, cover images) and hidden files are ignored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Iterable

import pandas as pd

from ..errors import Tile2AudioError
from ._files import AUDIO_EXTENSIONS, require_dir, summarise
from .schema import assemble

log = logging.getLogger(__name__)


def load(
    root: str | os.PathLike,
    *,
    extensions: Iterable[str] | None = None,
    follow_symlinks: bool = True,
) -> pd.DataFrame:
    """Manifest of every audio file under ``root``, labelled by its parent folder.

    Parameters
    ----------
    root : str or path-like
        The folder to scan, recursively.
    extensions : iterable of str, optional
        File extensions to keep (with or without the dot, any case); default
        wav, flac, ogg, mp3, au, aiff, aif, m4a, opus.
    follow_symlinks : bool
        Descend into symlinked folders. A symlinked folder whose real path was already
        scanned (a loop such as ``ln -s . loop``, or a second link to one folder) is not
        entered again, and a file reached twice by its real path is listed once (at its
        first path in sorted order); both are logged as warnings. Listing one recording
        twice would put copies of it on both sides of a probe split.

    Returns
    -------
    pandas.DataFrame
        Shape (n_files, 7), sorted by path: clip_id = relative path without extension
        (with it, when two files differ only by extension), label = parent folder name
        (``""`` for files directly in ``root``), split ``""``, fold empty, group ``""``.
    """
    root = require_dir(root, "audio folder")
    exts = _normalise_extensions(extensions)
    rel_paths = _scan(root, exts, follow_symlinks)
    if not rel_paths:
        raise Tile2AudioError(
            f"no audio files ({', '.join(e.lstrip('.') for e in exts)}) found under {root}"
        )
    labels = [PurePosixPath(p).parent.name for p in rel_paths]
    df = assemble({"clip_id": _clip_ids(rel_paths), "path": rel_paths, "root": str(root), "label": labels})
    n_labels = len(set(labels) - {""})
    log.info("folder: %d files, %d labels under %s", len(df), n_labels, root)
    if n_labels == 0:
        log.warning("folder: no sub-folders under %s, so the clips have no labels (fine for training)", root)
    return df


def _normalise_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    """Lower-case extensions with a leading dot."""
    if extensions is None:
        return AUDIO_EXTENSIONS
    if isinstance(extensions, str):
        extensions = [extensions]
    exts = tuple(sorted({"." + e.lower().lstrip(".") for e in extensions if e.strip(".")}))
    if not exts:
        raise Tile2AudioError("extensions must name at least one file extension")
    return exts


def _scan(root: Path, exts: tuple[str, ...], follow_symlinks: bool) -> list[str]:
    """Sorted POSIX paths, relative to ``root``, of the audio files below it (each real file once)."""
    found = []
    seen_dirs = {os.path.realpath(root)}
    looped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        kept = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            real = os.path.realpath(os.path.join(dirpath, d))
            if real in seen_dirs:  # a symlink loop or a second link to a scanned folder
                looped.append((Path(dirpath).relative_to(root) / d).as_posix())
                continue
            seen_dirs.add(real)
            kept.append(d)
        dirnames[:] = kept
        rel_dir = Path(dirpath).relative_to(root)
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts:
                found.append((rel_dir / name).as_posix())
    if looped:
        log.warning("folder: not entering %d symlinked folder(s) that lead to a folder already scanned "
                    "(a symlink loop or a duplicate link): %s", len(looped), summarise(looped))
    unique, first_of, dups = [], {}, []
    for rel in sorted(found):
        real = os.path.realpath(root / rel)
        if real in first_of:
            dups.append(f"{rel} (= {first_of[real]})")
            continue
        first_of[real] = rel
        unique.append(rel)
    if dups:
        log.warning("folder: %d file(s) are symlinks to a file already listed and are left out: %s",
                    len(dups), summarise(dups))
    return unique


def _clip_ids(rel_paths: list[str]) -> list[str]:
    """Relative paths without extension; the full path where that would repeat an id."""
    stems = [str(PurePosixPath(p).with_suffix("")) for p in rel_paths]
    counts = pd.Series(stems).value_counts()
    clashes = set(counts[counts > 1].index)
    if clashes:
        log.warning("folder: %d name(s) exist with several extensions; their clip_id keeps the extension: %s",
                    len(clashes), summarise(sorted(clashes)))
    return [p if s in clashes else s for s, p in zip(stems, rel_paths)]
