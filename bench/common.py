"""What the benchmark scripts share: where this checkout and the shared data are, and a clock that waits for the GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SKINCANCER_SHARED_DATA", ROOT.parent / "shared" / "data"))
sys.path.insert(0, str(ROOT))  # this checkout's package, installed or not
import skincancer  # noqa: E402, F401  (its warning filters, before a bench imports fastai)


def sync() -> None:
    """Wait for the GPU, so host clocks measure finished work."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
