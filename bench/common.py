"""What the benchmark scripts share: where this checkout and the shared data are, and a clock that waits for the GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKINCANCER_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))  # this checkout's package, installed or not
import skincancer  # noqa: E402, F401  (its warning filters, before a bench imports fastai)


def write_csv(path: str | Path, rows: list[dict]) -> Path:
    """A bench's measured rows as CSV, one value a cell, written atomically (every row's keys, in order of first use;
    a row without one leaves its cell empty)."""
    import csv
    import io

    from skincancer.files import write_text_atomic

    columns = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, text.getvalue())


def sync() -> None:
    """Wait for the GPU, so host clocks measure finished work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
