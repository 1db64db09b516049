"""What the package writes to the console besides log lines: progress bars only on a terminal."""

from __future__ import annotations

import sys
from typing import IO


def show_progress(progress: bool = True, stream: IO | None = None) -> bool:
    """True when a progress bar is wanted and ``stream`` is an interactive terminal.

    tqdm redraws its bar with carriage returns, which pile up as noise in log files, CI
    logs and pipes; every tqdm call site passes ``disable=not show_progress(progress)``.

    Parameters
    ----------
    progress : bool
        The caller's wish (``False`` for ``--quiet``).
    stream : file object, optional
        Where the bar would go; default ``sys.stderr`` (tqdm's default).

    Returns
    -------
    bool
    """
    if not progress:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False
