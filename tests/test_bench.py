"""The benchmark scripts keep working (smoke mode); they assert nothing about speed."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_predict_benchmark_smoke_prints_its_figures(ham_dir):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_predict.py"), "--smoke"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    for figure in ("load (safetensors, default)", "single-image latency", "predict_batch", "ratio batch / loop"):
        assert figure in run.stdout
