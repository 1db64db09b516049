"""A user's CSV of clips (the ``csv`` source): manifest loader.

The CSV needs a column of audio paths (relative to ``root``, by default the CSV's own
folder, or absolute); the other columns can be mapped to label, split, fold, group and
clip_id. Example (UrbanSound8K-style)::

    path,class,fold,source_id
    fold1/101415-3-0-2.ogg,dog_bark,fold1,101415

    build_manifest("csv", "labels.csv", label_column="class", fold_column="fold",
                   group_column="source_id")
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path, PurePosixPath

import pandas as pd

from ..errors import Tile2AudioError
from ._files import MISSING, file_problem, require_dir, require_file, summarise
from .schema import MANIFEST_COLUMNS, assemble, to_posix

log = logging.getLogger(__name__)

SPLIT_ALIASES: dict[str, str] = {
    "train": "train", "training": "train",
    "valid": "valid", "validation": "valid", "val": "valid",
    "test": "test", "evaluation": "test", "eval": "test",
    "": "",
}
# the trailing integer ("fold1", "Fold 1", "f_1", "1"), but not the decimals of "1.5"
_FOLD_TEXT = re.compile(r"^(?:.*[^\d.])?(\d+)$")
_FOLD_FLOAT = re.compile(r"^(\d+)\.0*$")


def load(
    csv_path: str | os.PathLike,
    *,
    path_column: str = "path",
    label_column: str | None = None,
    split_column: str | None = None,
    fold_column: str | None = None,
    group_column: str | None = None,
    clip_id_column: str | None = None,
    root: str | os.PathLike | None = None,
    check_files: bool = True,
) -> pd.DataFrame:
    """Manifest from a user's CSV.

    Parameters
    ----------
    csv_path : str or path-like
        The CSV (comma separated, one header row).
    path_column : str
        Column of audio paths, relative to ``root`` (or absolute).
    label_column, split_column, fold_column, group_column, clip_id_column : str, optional
        Columns to use as label, split, fold, group and clip_id. Split values are mapped
        case-insensitively (training -> train, validation / val -> valid,
        evaluation / eval -> test); fold values like ``fold1`` or ``1`` become the
        integer 1. Without ``clip_id_column`` the clip_id is the path without extension.
    root : str or path-like, optional
        Data root the paths are relative to; default: the CSV's folder.
    check_files : bool
        Drop (with a warning that counts them) rows whose audio file does not exist.

    Returns
    -------
    pandas.DataFrame
        Shape (n_rows, 7 + n_extras): the manifest columns, then every CSV column not
        mapped above as an extra (one whose name is a manifest column is kept as
        ``orig_<name>``).
    """
    csv_path = require_file(csv_path, "CSV")
    root = require_dir(root if root is not None else csv_path.parent, "data root")
    table = _read_csv(csv_path)
    mapped = {"path": path_column, "label": label_column, "split": split_column,
              "fold": fold_column, "group": group_column, "clip_id": clip_id_column}
    _check_columns(table, mapped, csv_path)
    table = table.assign(**{"__path": _relative_paths(table[path_column], root)})
    if check_files:
        table = _drop_missing(table, root, csv_path)
    rel = table["__path"].tolist()
    columns = {
        "clip_id": table[clip_id_column].tolist() if clip_id_column else
        [str(PurePosixPath(p).with_suffix("")) for p in rel],
        "path": rel, "root": str(root),
        "label": table[label_column].tolist() if label_column else None,
        "split": _map_splits(table[split_column], split_column, csv_path) if split_column else None,
        "fold": _parse_folds(table[fold_column], fold_column, csv_path) if fold_column else None,
        "group": table[group_column].tolist() if group_column else None,
    }
    df = assemble(columns, extras=_extras(table, set(c for c in mapped.values() if c)))
    log.info("csv: %d clips from %s (root %s)", len(df), csv_path, root)
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    """The CSV as strings, ``""`` for empty cells, values stripped."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except pd.errors.EmptyDataError as exc:
        raise Tile2AudioError(f"CSV {path} is empty") from exc
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise Tile2AudioError(f"CSV {path} is not readable: {exc}") from exc
    table.columns = [str(c).strip() for c in table.columns]
    for col in table.columns:
        table[col] = table[col].str.strip()
    if table.empty:
        raise Tile2AudioError(f"CSV {path} has a header but no rows")
    return table


def _check_columns(table: pd.DataFrame, mapped: dict[str, str | None], path: Path) -> None:
    """Raise if a requested column is not in the CSV."""
    for role, col in mapped.items():
        if col is not None and col not in table.columns:
            raise Tile2AudioError(
                f"CSV {path} has no column {col!r} (asked for as {role}_column); "
                f"its columns are: {', '.join(table.columns)}"
            )


def _relative_paths(values: pd.Series, root: Path) -> list[str]:
    """POSIX paths relative to ``root`` (absolute paths outside it are kept absolute)."""
    out, outside = [], 0
    for pos, value in enumerate(values):
        if value == "":
            raise Tile2AudioError(f"the path column is empty at data row {pos + 1}")
        p = Path(to_posix(value))
        if p.is_absolute():
            try:
                p = p.relative_to(root)
            except ValueError:
                outside += 1
        out.append(p.as_posix())
    if outside:
        log.warning("csv: %d absolute path(s) lie outside the data root %s and are kept absolute", outside, root)
    return out


def _drop_missing(table: pd.DataFrame, root: Path, csv_path: Path) -> pd.DataFrame:
    """Rows whose audio exists; the others are dropped with a warning."""
    missing = [file_problem(root / p) == MISSING for p in table["__path"]]
    if all(missing):
        raise Tile2AudioError(
            f"none of the {len(missing)} audio paths in {csv_path} exist under {root}; "
            f"pass root=... if they are relative to another folder"
        )
    if any(missing):
        lost = table.loc[missing, "__path"].tolist()
        log.warning("csv: dropped %d row(s) whose audio file is missing: %s", len(lost), summarise(lost))
    return table.loc[[not m for m in missing]]


def parse_fold(value: str) -> int | None:
    """``"fold1"`` / ``"1"`` -> 1, ``""`` -> None; raise ValueError otherwise."""
    value = value.strip()
    if value == "":
        return None
    m = _FOLD_FLOAT.match(value) or _FOLD_TEXT.match(value)
    if not m:
        raise ValueError(value)
    return int(m.group(1))


def _parse_folds(values: pd.Series, column: str, path: Path) -> list[int | None]:
    """Integer folds, or raise naming the first bad row."""
    out = []
    for pos, value in enumerate(values):
        try:
            out.append(parse_fold(value))
        except ValueError:
            raise Tile2AudioError(
                f"CSV {path}: column {column!r} data row {pos + 1} has fold {value!r}; expected an "
                f"integer such as 1 or fold1"
            ) from None
    return out


def _map_splits(values: pd.Series, column: str, path: Path) -> list[str]:
    """Split names mapped to train / valid / test / ''."""
    lowered = values.str.lower()
    bad = sorted(set(lowered) - set(SPLIT_ALIASES))
    if bad:
        raise Tile2AudioError(
            f"CSV {path}: column {column!r} has split value(s) {', '.join(map(repr, bad[:5]))}; "
            f"expected one of {', '.join(sorted(k for k in SPLIT_ALIASES if k))} or empty"
        )
    return [SPLIT_ALIASES[v] for v in lowered]


def _extras(table: pd.DataFrame, used: set[str]) -> dict[str, list]:
    """Unmapped CSV columns, renamed ``orig_<name>`` when they clash with the schema."""
    extras = {}
    for col in table.columns:
        if col in used or col == "__path":
            continue
        name = f"orig_{col}" if col in MANIFEST_COLUMNS else col
        if name != col:
            hint = f" (pass {col}_column={col!r} to use it)" if col not in ("path", "root") else ""
            log.warning("csv: column %r is not mapped%s; kept as %r", col, hint, name)
        extras[name] = table[col].tolist()
    return extras
