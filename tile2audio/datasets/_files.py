"""File-system helpers shared by the manifest sources (existence and cheap health checks)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import soundfile as sf

from ..errors import Tile2AudioError

AUDIO_EXTENSIONS: tuple[str, ...] = (
    ".wav", ".flac", ".ogg", ".mp3", ".au", ".aiff", ".aif", ".m4a", ".opus",
)

MISSING = "missing"
ZERO_BYTE = "zero-byte"
UNREADABLE = "unreadable"


def require_dir(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as an absolute Path, or raise if it is not a folder."""
    p = Path(os.path.abspath(os.fspath(path)))
    if not p.exists():
        raise Tile2AudioError(f"{what} not found: {p}")
    if not p.is_dir():
        raise Tile2AudioError(f"{what} must be a folder, got a file: {p}")
    return p


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as an absolute Path, or raise if it is not a file."""
    p = Path(os.path.abspath(os.fspath(path)))
    if not p.is_file():
        raise Tile2AudioError(f"{what} not found: {p}")
    return p


def file_problem(path: Path, decode: bool = False) -> str:
    """``""`` for a usable file, else ``missing``, ``zero-byte`` or (with ``decode``) ``unreadable``."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return MISSING
    except OSError:
        return UNREADABLE
    if size == 0:
        return ZERO_BYTE
    if decode:
        try:
            sf.info(str(path))
        except (sf.SoundFileError, RuntimeError, OSError, ValueError, TypeError):
            # a bad header surfaces as any of these depending on the format; all mean unreadable
            return UNREADABLE
    return ""


def summarise(items: Sequence[str], limit: int = 5) -> str:
    """A short comma-separated preview of ``items`` for log messages."""
    items = list(items)
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more
