"""`make demo`: the whole pipeline offline on the sample shipped in data/sample, as the Makefile runs it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import pandas as pd
import pytest
from pathlib import Path

from conftest import ROOT

SAMPLE = ROOT / "data" / "sample"


def demo_commands() -> list[list[str]]:
    """The `demo` target's commands, as argument lists for `python`."""
    text = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", text, re.M).group(1).replace("\\\n", " ")
    return [shlex.split(line.strip().replace("$(PY) ", "")) for line in recipe.splitlines()
            if line.strip().startswith("$(PY) ")]


def test_make_demo_ends_by_printing_its_wall_time():
    # --no-print-directory: under `make test` (CI) this make is a sub-make, which would end with "Leaving directory"
    run = subprocess.run(["make", "--no-print-directory", "-n", "demo", "PY=true"], capture_output=True, text=True,
                         cwd=ROOT)
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith('echo "make demo: done in $(( $(date +%s) - ') and ' s on $(nproc) CPU cores"' in last
    seconds = subprocess.run(["bash", "-c", last], capture_output=True, text=True).stdout
    assert re.fullmatch(r"make demo: done in \d+ s on \d+ CPU cores\n", seconds), seconds


def test_the_sample_is_whole_lesions_of_every_diagnosis_small_and_licensed():
    meta = pd.read_csv(SAMPLE / "HAM10000_metadata.csv")
    photos = sorted(p.stem for p in (SAMPLE / "images").glob("*.jpg"))
    assert photos == sorted(meta["image_id"]) and 300 <= len(photos) <= 500
    assert meta["dx"].nunique() == 7 and 0.15 < meta["dx"].isin(["mel", "bcc", "akiec"]).mean() < 0.25
    assert sum(p.stat().st_size for p in (SAMPLE / "images").glob("*.jpg")) < 2_000_000
    readme = (SAMPLE / "README.md").read_text()
    assert "doi:10.1038/sdata.2018.161" in readme and "non-commercial" in readme.lower()


@pytest.mark.slow
def test_make_demo_trains_evaluates_and_predicts_offline(tmp_path):
    commands = demo_commands()
    assert [c[2] for c in commands] == ["train", "evaluate", "predict"]
    for command in commands:  # its files into this test's folder, not the checkout's models/ and reports/
        command = [tmp_path / Path(a).name if a.startswith(("models/", "reports/")) else a for a in command]
        run = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, cwd=ROOT,
                             timeout=900)
        assert run.returncode == 0, run.stderr[-2000:]
    card = json.loads((tmp_path / "demo.json").read_text())
    assert card["split_images"]["test"] > 0 and 0 <= card["metrics"]["test"]["auroc"] <= 1
    assert (tmp_path / "demo" / "metrics.json").exists()
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["call"] in ("benign", "malignant") and result["image"].endswith("ISIC_0024306.jpg")
