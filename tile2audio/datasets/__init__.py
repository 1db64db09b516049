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
