"""The benchmark scripts keep working (smoke mode); they assert nothing about speed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


def smoke(script: str, *args: str) -> str:
    """Run a benchmark script's --smoke mode; return its stdout after checking that it exited 0."""
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--smoke", *args],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_predict_benchmark_smoke_prints_its_figures(ham_dir):
    stdout = smoke("bench_predict.py")
    for figure in ("load (safetensors, default)", "single-image latency", "predict_batch", "ratio batch / loop"):
        assert figure in stdout


def test_training_benchmark_smoke_runs_both_recipes_and_prints_the_ratio(ham_dir, tmp_path):
    import json

    out = tmp_path / "runs.jsonl"
    # another training seed: the bench checks the split is one
    variant = "ours+loss_on_device=true+reproducible=false+size=48+seed=7"
    stdout = smoke("bench_train.py", "--size", "40", "--runs", f"seed,ours,{variant}", "--out", str(out))
    assert "ratio ours / seed, images/s end to end" in stdout
    assert f"ratio {variant} / ours, images/s end to end" in stdout and "steady" in stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["name"] for r in rows] == ["seed", "ours", variant]
    assert [r["settings"]["size"] for r in rows] == [40, 40, 48]  # --size is all runs', unless a run says
    assert [r["settings"]["loss_on_device"] for r in rows[1:]] == [False, True]
    assert [r["settings"]["reproducible"] for r in rows[1:]] == [True, False]
    assert [r["settings"]["seed"] for r in rows[1:]] == [42, 7]
    for r in rows:
        assert r["images_per_s"] > 0 and r["epochs"] == 1 and 0 <= r["valid_auroc"] <= 1
        assert 0 < r["valid_share"] < 1  # validation is timed as part of each epoch
    assert rows[1]["settings"]["cache"] is True
    # the variant against ours on the same valid images: the difference of the two AUROCs, with its interval
    for split in ("valid", "test"):
        paired = rows[2]["vs_first_ours"][split]["auroc"]
        assert paired["difference"] == pytest.approx(rows[2][f"{split}_auroc"] - rows[1][f"{split}_auroc"], abs=1e-9)
        assert -1 <= paired["ci95"][0] <= paired["ci95"][1] <= 1 and 0 < paired["p_value"] <= 1
        assert f"{split} auroc {variant} - ours:" in stdout
    assert "vs_first_ours" not in rows[1]


def test_augmentation_benchmark_smoke_times_both_pipelines(ham_dir):
    stdout = smoke("bench_augment.py")
    for figure in ("two-pass", "one-pass", "ms/batch", "ratio one-pass / two-pass, images/s",
                   "ratio ours / fastai's transforms, one-pass"):
        assert figure in stdout
