"""The notebooks: committed without outputs, parameterised, and running top to bottom on the CPU from the project's
folder or from notebooks/, with their own defaults for every path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_data.ipynb", "02_train.ipynb", "03_evaluate.ipynb",
                                           "04_predict.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_without_outputs_and_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{path.name} has outputs"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    assert "not a medical device" in "".join(c.source for c in nb.cells if c.cell_type == "markdown")


def project_like_a_users(folder: Path) -> Path:
    """A copy of the project's layout with HAM10000 where `make data` puts it (the demo sample, in the ISIC layout)."""
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    shutil.copytree(ROOT / "notebooks", folder / "notebooks", ignore=shutil.ignore_patterns("figures", ".*"))
    ham = folder / "data" / "HAM10000"
    shutil.copytree(ROOT / "data" / "sample" / "images", ham / "ISIC2018_Task3_Training_Input")
    shutil.copy(ROOT / "data" / "sample" / "HAM10000_metadata.csv", ham / "HAM10000_metadata.csv")
    return folder


@pytest.mark.slow
def test_notebooks_run_in_order_from_the_project_folder_or_notebooks_with_their_default_paths(tmp_path):
    papermill = pytest.importorskip("papermill")
    project = project_like_a_users(tmp_path)
    small = {
        "01_data.ipynb": dict(size=64, bs=8),
        "02_train.ipynb": dict(pretrained=False, epochs=1, size=64, bs=32, lr_find_iters=5, num_workers=0),
        "03_evaluate.ipynb": dict(bootstrap=100),
        "04_predict.ipynb": {},
    }
    # where a user starts them: papermill from the project folder (01, 02), Jupyter inside notebooks/ (03, 04)
    folders = [project, project, project / "notebooks", project / "notebooks"]
    for path, cwd in zip(sorted((project / "notebooks").glob("*.ipynb")), folders):
        out = tmp_path / "executed" / path.name
        out.parent.mkdir(exist_ok=True)
        papermill.execute_notebook(str(path), str(out), parameters=small[path.name], cwd=str(cwd),
                                   kernel_name="python3", progress_bar=False)
        executed = nbformat.read(out, as_version=4)
        outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs]
        errors = [o for o in outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
        warned = [o.text for o in outputs if o.output_type == "stream" and o.name == "stderr" and "Warning" in o.text]
        assert not warned, f"{path.name} shows a warning: {warned[0][:300]}"
    model = project / "models" / "skincancer.pkl"  # 02's default, from the project's folder
    assert model.exists() and json.loads(model.with_suffix(".json").read_text())["task"] == "binary"
    figures = project / "notebooks" / "figures"
    for name in ["01_diagnoses.png", "01_demographics.png", "01_examples.png", "01_split.png", "01_batch.png",
                 "02_lr_find.png", "02_history.png"]:
        assert (figures / name).stat().st_size > 5000, name
    report = project / "reports" / "notebook"  # 03's, from inside notebooks/
    for name in ["metrics.json", "roc.png", "gradcam.png", "tta_paired.png", "decision_curve.png"]:
        assert (report / name).stat().st_size > 500, name
    evaluation = json.dumps([c.outputs for c in nbformat.read(tmp_path / "executed" / "03_evaluate.ipynb",
                                                              as_version=4).cells if c.cell_type == "code"])
    assert "of 20 malignant found" in evaluation and "threshold " in evaluation  # the prevalence table, the rule
    # the prediction notebook shows the call with its threshold, one lesion's call, and the disclaimer
    cells = nbformat.read(tmp_path / "executed" / "04_predict.ipynb", as_version=4).cells
    text = json.dumps([c.outputs for c in cells if c.cell_type == "code"])
    assert "malignant_probability" in text and "'threshold'" in text and "not a medical device" in text
    assert "'lesion': [" in text
    assert not list((project / "notebooks").glob("*.png")) and not (project / "notebooks" / "models").exists()
