"""Dataset manifests: one table of clips, one schema, for every source.

``build_manifest(source, root, **options)`` runs the source's loader
(:data:`SOURCES`) and returns a validated DataFrame with the columns
``clip_id, path, root, label, split, fold, group`` then source extras; see
:mod:`tile2audio.datasets.schema` and each source module for the expected layouts.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from ..errors import Tile2AudioError
from . import dcase2018, fma, folder, gtzan, table
from .schema import (
    MANIFEST_COLUMNS,
    SPLITS,
    read_manifest,
    resolve_paths,
    validate_manifest,
    write_manifest,
)

SOURCES: dict[str, Callable[..., pd.DataFrame]] = {
    "gtzan": gtzan.load,
    "fma": fma.load,
    "dcase2018": dcase2018.load,
    "folder": folder.load,
    "csv": table.load,
}

__all__ = [
    "MANIFEST_COLUMNS",
    "SOURCES",
    "SPLITS",
    "build_manifest",
    "merge_manifests",
    "read_manifest",
    "resolve_paths",
    "validate_manifest",
    "write_manifest",
]


def build_manifest(source: str, root: str | os.PathLike, /, **options: Any) -> pd.DataFrame:
    """Build the manifest of a data set.

    Parameters
    ----------
    source : str
        One of :data:`SOURCES`: ``gtzan``, ``fma``, ``dcase2018``, ``folder``, ``csv``.
    root : str or path-like
        The data root (for ``csv``: the CSV file).
    **options
        Passed to the source's loader, e.g. ``split_dir=`` (gtzan), ``subset=`` (fma),
        ``label_column=`` (csv; also ``root=`` for the data root of the CSV's paths).

    Returns
    -------
    pandas.DataFrame
        Shape (n_clips, 7 + n_extras), validated (see
        :func:`~tile2audio.datasets.schema.validate_manifest`).

    Raises
    ------
    Tile2AudioError
        Unknown source, missing root, an option the source does not take, or a problem
        the loader detects.
    """
    loader = SOURCES.get(source)
    if loader is None:
        raise Tile2AudioError(f"unknown manifest source {source!r}; known sources: {', '.join(SOURCES)}")
    if root is None or str(root) == "":
        raise Tile2AudioError(f"the {source} source needs a data root")
    if not Path(root).exists():
        what = "CSV file" if source == "csv" else "data root"
        raise Tile2AudioError(f"{what} for source {source!r} not found: {root}")
    _check_options(source, loader, options)
    return validate_manifest(loader(root, **options), name=f"{source} manifest")


def _check_options(source: str, loader: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise naming the accepted options when ``options`` has one the loader does not take."""
    params = inspect.signature(loader).parameters
    accepted = [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise Tile2AudioError(
            f"source {source!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )


def merge_manifests(manifests: dict[str, "str | os.PathLike | pd.DataFrame"]) -> pd.DataFrame:
    """One manifest over several data sets, e.g. to train one encoder on all their audio.

    Parameters
    ----------
    manifests : dict of str to manifest
        Name -> manifest CSV path or DataFrame. The name prefixes every clip id and every
        non-empty group (``name/clip_id``), so ids and groups of different sets never
        collide, and goes into a ``source`` column. Each row keeps its own ``root``, so
        the sets may live in different folders.

    Returns
    -------
    pandas.DataFrame
        Shape (sum of n_clips, 8 + extras), validated; extra columns missing in one set
        are ``""`` there. Labels are kept as they are: training is label-free, and a
        probe should use each set's own manifest (``tile2audio embed RUN set.csv``).

    Raises
    ------
    Tile2AudioError
        No manifest, a name that is empty or holds ``/``, or a manifest that fails
        :func:`read_manifest`.
    """
    if not manifests:
        raise Tile2AudioError("merge_manifests needs at least one manifest")
    parts = []
    for name, m in manifests.items():
        if not name or "/" in name:
            raise Tile2AudioError(f"manifest name {name!r} must be non-empty and hold no '/'")
        df = read_manifest(m) if not isinstance(m, pd.DataFrame) else validate_manifest(m.copy(), name=name)
        df = df.copy()
        df["clip_id"] = name + "/" + df["clip_id"].astype(str)
        df["group"] = [f"{name}/{g}" if g else "" for g in df["group"].astype(str)]
        df["source"] = name
        parts.append(df)
    merged = pd.concat(parts, ignore_index=True, sort=False)
    extras = [c for c in merged.columns if c not in MANIFEST_COLUMNS]
    merged[extras] = merged[extras].fillna("")
    return validate_manifest(merged[list(MANIFEST_COLUMNS) + extras], name="merged manifest")
