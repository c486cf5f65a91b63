"""The notebooks: committed without outputs, parameterised, and running top to bottom on the CPU."""

from __future__ import annotations

import json
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


def test_notebooks_run_in_order_with_small_parameters(tmp_path, ham_dir, original_images):
    papermill = pytest.importorskip("papermill")
    model = tmp_path / "models" / "nb.pkl"
    figures = tmp_path / "figures"
    small = dict(data_dir=str(ham_dir), figures_dir=str(figures))
    params = {
        "01_data.ipynb": dict(small, size=64, bs=8),
        "02_train.ipynb": dict(small, pretrained=False, epochs=1, size=64, bs=32, limit=300, lr_find_iters=5,
                               num_workers=0, model_path=str(model)),
        "03_evaluate.ipynb": dict(data_dir=str(ham_dir), model_path=str(model), bootstrap=100,
                                  out_dir=str(figures / "evaluation")),
        "04_predict.ipynb": dict(model_path=str(model), image_path=str(original_images[0]),
                                 lesion_paths=[str(p) for p in original_images[:2]]),
    }
    for path in NOTEBOOKS:  # in order: 02 writes the model that 03 and 04 read
        out = tmp_path / path.name
        papermill.execute_notebook(str(path), str(out), parameters=params[path.name], cwd=str(path.parent),
                                   kernel_name="python3", progress_bar=False)
        executed = nbformat.read(out, as_version=4)
        errors = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{path.name}: {errors[0]['ename']}: {errors[0]['evalue']}"
    assert model.exists() and json.loads(model.with_suffix(".json").read_text())["task"] == "binary"
    for name in ["01_diagnoses.png", "01_demographics.png", "01_examples.png", "01_split.png", "01_batch.png",
                 "02_lr_find.png", "02_history.png", "evaluation/roc.png", "evaluation/gradcam.png",
                 "evaluation/tta_paired.png", "evaluation/decision_curve.png"]:
        assert (figures / name).stat().st_size > 5000, name
    evaluation = json.dumps([c.outputs for c in nbformat.read(tmp_path / "03_evaluate.ipynb", as_version=4).cells
                             if c.cell_type == "code"])
    assert "of 20 malignant found" in evaluation and "site: " in evaluation  # the prevalence and subgroup tables
    # the prediction notebook shows the probability and the disclaimer
    cells = nbformat.read(tmp_path / "04_predict.ipynb", as_version=4).cells
    text = json.dumps([c.outputs for c in cells if c.cell_type == "code"])
    assert "malignant_probability" in text and "not a medical device" in text
    assert "'lesion': [" in text  # several photos, one call
    assert not any(Path(path.parent).glob("*.png"))  # nothing written beside the notebooks themselves
