"""Atomic file writes: write a temporary file beside the target, then rename it.

A reader (or a resumed run) therefore sees either the old file or the complete new one,
never a half-written file, even when the writer is killed with SIGKILL.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

from .errors import Tile2AudioError

_UMASK = os.umask(0)
os.umask(_UMASK)


def ensure_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (and parents) if needed and check that it is a writable folder.

    Called where an output path enters a stage, so that an ``-o`` naming a file, a
    read-only folder or a missing permission is one clear line before any work starts.

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        How the message names the folder (``"feature cache folder"``, ...).

    Returns
    -------
    Path
        The absolute folder path.
    """
    p = Path(path).absolute()
    if p.exists() and not p.is_dir():
        raise Tile2AudioError(f"{p}: the {what} is an existing file, not a folder; choose another path")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise Tile2AudioError(f"{p}: cannot create the {what}: {exc.strerror or exc}") from exc
    if not os.access(p, os.W_OK | os.X_OK):
        raise Tile2AudioError(f"{p}: the {what} is not writable (permission denied)")
    return p


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file owner-only; give it the permissions a plain open() would.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; it replaces ``path`` when the block ends cleanly."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    """Make numpy scalars and arrays JSON-serialisable."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """Save one array as .npy atomically (no pickled objects)."""
    with atomic_open(path, "wb") as fh:
        np.save(fh, np.asarray(array), allow_pickle=False)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Save arrays as an uncompressed .npz atomically (no pickled objects)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    with atomic_open(path, "wb") as fh:
        fh.write(buf.getvalue())


def write_csv(path: str | os.PathLike, frame: "Any", **kwargs: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (``index=False`` unless given)."""
    kwargs.setdefault("index", False)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        frame.to_csv(fh, **kwargs)
