"""Serving an .onnx export without torch: the same preprocessing and results as the fastai model, int8 checked,
bad files refused before onnxruntime sees a byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from fastai.vision.all import Resize, ResizeMethod

from conftest import ROOT
from skincancer import SkinCancerError, cli
from skincancer import onnx_export as X
from skincancer import runtime
from skincancer.app import NO_MAP, analyse
from skincancer.data import read_metadata, read_split
from skincancer.onnx_export import OnnxGraph, export_onnx
from skincancer.files import model_files, sha256_file
from skincancer.images import open_image
from skincancer.rebuild import card_stats
from skincancer.predict import load


@pytest.fixture(scope="session")
def onnx_export(trained, ham_dir, tmp_path_factory):
    """A copy of the trained export with NAME.onnx and NAME.int8.onnx, and the training photos that calibrated it."""
    folder = tmp_path_factory.mktemp("onnx")
    for path in model_files(trained).values():
        if path.exists():
            shutil.copy(path, folder / path.name)
    model, opened = folder / trained.name, []
    real_open = X.open_image
    X.open_image = lambda path: opened.append(str(path)) or real_open(path)
    try:
        export_onnx(model, int8=True, data=ham_dir)
    finally:
        X.open_image = real_open
    return model, opened


def test_the_graph_prepares_photos_as_fastais_validation_pipeline(trained, original_images):
    clf = load(trained)
    photos = [open_image(p) for p in original_images[:4]]
    presize, size = clf.card.presize, clf.card.size
    ours = runtime.presized(photos, presize)
    fastai = np.stack([np.asarray(Resize(presize, method=ResizeMethod.Squish)(p, split_idx=1)) for p in photos])
    assert np.array_equal(ours, fastai)  # the squish: Pillow's, exactly
    prepared = OnnxGraph(clf.learn.model, size, card_stats(clf.card)).prepare(torch.from_numpy(ours))
    expected = clf.learn.dls.test_dl(photos, bs=4, num_workers=0).one_batch()[0]
    torch.testing.assert_close(prepared, expected.as_subclass(torch.Tensor), atol=1e-4, rtol=0)


def test_onnx_predicts_what_the_fastai_model_predicts_in_the_same_fields(onnx_export, trained, original_images,
                                                                         capsys):
    model, _ = onnx_export
    onnx_path = model_files(model)["onnx"]
    fastai, served = load(trained), load(onnx_path)
    assert type(served).__name__ == "OnnxPredictor"
    a, b = fastai.predict_batch(original_images), served.predict_batch(original_images)
    assert [set(r) for r in a] == [set(r) for r in b]
    for x, y in zip(a, b):
        assert (x["call"], x["label"], x["threshold"]) == (y["call"], y["label"], y["threshold"])
        assert y["malignant_probability"] == pytest.approx(x["malignant_probability"], abs=1e-4)
    lesion = served.predict_lesion(original_images[:3])
    assert lesion["malignant_probability"] == pytest.approx(fastai.predict_lesion(original_images[:3])[
        "malignant_probability"], abs=1e-4)
    for fmt in ("jsonl", "csv"):
        assert cli.main(["predict", "--model", str(trained), "--format", fmt, *map(str, original_images[:2])]) == 0
        ours = capsys.readouterr().out.splitlines()
        assert cli.main(["predict", "--model", str(onnx_path), "--format", fmt, *map(str, original_images[:2])]) == 0
        theirs = capsys.readouterr().out.splitlines()
        assert len(ours) == len(theirs) and ours[0].split(",")[:2] == theirs[0].split(",")[:2]


def test_serving_an_onnx_model_imports_neither_torch_nor_fastai(onnx_export, original_images):
    model, _ = onnx_export
    code = (f"import sys\nfrom skincancer import cli\nassert cli.main(['predict', '--model', "
            f"{str(model_files(model)['int8'])!r}, {str(original_images[0])!r}]) == 0\n"
            "print(sorted(m for m in ('torch', 'fastai', 'pandas', 'scipy', 'sklearn', 'matplotlib') "
            "if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-1000:]
    line, imported = run.stdout.splitlines()
    assert json.loads(line)["call"] in ("benign", "malignant") and imported == "[]"


def test_int8_is_calibrated_on_training_photos_and_checked_against_fp32_on_valid(onnx_export, ham_dir):
    model, opened = onnx_export
    card = json.loads(model.with_suffix(".json").read_text())
    q = card["onnx"]["int8"]
    meta = read_metadata(ham_dir)
    split = meta.assign(split=read_split(model.with_suffix(".split.csv"), meta)).set_index("path")["split"]
    calibration = opened[:len(opened) - q["valid_images"]]  # then the validation photos, for the check
    assert calibration and {split[p] for p in calibration} == {"train"}
    assert {split[p] for p in opened[len(calibration):]} == {"valid"}
    assert q["sha256"] == sha256_file(model_files(model)["int8"]) and q["calibrated_on"].endswith("training split")
    assert 0 <= q["largest_probability_change"] <= 1 and q["valid_auroc_drop"] == pytest.approx(
        q["valid_auroc_fp32"] - q["valid_auroc_int8"])
    # the calls at the threshold too: how many flipped, and the sensitivity each copy reaches
    assert 0 <= q["calls_flipped"] <= 1 and 0 <= q["valid_sensitivity_int8"] <= 1
    assert q["holds"] == (q["valid_auroc_drop"] <= 0.005 and q["calls_flipped"] <= 0.01)
    fp32 = load(model_files(model)["onnx"])
    valid = meta[meta["path"].map(split) == "valid"]
    results = fp32.predict_batch(list(valid["path"]), check=False)  # every photo's call, as the export measured
    calls = [r["call"] == "malignant" for r in results]
    # the dermoscopy check in both copies: int8's statistics drift from fp32's, so int8 gets its own threshold, set on
    # its own validation scores as fp32's was on fp32's
    assert q["valid_check_pass_fp32"] == pytest.approx(np.mean([r["dermoscopy"] for r in results]))
    assert q["valid_check_pass_fp32"] >= 0.97 and q["valid_check_pass_int8"] >= 0.97
    int8 = load(model_files(model)["int8"])
    assert int8.check.threshold == q["check_threshold"] != fp32.check.threshold
    passed = [r["dermoscopy"] for r in int8.predict_batch(list(valid["path"]), check=False)]
    assert np.mean(passed) == pytest.approx(q["valid_check_pass_int8"])
    truth = valid["dx"].isin(["mel", "bcc", "akiec"]).to_numpy()
    assert q["valid_sensitivity_fp32"] == pytest.approx(np.mean(np.asarray(calls)[truth]))
    assert card["preprocess"]["mean"] == card["normalize"]["mean"]
    quantized = onnx.load(str(model_files(model)["int8"]))
    assert any(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    assert model_files(model)["int8"].stat().st_size < model_files(model)["onnx"].stat().st_size / 3


def test_a_bad_onnx_file_is_one_clear_error_and_onnxruntime_never_sees_unverified_bytes(onnx_export, tmp_path,
                                                                                       monkeypatch):
    model, _ = onnx_export
    for path in model_files(model).values():
        if path.exists():
            shutil.copy(path, tmp_path / path.name)
    served, card_path = tmp_path / model_files(model)["onnx"].name, tmp_path / model.with_suffix(".json").name
    sessions = []
    real = runtime.ort.InferenceSession
    monkeypatch.setattr(runtime.ort, "InferenceSession", lambda data, **kw: sessions.append(data) or real(data, **kw))
    good = served.read_bytes()
    for broken in (good[: len(good) // 2], good[:-100] + b"\x00" * 100, b"not onnx at all"):
        served.write_bytes(broken)
        with pytest.raises(SkinCancerError, match="its sha256 does not match the model card"):
            load(served)
    assert sessions == []
    card = json.loads(card_path.read_text())

    def vouch(data: bytes) -> None:  # a card that names these bytes: they reach onnxruntime, which must refuse
        served.write_bytes(data)
        card["onnx"]["onnx"]["sha256"] = sha256_file(served)
        card_path.write_text(json.dumps(card))

    vouch(b"not onnx at all, but the card says so")
    with pytest.raises(SkinCancerError, match="not a loadable ONNX model"):
        load(served)
    x = onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [None, 10])
    y = onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, 10])
    foreign = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["image"],
                                                                                   ["probabilities"])], "g", [x], [y]))
    vouch(foreign.SerializeToString())
    with pytest.raises(SkinCancerError, match=r"its input \(image tensor\(float\).*\) is not the photos"):
        load(served)
    card_path.unlink()
    with pytest.raises(SkinCancerError, match="no model card beside"):
        load(served)


def test_the_app_on_an_onnx_model_calls_and_says_the_map_needs_the_fastai_model(onnx_export, original_images):
    model, _ = onnx_export
    served = load(model_files(model)["int8"])
    text, call, data, overlay = analyse(served, str(original_images[0]))
    assert NO_MAP in text and call == data["call"] and set(data["probabilities"]) == {"benign", "malignant"}
    assert overlay is None
    with pytest.raises(SkinCancerError, match="Grad-CAM needs"):
        served.explain(original_images[0])


def test_int8_needs_the_data_to_calibrate_on(trained):
    with pytest.raises(SkinCancerError, match="int8 needs data"):
        export_onnx(trained, int8=True)
