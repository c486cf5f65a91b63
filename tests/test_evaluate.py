"""Evaluation of labelled images: the evaluate and compare commands, their files, TTA, labelled sets."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import calibrated_copy
from PIL import Image
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from skincancer import SkinCancerError, cli
from skincancer.calibration import calibrate
from skincancer.classifier import predict_frame
from skincancer.evaluate import read_labels, read_test_split
from skincancer.labels import DX_CLASSES
from skincancer.metrics import lesion_scores, malignant_scores, net_benefit
from skincancer.predict import load

PLOTS = {"roc.png", "pr.png", "confusion.png", "reliability.png", "threshold.png", "decision_curve.png",
         "top_losses.png", "gradcam.png"}
from skincancer.images import open_image


@pytest.fixture
def originals_meta(originals_dir):
    return pd.read_csv(originals_dir / "HAM10000_metadata.csv")


def test_reads_isic_one_hot_and_plain_label_files(tmp_path, originals_dir, originals_meta):
    onehot = pd.DataFrame({"image": originals_meta["image_id"],
                           **{d.upper(): (originals_meta["dx"] == d).astype(float) for d in DX_CLASSES}})
    onehot.to_csv(tmp_path / "gt.csv", index=False)
    originals_meta[["image_id", "dx"]].to_csv(tmp_path / "plain.csv", index=False)
    a = read_labels(tmp_path / "gt.csv", originals_dir / "images")
    b = read_labels(tmp_path / "plain.csv", originals_dir / "images")
    assert a[["image_id", "dx"]].equals(b[["image_id", "dx"]]) and len(a) == 14
    assert a["dx"].tolist() == originals_meta["dx"].tolist()


def test_unknown_image_ids_and_bad_columns_are_named(tmp_path, originals_dir, originals_meta):
    extra = pd.concat([originals_meta[["image_id", "dx"]],
                       pd.DataFrame({"image_id": ["ISIC_9999999"], "dx": ["mel"]})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(SkinCancerError, match=r"1 of 15 image id\(s\) have no image.*ISIC_9999999"):
        read_labels(tmp_path / "extra.csv", originals_dir / "images")
    originals_meta[["image_id", "age"]].to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(SkinCancerError, match="cols.csv: expected columns"):
        read_labels(tmp_path / "cols.csv", originals_dir / "images")


def test_training_chose_the_threshold_on_valid_for_the_target(trained):
    card = json.loads(trained.with_suffix(".json").read_text())
    rule = card["threshold_rule"]
    assert rule["chosen_on"] == "valid" and rule["target_sensitivity"] == 0.9
    assert card["metrics"]["valid"]["sensitivity"] >= 0.9
    assert card["metrics"]["test"]["threshold"] == card["threshold"]


def test_evaluate_the_recorded_test_split(trained, ham_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(trained), "--data", str(ham_dir), "--out", str(out),
                     "--bootstrap", "200", "--prevalence", "0.05", "0.3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["prevalence"] for r in m["at_prevalence"]] == [0.05, 0.3]
    card = json.loads(trained.with_suffix(".json").read_text())
    assert m["n"] == card["split_images"]["test"] and m["threshold"] == card["threshold"]
    nb = m["net_benefit"]
    assert nb["threshold"] == card["threshold"] and nb["benign_per_malignancy"] == 1 / nb["threshold"] - 1
    assert nb["model"] <= m["n_malignant"] / m["n"]  # never more than finding every malignancy with no false alarm
    assert m["auroc"] == pytest.approx(card["metrics"]["test"]["auroc"], abs=1e-6)
    assert set(m["plots"]) == PLOTS | {"subgroups.png", "lesions.png"}
    lesions = m["by_lesion"]
    assert lesions["n_photos"] == m["n"] and lesions["each_photo"]["auroc"] == pytest.approx(m["auroc"])
    assert lesions["n_lesions"] == card["split_lesions"]["test"]
    at_training = card["metrics"]["test"]["by_lesion"]  # the card counts lesion by lesion too, the same way
    for side in ("one_photo", "all_photos"):
        for k in ("auroc", "sensitivity", "specificity", "balanced_accuracy"):
            assert lesions[side][k] == pytest.approx(at_training[side][k], abs=1e-6), (side, k)
    assert card["metrics"]["valid"]["by_lesion"]["n_lesions"] == card["split_lesions"]["valid"]
    for name in m["plots"]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    for column in ("sex", "age", "localization", "dx_type"):  # the HAM10000 metadata: every image in one subgroup
        assert sum(r["n"] for r in m["subgroups"] if r["column"] == column) == m["n"]
    printed = capsys.readouterr().out
    assert "auroc" in printed and "by subgroup" in printed and "site: " in printed
    assert "at other prevalences" in printed and "of 50 malignant found" in printed
    assert "net benefit at the threshold" in printed
    assert "lesion by lesion" in printed and "photos of lesion: 1" in printed


def test_evaluate_labelled_images_with_tta_and_no_positives(trained, originals_dir, originals_meta, tmp_path):
    benign = originals_meta[originals_meta["dx"].isin(["nv", "bkl"])][["image_id", "dx"]]
    benign.to_csv(tmp_path / "benign.csv", index=False)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(trained), "--images", str(originals_dir / "images"),
                     "--labels", str(tmp_path / "benign.csv"), "--tta", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["tta"] is True and m["n"] == len(benign)
    assert m["auroc"] is None and m["sensitivity"] is None  # undefined without a malignant image, and said so
    assert "roc.png" not in m["plots"] and "decision_curve.png" not in m["plots"] and (out / "confusion.png").exists()
    assert "net_benefit" not in m
    assert "subgroups" not in m and "subgroups.png" not in m["plots"]  # image_id,dx: no metadata to group by
    assert "by_lesion" not in m and "lesions.png" not in m["plots"]  # nor lesion ids


def test_predictions_through_the_inference_copy_are_fastais(trained, originals_dir, originals_meta):
    clf = load(trained)
    df = originals_meta.assign(path=[originals_dir / "images" / f"{i}.jpg" for i in originals_meta["image_id"]])
    probs, targets = predict_frame(clf.learn, df, bs=5)
    fast_probs, fast_targets = clf.predict_frame(df)
    np.testing.assert_allclose(fast_probs, probs, atol=1e-5)
    np.testing.assert_array_equal(fast_targets, targets)
    assert targets.sum() == originals_meta["dx"].isin(["mel", "bcc", "akiec"]).sum()


def test_evaluation_shows_progress_and_predict_keeps_stdout_for_its_json(trained, originals_dir, originals_meta,
                                                                         monkeypatch):
    from skincancer import classifier

    bars, real = [], classifier.progress_bar
    monkeypatch.setattr(classifier, "progress_bar", lambda gen, **kwargs: bars.append(len(gen)) or real(gen, **kwargs))
    monkeypatch.setattr(classifier, "on_terminal", lambda: True)  # bars are drawn on a terminal only
    clf = load(trained)
    df = originals_meta.assign(path=[originals_dir / "images" / f"{i}.jpg" for i in originals_meta["image_id"]])
    clf.predict_frame(df, bs=5)
    assert bars == [3]  # one bar over the 3 batches of 14 images
    clf.predict_batch(list(df["path"]), bs=5)  # a console bar would write into `predict`'s JSON lines on stdout
    assert bars == [3]


def test_tta_through_the_inference_copy_is_fastais(trained, originals_dir, originals_meta):
    from fastai.torch_core import set_seed

    clf = load(trained)
    own = clf.learn.model
    df = originals_meta.assign(path=[originals_dir / "images" / f"{i}.jpg" for i in originals_meta["image_id"]])
    set_seed(3)  # fastai's augmentation draws from Python's, NumPy's and torch's generators
    fastai_tta, _ = predict_frame(clf.learn, df, tta=True, bs=5)
    batches = []
    hook = clf.model.register_forward_hook(lambda module, args, out: batches.append(len(out)))
    set_seed(3)
    copy_tta, targets = clf.predict_frame(df, tta=True, bs=5)
    hook.remove()
    plain, _ = clf.predict_frame(df, bs=5)
    assert sum(batches) == 5 * len(df)  # four augmented passes and a plain one, all through the inference copy
    # the dermoscopy check is scored on the plain pass of those five, no sixth pass for it
    batches.clear()
    hook = clf.model.register_forward_hook(lambda module, args, out: batches.append(len(out)))
    _, _, tta_scores = clf.predict_checked(df, tta=True, bs=5)
    hook.remove()
    assert sum(batches) == 5 * len(df)
    np.testing.assert_allclose(tta_scores, clf.predict_checked(df, bs=5)[2], rtol=1e-5)
    np.testing.assert_allclose(copy_tta, fastai_tta, atol=1e-5)  # the same augmented views, the same mix
    assert np.abs(copy_tta - plain).max() > 1e-3  # and they were augmented
    assert clf.learn.model is own and clf.model is not own  # the learner has its own network back, for Grad-CAM
    assert targets.sum() == originals_meta["dx"].isin(["mel", "bcc", "akiec"]).sum()


def test_evaluate_needs_labels_with_images(trained, originals_dir, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(trained), "--images", str(originals_dir),
                     "--out", str(tmp_path)]) == 2
    assert "--images needs --labels" in capsys.readouterr().err


def test_a_calibrated_model_predicts_and_evaluates_on_the_calibrated_scale(trained, ham_dir, original_images,
                                                                             tmp_path):
    from skincancer.evaluate import evaluate, read_test_split

    cal = {"method": "platt", "slope": 0.6, "intercept": -1.2, "fitted_on": "valid"}
    model = calibrated_copy(trained, tmp_path, cal)
    plain, calibrated = load(trained), load(model)
    assert calibrated.calibration == cal and plain.calibration == json.loads(trained.with_suffix(".json")
                                                                             .read_text())["calibration"]
    raw = float(plain.learn.predict(original_images[0])[2][1])
    res = calibrated.predict(original_images[0])
    assert res["malignant_probability"] == pytest.approx(float(expit(0.6 * logit(raw) - 1.2)), rel=1e-5)
    assert res["probabilities"]["malignant"] == pytest.approx(res["malignant_probability"])
    assert sum(res["probabilities"].values()) == pytest.approx(1.0)
    assert res["call"] == plain.predict(original_images[0])["call"]
    # evaluate: the same calls and AUROC as the plain model, another probability and its own reliability plot
    df = read_test_split(trained, ham_dir)
    a, b = (evaluate(clf, df, tmp_path / name, n_boot=0, gradcam_images=0)
            for clf, name in ((plain, "plain"), (calibrated, "calibrated")))
    for key in ("auroc", "sensitivity", "specificity", "confusion_at_threshold"):
        assert a[key] == b[key], key
    assert b["calibration"] == cal and b["threshold"] == calibrated.threshold != a["threshold"]
    assert b["brier_uncalibrated"] == pytest.approx(a["brier"] if a["calibration"] is None else a["brier_uncalibrated"])
    # the mean probability is of the scores mapped by this model's calibration (not compared with the plain model's:
    # whether the map raises or lowers the mean depends on where this tiny model's scores lie)
    scores = plain.probabilities([open_image(p) for p in df["path"]])[:, 1]
    assert b["mean_probability"] == pytest.approx(float(np.mean(calibrate(scores, cal))), abs=1e-5)
    assert b["mean_probability"] != pytest.approx(a["mean_probability"], abs=1e-3)


def test_compare_two_models_on_the_test_split_they_share(trained, ham_dir, tmp_path, capsys):
    # a 7-diagnosis model trained on the binary model's split: both are tested on the same images
    dx = tmp_path / "dx.pkl"
    assert cli.main(["train", "--data", str(ham_dir), "--task", "dx", "--no-pretrained", "--size", "32", "--bs", "32",
                     "--epochs", "1", "--workers", "0", "--split-from", str(trained.with_suffix(".split.csv")),
                     "--out", str(dx)]) == 0
    capsys.readouterr()
    out = tmp_path / "compare"
    assert cli.main(["compare", "--models", str(trained), str(dx), "--data", str(ham_dir), "--out", str(out),
                     "--bootstrap", "200"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    cards = [json.loads(m.with_suffix(".json").read_text()) for m in (trained, dx)]
    assert result["n"] == cards[0]["split_images"]["test"] == cards[1]["split_images"]["test"]
    assert [result["a"]["task"], result["b"]["task"]] == ["binary", "dx"] and result["names"] == ["smoke", "dx"]
    for key, card in zip("ab", cards):  # each model's metrics are the ones its export measured on test
        assert result[key]["auroc"] == pytest.approx(card["metrics"]["test"]["auroc"], abs=1e-6)
        assert result[key]["threshold"] == card["threshold"]
    auroc = result["difference"]["auroc"]
    assert auroc["difference"] == pytest.approx(result["b"]["auroc"] - result["a"]["auroc"])
    assert result["difference"]["resampled"] == "lesions" and len(auroc["ci"]) == 2
    for plot in ("comparison.png", "comparison_subgroups.png"):
        with Image.open(out / plot) as img:
            assert img.format == "PNG" and min(img.size) > 100
    assert result["plots"] == ["comparison.png", "comparison_subgroups.png"]
    assert {r["column"] for r in result["subgroups"]} >= {"sex", "age", "localization", "dx_type"}
    assert sum(r["n"] for r in result["subgroups"] if r["column"] == "sex") == result["n"]
    lesions = result["by_lesion"]  # each model calls each lesion on the mean of its photos, paired
    df = pd.read_csv(trained.with_suffix(".split.csv"))
    assert lesions["n_lesions"] == df.loc[df["split"] == "test", "lesion_id"].nunique()
    assert lesions["difference"]["resampled"] == "lesions"
    clf = load(trained)
    test = read_test_split(trained, ham_dir)
    y, p = malignant_scores(*clf.predict_frame(test), clf.classes, clf.calibration)
    y_lesion, p_lesion, _ = lesion_scores(test["lesion_id"], y, p)
    assert lesions["difference"]["auroc"]["a"] == pytest.approx(roc_auc_score(y_lesion, p_lesion), abs=1e-6)
    assert lesions["difference"]["sensitivity"]["a"] == pytest.approx((p_lesion[y_lesion] >= clf.threshold).mean())
    at = {r["threshold"]: r for r in result["net_benefit"]}  # at the exchange each model's threshold implies
    assert sorted(at) == sorted({cards[0]["threshold"], cards[1]["threshold"]})
    assert at[clf.threshold]["a"] == pytest.approx(net_benefit(y, p, [clf.threshold])[0], abs=1e-6)
    stdout = capsys.readouterr().out
    assert "B = dx against A = smoke" in stdout and "balanced_accuracy" in stdout
    assert "by subgroup (dx - smoke" in stdout and "confirmed by: histo" in stdout and "lesion by lesion" in stdout
    assert "net benefit at threshold probability" in stdout
    assert "not a medical device" in stdout


def test_compare_refuses_models_tested_on_different_images(trained, ham_dir, tmp_path, capsys):
    import shutil

    for suffix in (".pkl", ".safetensors", ".json", ".split.csv", ".check.safetensors"):
        shutil.copy(trained.with_suffix(suffix), tmp_path / f"other{suffix}")
    split = pd.read_csv(tmp_path / "other.split.csv")
    split.loc[split.index[split["split"] == "test"][0], "split"] = "train"  # one test image trained the other
    split.to_csv(tmp_path / "other.split.csv", index=False)
    assert cli.main(["compare", "--models", str(trained), str(tmp_path / "other.pkl"), "--data", str(ham_dir),
                     "--out", str(tmp_path / "compare")]) == 2
    err = capsys.readouterr().err
    assert "smoke.split.csv and other.split.csv test different images (1 only in the first, 0 only in the second" in err
    assert f"--split-from {trained.with_suffix('.split.csv')}" in err
    assert not (tmp_path / "compare").exists()


def test_a_fine_tuned_efficientnet_evaluates_with_tta_and_serves_in_the_app(trained_lite0, originals_dir,
                                                                            originals_meta, tmp_path, capsys):
    from skincancer.app import analyse

    originals_meta[["image_id", "dx"]].to_csv(tmp_path / "labels.csv", index=False)
    assert cli.main(["evaluate", "--model", str(trained_lite0), "--images", str(originals_dir / "images"),
                     "--labels", str(tmp_path / "labels.csv"), "--tta", "--bootstrap", "50",
                     "--out", str(tmp_path / "report")]) == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["tta"] and 0 <= metrics["auroc"] <= 1 and "gradcam.png" in metrics["plots"]
    # dermoscopy photos from a camera at full size: the check, fitted on the 200x150 copies, lets them through
    assert metrics["dermoscopy_check"]["n"] == len(originals_meta)
    assert metrics["dermoscopy_check"]["passed"] >= 12 / 14, metrics["dermoscopy_check"]["refused"]
    out = capsys.readouterr().out
    assert "threshold " in out and "dermoscopy check: " in out
    text, call, data, overlay = analyse(load(trained_lite0), str(originals_dir / "images" / "ISIC_0024306.jpg"))
    assert "Probability of malignancy" in text and call == data["call"] and overlay is not None
    assert set(data["probabilities"]) == {"benign", "malignant"}
