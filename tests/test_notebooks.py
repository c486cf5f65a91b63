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
    shutil.copytree(ROOT / "data" / "sample", folder / "data" / "sample")  # every clone has it
    return folder


def test_the_readmes_papermill_command_is_installed_by_make_install():
    readme = (ROOT / "README.md").read_text()
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert "papermill notebooks/" in readme
    assert any(line.startswith("papermill") for line in requirements)  # `make install` installs requirements.txt


@pytest.mark.slow
def test_the_predict_notebook_runs_on_a_fresh_clone_given_only_a_model_and_a_photo(tmp_path, trained,
                                                                                   original_images):
    papermill = pytest.importorskip("papermill")
    clone = tmp_path / "clone"  # what a clone holds: no data/HAM10000
    clone.mkdir()
    shutil.copy(ROOT / "pyproject.toml", clone / "pyproject.toml")
    shutil.copytree(ROOT / "notebooks", clone / "notebooks", ignore=shutil.ignore_patterns("figures", ".*"))
    shutil.copytree(ROOT / "data" / "sample", clone / "data" / "sample")
    out = tmp_path / "out.ipynb"
    papermill.execute_notebook(str(clone / "notebooks" / "04_predict.ipynb"), str(out), cwd=str(clone),
                               parameters=dict(model_path=str(trained), image_path=str(original_images[0])),
                               kernel_name="python3", progress_bar=False)
    cells = nbformat.read(out, as_version=4).cells
    outputs = [o for c in cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([c.outputs for c in cells if c.cell_type == "code"])
    assert original_images[0].name in text and "ISIC_0027419.jpg" in text  # the photo given; the sample's lesion


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
