"""The manifest schema: one table of clips for every source, and its validation.

A manifest is a CSV with the columns :data:`MANIFEST_COLUMNS`, in that order, then any
source-specific extras::

    clip_id, path, root, label, split, fold, group[, extras...]

``path`` is relative to ``root`` (POSIX separators); ``label``, ``split`` and ``group``
are strings with ``""`` for missing; ``fold`` is a pandas ``Int64`` column (``<NA>`` for
missing, written as an empty cell).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..atomic import write_csv
from ..errors import Tile2AudioError

MANIFEST_COLUMNS: tuple[str, ...] = ("clip_id", "path", "root", "label", "split", "fold", "group")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
TEXT_COLUMNS: tuple[str, ...] = ("clip_id", "path", "root", "label", "split", "group")
#: Prefix that keeps a clip's own group apart from any real group name (see :func:`group_or_self`).
OWN_GROUP_PREFIX = "\x00clip:"
_INT_TEXT = re.compile(r"^\s*(\d+)(?:\.0*)?\s*$")
_MAX_SHOWN = 5


def is_missing(value: Any) -> bool:
    """True for None, NaN, pd.NA and NaT."""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # array-like cells are not "missing"
        return False


def text_column(table: pd.DataFrame, name: str, *, strip: bool = False) -> np.ndarray:
    """One clip-table column as strings, ``""`` for missing cells or a missing column.

    Parameters
    ----------
    table : pandas.DataFrame, n_clips rows
    name : str
        Column name (``label``, ``split``, ``group``, ...).
    strip : bool
        Also strip surrounding white space (the sampler's reading of labels and groups).

    Returns
    -------
    np.ndarray
        object array of str, shape (n_clips,).
    """
    if name not in table.columns:
        return np.full(len(table), "", dtype=object)
    text = table[name].fillna("").astype(str)
    return (text.str.strip() if strip else text).to_numpy(dtype=object)


def group_or_self(groups: Sequence[str], clip_ids: Sequence[str], prefix: str = OWN_GROUP_PREFIX) -> np.ndarray:
    """Each clip's group, where a clip without one (``""``) is its own group.

    Parameters
    ----------
    groups, clip_ids : sequences of str, length n_clips
    prefix : str
        Put before a clip id used as a group. The default cannot collide with a real
        group name; the training probe callback passes ``""`` (its splits predate it).

    Returns
    -------
    np.ndarray
        object array of str, shape (n_clips,).
    """
    g = np.asarray(groups, dtype=object)
    own = np.asarray([prefix + str(c) for c in clip_ids], dtype=object)
    return np.where(g == "", own, g)


def _as_text(series: pd.Series) -> pd.Series:
    """Strings with ``""`` for missing cells (whatever the input dtype)."""
    return pd.Series(
        ["" if is_missing(v) else str(v) for v in series], index=series.index, dtype=str
    )


def _rows_text(df: pd.DataFrame, positions: Iterable[int]) -> str:
    """Describe a few rows as 'data row N (clip_id ...)' for error messages."""
    positions = list(positions)
    parts = []
    for pos in positions[:_MAX_SHOWN]:
        cid = df["clip_id"].iloc[pos] if "clip_id" in df.columns else ""
        parts.append(f"data row {pos + 1}" + (f" (clip_id {cid!r})" if cid not in ("", None) else ""))
    more = f" and {len(positions) - _MAX_SHOWN} more" if len(positions) > _MAX_SHOWN else ""
    return ", ".join(parts) + more


def parse_fold_value(value: Any) -> int | None:
    """One fold cell as an int (None when empty); raise ValueError when not an integer >= 0."""
    if is_missing(value):
        return None
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") in "iu"):
        if int(value) < 0:
            raise ValueError(value)
        return int(value)
    if isinstance(value, float) or (hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"):
        if not float(value).is_integer() or value < 0:
            raise ValueError(value)
        return int(value)
    text = str(value)
    if text.strip() == "":
        return None
    m = _INT_TEXT.match(text)
    if not m:
        raise ValueError(value)
    return int(m.group(1))


def fold_column(df: pd.DataFrame, name: str = "manifest") -> pd.Series:
    """``df["fold"]`` as pandas Int64 (NA for empty cells), or raise naming the bad rows (not integers >= 0)."""
    values, bad = [], []
    for pos, v in enumerate(df["fold"]):
        try:
            values.append(parse_fold_value(v))
        except ValueError:
            values.append(None)
            bad.append(pos)
    if bad:
        examples = ", ".join(repr(df["fold"].iloc[p]) for p in bad[:_MAX_SHOWN])
        raise Tile2AudioError(
            f"{name}: column 'fold' must hold non-negative integers or be empty; "
            f"bad value(s) {examples} at {_rows_text(df, bad)}"
        )
    return pd.array(values, dtype="Int64")


def validate_manifest(df: pd.DataFrame, *, name: str = "manifest",
                      required: Sequence[str] = MANIFEST_COLUMNS) -> pd.DataFrame:
    """Check a manifest table and return a normalised copy.

    Parameters
    ----------
    df : pandas.DataFrame
        A table with at least the columns :data:`MANIFEST_COLUMNS` (any order), one row
        per clip, and any extra columns.
    name : str
        What to call the table in error messages (e.g. the CSV's path).
    required : sequence of str
        The schema columns that must be present; any other schema column that is
        absent is added empty. The default requires all of them (a manifest CSV);
        :func:`tile2audio.features.build_cache` requires only ``clip_id`` and ``path``
        of a DataFrame it is given.

    Returns
    -------
    pandas.DataFrame
        A copy, shape (n_clips, 7 + n_extras), with the schema columns first (in order)
        then the extras in their original order; ``clip_id``, ``path``, ``root``,
        ``label``, ``split``, ``group`` as str (``""`` for missing), ``fold`` as ``Int64``;
        a fresh 0..n-1 index.

    Raises
    ------
    Tile2AudioError
        A required column is missing; ``clip_id`` is empty or duplicated; ``path`` is
        empty; ``split`` is not one of train / valid / test / empty; ``fold`` is not an
        integer. The message names the column and the offending rows.
    """
    if not isinstance(df, pd.DataFrame):
        raise Tile2AudioError(f"{name}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise Tile2AudioError(
            f"{name}: missing required column(s) {', '.join(missing)}; a manifest needs "
            f"{', '.join(MANIFEST_COLUMNS)} (found: {', '.join(map(str, df.columns)) or 'none'})"
        )
    df = df.assign(**{c: [""] * len(df) for c in MANIFEST_COLUMNS if c not in df.columns})
    extras = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    out = df.loc[:, list(MANIFEST_COLUMNS) + extras].reset_index(drop=True).copy()
    for col in TEXT_COLUMNS:
        out[col] = _as_text(out[col])
    _check_clip_ids(out, name)
    empty_path = [i for i, p in enumerate(out["path"]) if p.strip() == ""]
    if empty_path:
        raise Tile2AudioError(f"{name}: column 'path' is empty at {_rows_text(out, empty_path)}")
    out["split"] = out["split"].str.strip()
    bad_split = [i for i, s in enumerate(out["split"]) if s not in SPLITS and s != ""]
    if bad_split:
        values = sorted({out["split"].iloc[i] for i in bad_split})
        raise Tile2AudioError(
            f"{name}: column 'split' must be one of {', '.join(SPLITS)} or empty; found "
            f"{', '.join(map(repr, values[:_MAX_SHOWN]))} at {_rows_text(out, bad_split)}"
        )
    out["fold"] = fold_column(out, name)
    return out


def _check_clip_ids(df: pd.DataFrame, name: str) -> None:
    """Raise if a clip_id is empty or appears twice."""
    empty = [i for i, c in enumerate(df["clip_id"]) if c.strip() == ""]
    if empty:
        raise Tile2AudioError(f"{name}: column 'clip_id' is empty at {_rows_text(df, empty)}")
    dup_mask = df["clip_id"].duplicated(keep=False)
    if dup_mask.any():
        dups = df.loc[dup_mask, "clip_id"]
        shown = ", ".join(repr(c) for c in dups.unique()[:_MAX_SHOWN])
        positions = [i for i, d in enumerate(dup_mask) if d]
        raise Tile2AudioError(
            f"{name}: column 'clip_id' must be unique; {dups.nunique()} duplicate clip_id value(s) "
            f"({shown}) at {_rows_text(df, positions)}"
        )


def read_manifest(path: str | os.PathLike) -> pd.DataFrame:
    """Read and validate a manifest CSV.

    Parameters
    ----------
    path : str or path-like
        A CSV written by :func:`write_manifest` (or by hand) with the schema columns.

    Returns
    -------
    pandas.DataFrame
        Shape (n_clips, 7 + n_extras); see :func:`validate_manifest`. Extra columns are
        read as str (``""`` for empty cells).

    Raises
    ------
    Tile2AudioError
        The file is missing, is not a readable CSV, or breaks the schema (the message
        names the column and rows).
    """
    path = Path(path)
    if not path.is_file():
        raise Tile2AudioError(f"manifest not found: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8")
    except pd.errors.EmptyDataError as exc:
        raise Tile2AudioError(f"manifest {path} is empty (no header row)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise Tile2AudioError(f"manifest {path} is not a readable CSV: {exc}") from exc
    return validate_manifest(df, name=f"manifest {path}")


def write_manifest(df: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate ``df`` and write it as a manifest CSV, atomically.

    Parameters
    ----------
    df : pandas.DataFrame
        Shape (n_clips, 7 + n_extras), the schema columns plus extras.
    path : str or path-like
        Target CSV; parent folders are created.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    clean = validate_manifest(df)
    write_csv(path, clean, na_rep="")
    return Path(path)


def resolve_paths(df: pd.DataFrame, root: str | os.PathLike | None = None) -> list[Path]:
    """Absolute audio paths of a manifest's clips.

    Parameters
    ----------
    df : pandas.DataFrame
        A manifest, shape (n_clips, >= 7).
    root : str or path-like, optional
        Data root to use instead of each row's ``root`` (for data that moved).

    Returns
    -------
    list of pathlib.Path
        Length n_clips, ``root / path`` in row order.
    """
    for col in ("path", "root"):
        if col not in df.columns:
            raise Tile2AudioError(f"manifest has no '{col}' column; cannot resolve audio paths")
    paths = _as_text(df["path"])
    if root is not None:
        base = Path(root)
        return [base / p for p in paths]
    roots = _as_text(df["root"])
    no_root = [i for i, r in enumerate(roots) if r == ""]
    if no_root:
        raise Tile2AudioError(
            f"manifest rows have an empty 'root' ({len(no_root)} row(s), first data row "
            f"{no_root[0] + 1}); pass root=... to resolve their paths"
        )
    return [Path(r) / p for r, p in zip(roots, paths)]


def assemble(columns: Mapping[str, Any], extras: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Build a validated manifest from per-column values (missing schema columns become empty).

    Parameters
    ----------
    columns : mapping
        Schema column name -> sequence of n values (``clip_id`` and ``path`` required;
        ``root`` may be a single string).
    extras : mapping, optional
        Extra column name -> sequence of n values, kept after the schema columns.

    Returns
    -------
    pandas.DataFrame
        Shape (n, 7 + len(extras)), normalised by :func:`validate_manifest`.
    """
    n = len(columns["clip_id"])
    data: dict[str, Any] = {}
    for col in MANIFEST_COLUMNS:
        value = columns.get(col)
        if value is None:
            value = [pd.NA] * n if col == "fold" else [""] * n
        elif isinstance(value, str):
            value = [value] * n
        data[col] = list(value)
    for col, value in (extras or {}).items():
        data[col] = list(value)
    return validate_manifest(pd.DataFrame(data, columns=list(data)))


def to_posix(relative: str | os.PathLike) -> str:
    """A relative path as a POSIX string (Windows separators converted)."""
    return str(relative).replace("\\", "/")
