"""``python -m tile2audio`` runs the command line."""

from .cli import main

raise SystemExit(main())
