"""The package's one exception type."""


class Tile2AudioError(Exception):
    """Raised for any bad input or state that tile2audio detects itself.

    The message always says what was wrong and, where it can, what to do about it.
    """
