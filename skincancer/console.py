"""What a long run shows: progress bars on a terminal, never carriage-return fragments in a log."""

from __future__ import annotations

import sys


def on_terminal() -> bool:
    """Whether standard output is a terminal or a notebook, where progress bars belong."""
    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stdout, "isatty", lambda: False)())
