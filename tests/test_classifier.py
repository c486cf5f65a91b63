"""A loaded fastai model: one image, batches and chunks, a lesion, the inference copy, Grad-CAM from one pass."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastai.learner import load_learner
from PIL import Image

from skincancer import SkinCancerError
from skincancer.classifier import batch_preds
from skincancer.images import open_image




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


def test_the_inference_copy_folds_batchnorm_and_predicts_as_fastai(clf, original_images):
    import torch

    batchnorms = [m for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms == []  # every one folded into its convolution
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in clf.learn.model.modules())  # the learner's own is kept
    dl = clf.learn.dls.test_dl([open_image(p) for p in original_images[:6]], bs=4, num_workers=0)
    with clf.learn.no_bar():
        fastai_probs, _ = clf.learn.get_preds(dl=dl)
    probs, targets = batch_preds(clf.learn, dl, clf.model)
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


def test_fastai_learn_predict_gives_the_models_call(trained, clf, original_images):
    card = json.loads(trained.with_suffix(".json").read_text())
    with pytest.warns(UserWarning, match="insecure pickle"):  # fastai says so: this export is ours
        pickled = load_learner(trained)  # as a fastai user would load the export
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

    assert [replace(clf, card=replace(clf.card, size=size)).batch_size for size in (64, 128, 224, 448)] == \
        [64, 24, 8, 2]


