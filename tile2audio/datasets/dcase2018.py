"""DCASE 2018 task 5 (domestic activities, SINS) development set: manifest loader.

Expected layout (as unpacked from the DCASE2018-task5-dev archives)::

    ROOT/audio/DevNode<n>_ex<k>_<m>.wav          4 channels, 16 kHz, 10 s
    ROOT/meta.txt                                tab separated, no header: file, label, session
    ROOT/evaluation_setup/fold<i>_train.txt      file, label, session
    ROOT/evaluation_setup/fold<i>_evaluate.txt   file, label (and sometimes session)
    ROOT/evaluation_setup/fold<i>_test.txt       file only (not needed here)

``file`` is relative to ROOT (``audio/DevNode1_ex1_1.wav``). The protocol is the four
folds: a clip's ``fold`` is the fold in which it is evaluated.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from pathlib import Path, PurePosixPath

import pandas as pd
from tqdm import tqdm

from ..console import show_progress
from ..errors import Tile2AudioError
from ._files import MISSING, file_problem, require_dir, summarise
from .schema import assemble, to_posix

log = logging.getLogger(__name__)

LABELS: tuple[str, ...] = (
    "absence", "cooking", "dishwashing", "eating", "other",
    "social_activity", "vacuum_cleaner", "watching_tv", "working",
)
_EVALUATE_FILE = re.compile(r"^fold(\d+)_evaluate\.txt$")
_NODE = re.compile(r"Node(\d+)_")


def load(
    root: str | os.PathLike,
    *,
    check_files: bool = True,
    progress: bool = True,
) -> pd.DataFrame:
    """Manifest of the DCASE 2018 task 5 development set.

    Parameters
    ----------
    root : str or path-like
        Folder with ``meta.txt``, ``audio/`` and ``evaluation_setup/`` (see the module
        docstring).
    check_files : bool
        Drop (with a warning that counts them) clips whose audio file is missing.
    progress : bool
        Show a progress bar while checking files.

    Returns
    -------
    pandas.DataFrame
        Shape (n_clips, 8): the manifest columns (clip_id = file name without extension,
        label from ``meta.txt``, split ``""``, fold = the fold that evaluates the clip
        (from ``fold<i>_evaluate.txt``; empty when none does), group = recording
        session) and ``node`` (Int64, the sensor node number from the file name).
        Labels outside the nine task-5 classes are kept with a warning.
    """
    root = require_dir(root, "DCASE 2018 task 5 root")
    meta_path = root / "meta.txt"
    if not meta_path.is_file():
        raise Tile2AudioError(f"{root} does not look like DCASE 2018 task 5: no meta.txt")
    files, labels, sessions = _read_meta(meta_path)
    fold_of, session_of = _read_evaluation_setup(root / "evaluation_setup")
    if check_files:
        files, labels, sessions = _drop_missing(root, files, labels, sessions, progress)
    _check_labels(labels)
    sessions = [s or session_of.get(f, "") for f, s in zip(files, sessions)]
    unknown_eval = sorted(set(fold_of) - set(files))
    if unknown_eval:
        log.warning("DCASE2018: %d file(s) in the evaluate lists are not in meta.txt (or not on disk): %s",
                    len(unknown_eval), summarise(unknown_eval))
    folds = [fold_of.get(f) for f in files]
    never = sum(f is None for f in folds)
    if fold_of and never:
        log.warning("DCASE2018: %d clip(s) are evaluated in no fold; their fold is empty", never)
    df = assemble(
        {"clip_id": [PurePosixPath(f).stem for f in files], "path": files, "root": str(root),
         "label": labels, "fold": folds, "group": sessions},
        extras={"node": pd.array([_node(f) for f in files], dtype="Int64")},
    )
    log.info("dcase2018: %d clips, %d labels, %d sessions", len(df), df["label"].nunique(), df["group"].nunique())
    return df


def _read_tsv(path: Path) -> list[list[str]]:
    """Non-empty rows of a tab-separated file, fields stripped."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        rows = [[field.strip() for field in row] for row in csv.reader(fh, delimiter="\t")]
    return [row for row in rows if any(row)]


def _read_meta(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(file, label, session) columns of meta.txt; files as POSIX paths relative to ROOT."""
    files, labels, sessions = [], [], []
    for lineno, row in enumerate(_read_tsv(path), start=1):
        if len(row) < 2:
            raise Tile2AudioError(
                f"{path}: row {lineno} has {len(row)} field(s); expected file<TAB>label<TAB>session"
            )
        files.append(to_posix(row[0]))
        labels.append(row[1])
        sessions.append(row[2] if len(row) > 2 else "")
    if not files:
        raise Tile2AudioError(f"{path} lists no clips")
    return files, labels, sessions


def _read_evaluation_setup(setup_dir: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Fold that evaluates each file, and sessions seen in the fold lists."""
    fold_of: dict[str, int] = {}
    session_of: dict[str, str] = {}
    if not setup_dir.is_dir():
        log.warning("DCASE2018: no %s; folds are left empty", setup_dir)
        return fold_of, session_of
    evaluate = sorted(
        (int(m.group(1)), p) for p in setup_dir.iterdir() if (m := _EVALUATE_FILE.match(p.name))
    )
    if not evaluate:
        log.warning("DCASE2018: %s has no fold<i>_evaluate.txt; folds are left empty", setup_dir)
    twice = []
    for fold, path in evaluate:
        for row in _read_tsv(path):
            f = to_posix(row[0])
            if f in fold_of and fold_of[f] != fold:
                twice.append(f)
                continue
            fold_of[f] = fold
            if len(row) > 2 and row[2]:
                session_of.setdefault(f, row[2])
    if twice:
        log.warning("DCASE2018: %d file(s) are evaluated in more than one fold; keeping the first: %s",
                    len(twice), summarise(twice))
    for path in sorted(setup_dir.glob("fold*_train.txt")):
        for row in _read_tsv(path):
            if len(row) > 2 and row[2]:
                session_of.setdefault(to_posix(row[0]), row[2])
    return fold_of, session_of


def _drop_missing(root: Path, files: list[str], labels: list[str], sessions: list[str],
                  progress: bool) -> tuple[list[str], list[str], list[str]]:
    """Remove rows whose audio file does not exist, with a warning."""
    keep = [file_problem(root / f) != MISSING
            for f in tqdm(files, desc="dcase2018: checking files", unit="file", disable=not show_progress(progress))]
    missing = [f for f, k in zip(files, keep) if not k]
    if missing:
        log.warning("DCASE2018: dropped %d clip(s) listed in meta.txt whose audio is missing: %s",
                    len(missing), summarise(missing))
    if not any(keep):
        raise Tile2AudioError(f"none of the {len(files)} files listed in {root / 'meta.txt'} exist under {root}")
    return tuple([x for x, k in zip(column, keep) if k] for column in (files, labels, sessions))


def _check_labels(labels: list[str]) -> None:
    """Warn about labels outside the nine task-5 classes."""
    unknown = sorted(set(labels) - set(LABELS))
    if unknown:
        n = sum(label not in LABELS for label in labels)
        log.warning("DCASE2018: %d clip(s) have label(s) outside the task-5 classes: %s",
                    n, summarise(unknown))


def _node(file: str) -> int | None:
    """Sensor node number from ``DevNode<n>_ex<k>_<m>.wav``, or None."""
    m = _NODE.search(PurePosixPath(file).name)
    return int(m.group(1)) if m else None
