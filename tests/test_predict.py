"""Loading an exported learner and predicting: one image, batches, bad files, the CLI."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skincancer import SkinCancerError, cli
from skincancer.predict import DISCLAIMER, load, open_image


@pytest.fixture(scope="session")
def clf(trained):
    return load(trained)


def test_load_is_cached_per_path(trained, clf):
    assert load(trained) is clf
    assert clf.classes == ["benign", "malignant"]
    assert clf.threshold == json.loads(trained.with_suffix(".json").read_text())["threshold"]


def test_predict_a_full_size_original(clf, original_images):
    res = clf.predict(original_images[0])
    assert Image.open(original_images[0]).size == (600, 450)
    assert res["image"] == str(original_images[0])
    assert sum(res["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert res["malignant_probability"] == pytest.approx(res["probabilities"]["malignant"])
    assert res["label"] == ("malignant" if res["malignant_probability"] >= clf.threshold else "benign")


def test_path_bytes_and_pil_inputs_agree(clf, original_images):
    path = original_images[1]
    by_path = clf.predict(path)["probabilities"]
    by_bytes = clf.predict(path.read_bytes())["probabilities"]
    by_pil = clf.predict(Image.open(path))["probabilities"]
    for other in (by_bytes, by_pil):
        assert other == pytest.approx(by_path, abs=1e-6)


def test_batch_matches_single_predictions_and_isolates_bad_files(clf, original_images, tmp_path):
    bad = tmp_path / "not_an_image.jpg"
    bad.write_text("hello")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    inputs = [original_images[0], bad, *original_images[1:5], empty, tmp_path / "missing.jpg"]
    results = clf.predict_batch(inputs, bs=3)
    assert len(results) == len(inputs)
    assert [("error" in r) for r in results] == [False, True, False, False, False, False, True, True]
    assert "not_an_image.jpg: not a readable image" in results[1]["error"]
    assert "no such file" in results[7]["error"]
    for src, res in zip(inputs, results):
        if "error" not in res:
            single = clf.predict(src)
            assert res["label"] == single["label"]
            np.testing.assert_allclose(list(res["probabilities"].values()),
                                       list(single["probabilities"].values()), atol=1e-5)


def test_chunks_come_in_order_and_make_up_the_batch(clf, original_images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    inputs = [original_images[0], bad, *original_images[1:4]]
    chunks = list(clf.predict_chunks(inputs, bs=2, chunk=2))
    assert [len(c) for c in chunks] == [2, 2, 1]
    flat = [r for c in chunks for r in c]
    assert [r["image"] for r in flat] == [str(p) for p in inputs] and "error" in flat[1]
    for got, expected in zip(flat, clf.predict_batch(inputs, bs=3)):
        assert got.keys() == expected.keys()
        if "error" not in got:
            assert got["malignant_probability"] == pytest.approx(expected["malignant_probability"], abs=1e-5)


def test_a_lesion_is_called_on_the_mean_probability_of_its_photos(clf, original_images, tmp_path):
    photos = original_images[:3]
    lesion = clf.predict_lesion(photos, bs=2)
    singles = [clf.predict(path) for path in photos]
    assert lesion["lesion"] == [str(p) for p in photos] and len(lesion["photos"]) == 3
    for got, single in zip(lesion["photos"], singles):  # each photo's own result, as `predict` gives it
        assert got["malignant_probability"] == pytest.approx(single["malignant_probability"], abs=1e-5)
    p = np.mean([r["malignant_probability"] for r in singles])
    assert lesion["malignant_probability"] == pytest.approx(p, abs=1e-5)
    assert lesion["probabilities"]["malignant"] == pytest.approx(p, abs=1e-5)
    assert lesion["call"] == lesion["label"] == ("malignant" if lesion["malignant_probability"] >= clf.threshold
                                                 else "benign")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(SkinCancerError, match="bad.jpg: not a readable image"):
        clf.predict_lesion([photos[0], bad])
    with pytest.raises(SkinCancerError, match="no photos"):
        clf.predict_lesion([])


def test_cli_predicts_one_lesion_from_its_photos(trained, original_images, capsys):
    assert cli.main(["predict", "--model", str(trained), "--lesion", *map(str, original_images[:2])]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert result["lesion"] == [str(p) for p in original_images[:2]] and len(result["photos"]) == 2
    assert set(result) == {"lesion", "label", "call", "malignant_probability", "probabilities", "photos"}


def test_the_inference_copy_folds_batchnorm_and_predicts_as_fastai(clf, original_images):
    import torch

    batchnorms = [m for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms == []  # every one folded into its convolution
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in clf.learn.model.modules())  # the learner's own is kept
    dl = clf.learn.dls.test_dl([open_image(p) for p in original_images[:6]], bs=4, num_workers=0)
    with clf.learn.no_bar():
        fastai_probs, _ = clf.learn.get_preds(dl=dl)
    probs, targets = clf.get_preds(dl)
    assert targets is None
    np.testing.assert_allclose(probs.numpy(), fastai_probs.numpy(), atol=1e-5)
    assert not torch.allclose(probs[0], probs[1])  # different photos, different outputs: not a constant



def test_explain_is_predict_and_gradcam_in_one_pass(clf, original_images):
    """The app's call: predict's result and the learner's own Grad-CAM map, through one pass of the inference copy."""
    from skincancer.gradcam import gradcam

    calls = []
    hook = clf.model[0].register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        for path in original_images[:3]:
            result, heat, overlay = clf.explain(path)
            assert len(calls) == 1  # the body ran once, for both
            calls.clear()
            plain = clf.predict(path)
            assert result["call"] == plain["call"] and result["image"] == plain["image"] == str(path)
            assert result["malignant_probability"] == pytest.approx(plain["malignant_probability"], abs=1e-6)
            own_heat, _ = gradcam(clf.learn, path)  # through the learner's network, BatchNorms unfolded
            np.testing.assert_allclose(heat, own_heat, atol=1e-4)
            assert heat.shape == (overlay.height, overlay.width)
            calls.clear()
    finally:
        hook.remove()



def test_explain_lesion_is_predict_lesion_with_each_photos_map(clf, original_images, tmp_path):
    paths = original_images[:3]
    calls = []
    hook = clf.model[0].register_forward_hook(lambda module, args, out: calls.append(len(out)))
    try:
        result, overlays = clf.explain_lesion(paths)
    finally:
        hook.remove()
    assert calls == [1, 1, 1]  # one pass a photo, for its probabilities and its map
    plain = clf.predict_lesion(paths)
    assert result["lesion"] == plain["lesion"] == [str(p) for p in paths] and result["call"] == plain["call"]
    assert result["malignant_probability"] == pytest.approx(plain["malignant_probability"], abs=1e-5)
    for mine, theirs, overlay, path in zip(result["photos"], plain["photos"], overlays, paths):
        assert mine["malignant_probability"] == pytest.approx(theirs["malignant_probability"], abs=1e-5)
        assert overlay.size == open_image(path).size
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(SkinCancerError, match="bad.jpg"):
        clf.explain_lesion([paths[0], bad])
    with pytest.raises(SkinCancerError, match="explain_lesion: no photos given"):
        clf.explain_lesion([])

def test_plot_prediction_titles_the_call_with_or_without_a_result(clf, original_images):
    import matplotlib.pyplot as plt

    from skincancer.plotting import plot_prediction

    plain = clf.predict(original_images[0])
    for given in (None, plain):
        fig = plot_prediction(clf, original_images[0], given)
        title = fig._suptitle.get_text()
        assert title.startswith(f"{plain['call']}: probability of malignancy {plain['malignant_probability']:.2f}")
        assert DISCLAIMER in title and len(fig.axes) == 3
        plt.close(fig)

def test_the_loss_decodes_a_binary_model_at_its_operating_threshold():
    import torch

    from skincancer.calibration import calibrate
    from skincancer.losses import OperatingPointLoss

    scores = torch.linspace(0.01, 0.99, 99)
    probs = torch.stack([1 - scores, scores], dim=1)
    loss = OperatingPointLoss()
    assert loss.decodes(probs).tolist() == probs.argmax(dim=1).tolist()  # no operating point yet: fastai's argmax
    calibration = {"method": "platt", "slope": 1.2, "intercept": -1.5}
    loss.set_operating_point(["benign", "malignant"], 0.2, calibration)
    expected = (calibrate(scores.numpy(), calibration) >= 0.2).astype(int)
    assert loss.decodes(probs).tolist() == expected.tolist()
    assert 0 < expected.mean() and (expected != probs.argmax(dim=1).numpy()).any()  # a threshold that is not 0.5
    dx = torch.softmax(torch.randn(20, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    loss.set_operating_point(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], 0.2, calibration)
    assert loss.decodes(dx).tolist() == dx.argmax(dim=1).tolist()  # a diagnosis model's label: its likeliest class


def test_fastai_learn_predict_gives_the_models_call(trained, clf, original_images):
    from skincancer.predict import unpickle_learner

    card = json.loads(trained.with_suffix(".json").read_text())
    pickled = unpickle_learner(trained)  # fastai's load_learner, as a fastai user would load the export
    for learn in (pickled, clf.learn):
        assert (learn.loss_func.threshold, learn.loss_func.calibration) == (card["threshold"], card["calibration"])
    for path in original_images[:6]:
        call = clf.predict(path)["call"]
        for learn in (pickled, clf.learn):
            with learn.no_bar():
                label, index, probs = learn.predict(path)
            assert (str(label), int(index)) == (call, clf.classes.index(call))


def test_the_default_batch_size_follows_the_input_size_on_a_cpu(clf):
    from dataclasses import replace

    assert [replace(clf, card={**clf.card, "size": size}).batch_size for size in (64, 128, 224, 448)] == [64, 24, 8, 2]


def test_truncated_jpeg_is_a_clear_error(original_images):
    data = original_images[0].read_bytes()
    with pytest.raises(SkinCancerError, match="not a readable image"):
        open_image(data[: len(data) // 3])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_colour_modes_become_rgb(mode, original_images):
    img = Image.open(original_images[0]).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    out = open_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (600, 450)


def test_exif_orientation_is_applied(original_images):
    img = Image.open(original_images[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 450 wide
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (450, 600)


def test_cli_predict_prints_json_lines_and_fails_on_a_bad_image(trained, original_images, tmp_path, capsys):
    assert cli.main(["predict", "--model", str(trained), *map(str, original_images[:2])]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == [str(p) for p in original_images[:2]]
    assert all(set(x) == {"image", "label", "call", "malignant_probability", "probabilities"} for x in lines)
    assert all(x["call"] == x["label"] for x in lines)  # binary: the label is the call at the threshold
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert cli.main(["predict", "--model", str(trained), str(bad), str(original_images[0])]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert set(lines[0]) == {"image", "error"} and "label" in lines[1]


def test_cli_predict_writes_each_chunk_as_it_comes_and_progress_only_to_a_terminal(trained, original_images,
                                                                                   monkeypatch, capsys):
    import sys

    from skincancer.predict import Classifier

    written, real = [], Classifier.predict_chunks

    def chunks(self, *args, **kwargs):
        for results in real(self, *args, **kwargs):
            written.append(capsys.readouterr())  # what was written before this chunk was handed on
            yield results

    monkeypatch.setattr(Classifier, "predict_chunks", chunks)
    monkeypatch.setattr(cli, "PREDICT_CHUNK", 2)
    images = [str(p) for p in original_images[:5]]
    assert cli.main(["predict", "--model", str(trained), *images]) == 0
    written.append(capsys.readouterr())
    # each chunk's two lines were written before the next chunk was ready; nothing on stderr, not a terminal
    assert [len(w.out.splitlines()) for w in written[1:]] == [2, 2, 1] and not any(w.err for w in written)
    assert [json.loads(x)["image"] for w in written for x in w.out.splitlines()] == images
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    written.clear()
    assert cli.main(["predict", "--model", str(trained), *images]) == 0
    err = "".join(w.err for w in written) + capsys.readouterr().err
    assert "predicted 2 of 5 images" in err and "predicted 5 of 5 images" in err


def test_cli_predict_as_csv_has_the_json_lines_figures_a_column_per_class(trained, original_images, tmp_path,
                                                                          capsys):
    bad = tmp_path / "bad, name.jpg"  # a comma: the CSV quotes it
    bad.write_bytes(b"\xff\xd8\xff garbage")
    images = [str(original_images[0]), str(bad), str(original_images[1])]
    assert cli.main(["predict", "--model", str(trained), *images]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert cli.main(["predict", "--model", str(trained), "--format", "csv", *images]) == 1
    table = pd.read_csv(io.StringIO(capsys.readouterr().out), keep_default_na=False)
    assert list(table.columns) == ["image", "call", "label", "malignant_probability", "probability_benign",
                                   "probability_malignant", "error"]
    assert list(table["image"]) == images
    for (_, row), line in zip(table.iterrows(), lines):
        if "error" in line:
            assert row["error"] == line["error"] and row["call"] == "" and row["malignant_probability"] == ""
            continue
        assert row["call"] == line["call"] and row["error"] == ""
        assert float(row["malignant_probability"]) == pytest.approx(line["malignant_probability"], abs=1e-12)
        for c, p in line["probabilities"].items():
            assert float(row[f"probability_{c}"]) == pytest.approx(p, abs=1e-12)
    photos = [str(p) for p in original_images[:2]]
    assert cli.main(["predict", "--model", str(trained), "--format", "csv", "--lesion", *photos]) == 0
    lesion = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert len(lesion) == 1 and lesion["image"][0] == ";".join(photos)
    assert lesion["malignant_probability"][0] == pytest.approx(
        np.mean([x["malignant_probability"] for x in lines if x["image"] in photos]), abs=1e-9)


def test_cli_predict_into_a_closed_pipe_stops_quietly(trained, original_images):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "skincancer", "predict", "--model", str(trained),
                             str(original_images[0].parent)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # as `| head -1` does once it has its line: every write after this fails
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 1
    assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]


def test_cli_predict_reads_the_images_under_a_folder(trained, original_images, tmp_path, capsys):
    import shutil

    folder, empty = tmp_path / "photos", tmp_path / "empty"
    (folder / "inner").mkdir(parents=True)
    empty.mkdir()
    copies = [folder / "b.jpg", folder / "inner" / "a.jpg", folder / "c.png"]
    for src, dest in zip(original_images, copies):
        shutil.copy(src, dest) if dest.suffix == ".jpg" else Image.open(src).save(dest)
    (folder / "notes.txt").write_text("not an image")
    assert cli.main(["predict", "--model", str(trained), str(folder), str(empty), str(original_images[3])]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["image"] for x in lines] == [*sorted(map(str, copies)), str(empty), str(original_images[3])]
    assert [("error" in x) for x in lines] == [False, False, False, True, False]
    assert lines[3]["error"] == f"{empty}: a folder, not an image file"


def test_cli_predict_with_a_missing_model_is_an_error_line(tmp_path, original_images):
    run = subprocess.run([sys.executable, "-m", "skincancer", "predict", "--model", str(tmp_path / "none.pkl"),
                          str(original_images[0])], capture_output=True, text=True)
    assert run.returncode == 2
    assert "none.pkl: no such model file" in run.stderr and "Traceback" not in run.stderr


def test_a_file_that_is_not_a_learner_is_refused(tmp_path):
    fake = tmp_path / "fake.pkl"
    fake.write_bytes(b"\x80\x04not really")
    with pytest.raises(SkinCancerError, match="fake.pkl: refusing to unpickle"):
        load(fake)
    with pytest.raises(SkinCancerError, match="fake.pkl: not a loadable fastai learner"):
        load(fake, trusted=True)
