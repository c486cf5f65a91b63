"""The one error type the package raises for bad input and unmet preconditions."""

from __future__ import annotations


class SkinCancerError(Exception):
    """Bad input or an unmet precondition; the message names the file or field and what is wrong."""


def first_few(items, n: int = 5) -> str:
    """Format up to `n` offenders and say how many more there are."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:n])
    return shown + (f", ... ({len(items) - n} more)" if len(items) > n else "")
