"""The dermoscopy check: fitted at training, shipped in the export, applied wherever a call is made, and a photo that
fails it gets no call."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from conftest import ROOT
from skincancer import SkinCancerError, cli
from skincancer.activations import Taps, tap_names
from skincancer.check import CHECK_PASS, check_from_tensors, fit_check
from skincancer.files import model_files, sha256_file
from skincancer.inference import inference_model
from skincancer.predict import load

SITE = Path(np.__file__).resolve().parents[1]
PORTRAIT = SITE / "matplotlib" / "mpl-data" / "sample_data" / "grace_hopper.jpg"


def screenshot(path: Path) -> Path:
    """A white page of black text, as a screenshot of a document."""
    img = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(img)
    for y in range(10, 390, 16):
        draw.text((10, y), "the quick brown fox jumps over the lazy dog " * 2, fill="black")
    img.save(path)
    return path


def gaussian_features(n: int, dims: int, seed: int = 0) -> np.ndarray:
    """Correlated features (as channel statistics are), drawn alike for every seed but the rows."""
    mix = np.random.default_rng(99).normal(size=(dims, dims)) / np.sqrt(dims)
    return np.random.default_rng(seed).normal(size=(n, dims)) @ (np.eye(dims) + mix)


def test_the_threshold_lets_the_validation_share_through_and_far_photos_fail():
    train, valid, new = (gaussian_features(n, 20, seed=s) for n, s in ((2000, 0), (1000, 1), (1000, 2)))
    far = gaussian_features(200, 20, seed=3) + 2.0  # every feature moved by about two of its SDs
    check = fit_check(train, valid, ["a", "b"], [12, 8])
    assert check.passes(check.scores(valid)).mean() == pytest.approx(CHECK_PASS, abs=0.002)
    assert 0.97 <= check.passes(check.scores(new)).mean() <= 1  # photos like the training ones, never seen
    assert check.passes(check.scores(far)).mean() < 0.05
    assert np.median(check.scores(valid)) == pytest.approx(1, abs=0.05)  # each tap put on one scale


def test_the_check_round_trips_through_its_arrays_and_bad_arrays_are_refused():
    check = fit_check(gaussian_features(500, 6), gaussian_features(200, 6, seed=1), ["x", "y"], [4, 2])
    back = check_from_tensors(check.tensors(), ["x", "y"], "c.safetensors")
    rows = gaussian_features(10, 6, seed=2)
    assert np.allclose(back.scores(rows), check.scores(rows)) and back.threshold == check.threshold
    with pytest.raises(SkinCancerError, match="takes 6 features a photo, not"):
        check.scores(rows[:, :5])
    with pytest.raises(SkinCancerError, match="c.safetensors: not the dermoscopy check its model card describes"):
        check_from_tensors(check.tensors(), ["x", "y", "z"], "c.safetensors")


def test_the_taps_are_the_ends_of_the_early_stages_in_the_folded_copy_and_the_network_alike():
    from fastai.vision.all import create_body, create_head
    from torchvision.models import resnet18

    torch.manual_seed(0)
    net = torch.nn.Sequential(create_body(resnet18(), pretrained=False), create_head(512, 2)).eval()
    folded = inference_model(net)
    assert tap_names(folded, 64) == ["0.2"]  # the stem's ReLU, before the max-pool: stride 2
    names = tap_names(folded, 64, (4, 8))
    assert names == ["0.4.1.relu", "0.5.1.relu"]  # layer1's and layer2's last blocks, whose ReLU runs thrice
    x = torch.rand(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    stats = []
    for model in (folded, net):
        with Taps(model, names) as taps, torch.inference_mode():
            model(x)
            taps.keep()
            stats.append(taps.collected())
        assert taps.widths == [128, 256]
    assert stats[0].shape == (3, 384) and np.allclose(stats[0], stats[1], atol=1e-4)
    with torch.inference_mode():  # the block's output: after the residual sum, not the first ReLU's
        block = net[0][4][1]
        expected = block(net[0][4][0](net[0][3](net[0][2](net[0][1](net[0][0](x))))))
    assert np.allclose(stats[1][:, :64], expected.mean((2, 3)).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="no layer at stride 128"):
        tap_names(folded, 64, (128,))
    with pytest.raises(ValueError, match="no module 'nope'"):
        Taps(net, ["nope"])


def test_an_export_ships_its_check_and_its_card_records_it(trained):
    card = json.loads(trained.with_suffix(".json").read_text())
    check_file = model_files(trained)["check"]
    assert card["check"]["file"] == check_file.name and card["check"]["sha256"] == sha256_file(check_file)
    assert card["check"]["passed"]["valid"] >= 0.97 and 0 < card["check"]["passed"]["test"] <= 1
    assert card["files"]["check"] == check_file.name
    clf = load(trained)
    assert clf.check is not None and clf.check.threshold == card["check"]["threshold"]


def test_a_photo_that_is_not_dermoscopy_gets_no_call_and_a_lesion_photo_does(trained, original_images, tmp_path):
    clf = load(trained)
    page = screenshot(tmp_path / "page.png")
    results = clf.predict_batch([PORTRAIT, original_images[0], page])
    for refused in (results[0], results[2]):
        assert refused["dermoscopy"] is False and "call" not in refused and "malignant_probability" not in refused
        assert "does not look like a dermoscopy photo" in refused["reason"]
        assert refused["check_score"] > refused["check_threshold"] == clf.check.threshold
    assert results[1]["dermoscopy"] is True and results[1]["call"] in ("benign", "malignant")
    anyway = clf.predict(PORTRAIT, check=False)  # the call anyway, still flagged
    assert anyway["dermoscopy"] is False and anyway["call"] in ("benign", "malignant") and "reason" not in anyway
    assert clf.predict(PORTRAIT)["check_score"] == pytest.approx(anyway["check_score"])


def test_a_lesion_with_a_photo_that_is_not_dermoscopy_gets_no_call_and_names_it(trained, original_images):
    clf = load(trained)
    lesion = clf.predict_lesion([original_images[0], PORTRAIT])
    assert "call" not in lesion and lesion["dermoscopy"] is False
    assert "1 of the 2 photos (" in lesion["reason"] and "grace_hopper.jpg" in lesion["reason"]
    assert "call" in lesion["photos"][0] and "call" not in lesion["photos"][1]
    anyway = clf.predict_lesion([original_images[0], PORTRAIT], check=False)
    assert anyway["call"] in ("benign", "malignant") and anyway["dermoscopy"] is False
    assert clf.predict_lesion(original_images[:2])["dermoscopy"] is True


def test_cli_predict_refuses_with_a_reason_and_no_check_calls_anyway(trained, original_images, capsys):
    assert cli.main(["predict", "--model", str(trained), str(PORTRAIT), str(original_images[0])]) == 1
    out, err = capsys.readouterr()
    portrait, lesion = (json.loads(line) for line in out.splitlines())
    assert portrait["dermoscopy"] is False and "reason" in portrait and "call" not in portrait
    assert lesion["dermoscopy"] is True and "call" in lesion
    assert "1 of 2 photo(s) do not look like dermoscopy photos" in err and "--no-check" in err
    assert cli.main(["predict", "--model", str(trained), "--no-check", "--format", "csv", str(PORTRAIT)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    fields = dict(zip(header.split(","), row.split(",")))
    assert fields["dermoscopy"] == "False" and fields["call"] in ("benign", "malignant")
    assert float(fields["check_score"]) > float(fields["check_threshold"])


def test_an_export_without_a_check_still_predicts_says_so_and_can_be_given_one(export_copy, ham_dir,
                                                                               original_images, capsys):
    card_path = model_files(export_copy)["card"]
    card = json.loads(card_path.read_text())
    del card["check"]  # as an export made before the check
    card_path.write_text(json.dumps(card))
    model_files(export_copy)["check"].unlink()
    clf = load(export_copy)
    assert clf.check is None
    result = clf.predict(PORTRAIT)
    assert result["dermoscopy"] is None and result["call"] in ("benign", "malignant")
    assert cli.main(["predict", "--model", str(export_copy), str(original_images[0])]) == 0
    assert "has no dermoscopy check" in capsys.readouterr().err
    assert cli.main(["fit-check", "--model", str(export_copy), "--data", str(ham_dir)]) == 0
    assert "the check passes" in capsys.readouterr().out
    clf = load(export_copy)
    assert clf.check is not None and clf.predict(PORTRAIT)["dermoscopy"] is False


def test_a_tampered_check_file_is_refused_naming_it(export_copy):
    path = model_files(export_copy)["check"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(SkinCancerError, match=r"model.check.safetensors: its sha256 does not match"):
        load(export_copy)


def test_the_app_says_not_dermoscopy_and_makes_no_call(trained):
    from skincancer.app import analyse, analyse_lesion

    clf = load(trained)
    text, call, data, overlay = analyse(clf, str(PORTRAIT))
    assert "Not judged: not a dermoscopy photo" in text and call is None and overlay is None
    assert data["dermoscopy"] is False and "call" not in data
    text, call, data, _ = analyse_lesion(clf, [str(PORTRAIT), str(PORTRAIT)])
    assert "2 of the 2 photos (grace\\_hopper.jpg, grace\\_hopper.jpg)" in text and call is None


def test_evaluate_scores_every_test_photo_with_the_check(trained, ham_dir, tmp_path, capsys):
    from skincancer.evaluate import read_test_split

    assert cli.main(["evaluate", "--model", str(trained), "--data", str(ham_dir), "--bootstrap", "20",
                     "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    dc = metrics["dermoscopy_check"]
    assert dc["n"] == len(read_test_split(trained, ham_dir)) == metrics["n"]
    assert 0.9 <= dc["passed"] <= 1 and len(dc["refused"]) == round((1 - dc["passed"]) * dc["n"])
    assert "dermoscopy check: " in capsys.readouterr().out


def test_an_onnx_export_checks_photos_without_torch(trained, tmp_path, original_images):
    from skincancer.onnx_export import export_onnx

    for path in model_files(trained).values():
        if path.exists():
            shutil.copy(path, tmp_path / path.name)
    model = tmp_path / trained.name
    export_onnx(model)
    code = ("import sys, json\nfrom skincancer.predict import load\n"
            f"clf = load({str(model.with_suffix('.onnx'))!r})\n"
            f"print(json.dumps(clf.predict_batch([{str(PORTRAIT)!r}, {str(original_images[0])!r}])))\n"
            "print('torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    portrait, lesion = json.loads(lines[0])
    assert lines[1] == "False"
    fastai = load(model).predict_batch([PORTRAIT, original_images[0]])
    assert portrait["dermoscopy"] is False and "call" not in portrait and lesion["dermoscopy"] is True
    for served, own in zip((portrait, lesion), fastai):
        assert served["check_score"] == pytest.approx(own["check_score"], rel=1e-3)


def test_an_older_onnx_graph_without_the_features_still_serves_unchecked(trained, tmp_path):
    from skincancer.card import read_card
    from skincancer.onnx_export import OnnxGraph
    from skincancer.rebuild import card_stats
    from skincancer.runtime import load_onnx

    clf = load(trained)
    card = read_card(trained)
    graph = OnnxGraph(clf.learn.model.float().eval(), card.size, card_stats(card)).eval()  # no taps: as before
    path = tmp_path / "old.onnx"
    program = torch.onnx.export(graph, (torch.zeros(2, card.presize, card.presize, 3, dtype=torch.uint8),),
                                input_names=["image"], output_names=["probabilities"], dynamo=True,
                                dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    program.save(str(path))
    served = load_onnx(path, card, path.read_bytes(), clf.check)
    assert served.check is None and served.predict(PORTRAIT)["dermoscopy"] is None


def test_the_prediction_figure_of_a_refused_photo_says_why_and_shows_no_call(trained):
    import matplotlib

    matplotlib.use("Agg")
    from skincancer.plotting import plot_prediction

    fig = plot_prediction(load(trained), PORTRAIT)
    title = fig._suptitle.get_text()
    assert title.startswith("Not judged: does not look like a dermoscopy photo") and "not a medical device" in title
    assert len(fig.axes) == 1  # the photo alone: no map, no probabilities
