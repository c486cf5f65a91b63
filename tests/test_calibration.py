"""The calibrated probability of malignancy: the Platt fit, the order it keeps, the card that carries it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit, logit

from skincancer import SkinCancerError
from skincancer.calibration import calibrate, check_calibration, fit_calibration
from skincancer.metrics import choose_threshold, classification_metrics
from skincancer.predict import load, read_card


def scores_of_known_miscalibration(n=20_000, slope=0.5, intercept=-1.0, seed=0):
    """Labels drawn from true probabilities, and network scores whose logit maps onto them by (slope, intercept)."""
    rng = np.random.default_rng(seed)
    score_logit = rng.normal(0.5, 2.0, n)
    truth = rng.random(n) < expit(slope * score_logit + intercept)
    return expit(score_logit), truth


def test_the_fit_recovers_a_known_map_and_brings_the_mean_to_the_share_malignant():
    scores, truth = scores_of_known_miscalibration()
    cal = fit_calibration(scores, truth)
    assert cal["method"] == "platt" and cal["n"] == len(truth) and cal["n_malignant"] == truth.sum()
    assert cal["slope"] == pytest.approx(0.5, abs=0.03) and cal["intercept"] == pytest.approx(-1.0, abs=0.05)
    p = calibrate(scores, cal)
    # a logistic fit with an intercept matches the mean of its (Platt-smoothed) targets exactly
    n_pos, n_neg = truth.sum(), (~truth).sum()
    smoothed = np.where(truth, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    assert p.mean() == pytest.approx(smoothed.mean(), abs=1e-6)
    assert np.mean((p - truth) ** 2) < np.mean((scores - truth) ** 2)


def test_calibration_keeps_the_order_so_auroc_and_the_calls_do_not_move():
    scores, truth = scores_of_known_miscalibration(n=3000, seed=1)
    scores = scores.astype(np.float32)
    scores[:20], scores[20:40] = 0.0, 1.0  # a saturated float32 softmax
    cal = fit_calibration(scores, truth)
    p = calibrate(scores, cal)
    assert (np.argsort(p, kind="stable") == np.argsort(scores.astype(np.float64), kind="stable")).all()
    probs = lambda s: np.stack([1 - s, s], axis=1)  # noqa: E731
    raw = classification_metrics(probs(scores), truth.astype(int), ["benign", "malignant"],
                                 choose_threshold(scores, truth))
    calibrated = classification_metrics(probs(scores), truth.astype(int), ["benign", "malignant"],
                                        choose_threshold(p, truth), calibration=cal)
    for key in ("auroc", "sensitivity", "specificity", "balanced_accuracy", "confusion_at_threshold"):
        assert calibrated[key] == raw[key], key
    assert calibrated["brier_uncalibrated"] == pytest.approx(raw["brier"])
    assert raw["brier_uncalibrated"] is None


def test_saturated_scores_do_not_lever_the_fit():
    scores, truth = scores_of_known_miscalibration(seed=2)
    # right about the cases it is surest of, as a network is: exactly 1 for 100 malignant, 0 for 100 benign
    scores[np.flatnonzero(truth)[:100]], scores[np.flatnonzero(~truth)[:100]] = 1.0, 0.0
    assert fit_calibration(scores, truth)["slope"] == pytest.approx(0.5, abs=0.05)


def test_no_calibration_where_valid_cannot_give_one():
    assert fit_calibration([0.2, 0.9], [False, False]) is None  # one class only
    assert fit_calibration([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) is None  # ranked backwards
    assert (calibrate([0.3, 0.7], None) == [0.3, 0.7]).all()
    with pytest.raises(SkinCancerError, match="do not match"):
        fit_calibration([0.1, 0.2, 0.3], [True, False])


@pytest.mark.parametrize("bad, message", [
    ({"method": "isotonic", "slope": 1, "intercept": 0}, "method 'platt'"),
    ({"method": "platt", "slope": "1", "intercept": 0}, "slope must be a finite number"),
    ({"method": "platt", "slope": 1, "intercept": float("nan")}, "intercept must be a finite number"),
    ({"method": "platt", "slope": -0.5, "intercept": 0}, "slope must be positive"),
    ([1, 0], "method 'platt'"),
])
def test_a_broken_calibration_in_a_card_is_refused_naming_the_file(tmp_path, bad, message):
    (tmp_path / "m.json").write_text(json.dumps({"task": "binary", "calibration": bad}))
    with pytest.raises(SkinCancerError, match=f"m.json: calibration.*{message}"):
        read_card(tmp_path / "m.pkl")
    assert check_calibration(None) is None


def test_training_calibrates_on_valid_and_puts_the_threshold_on_that_scale(monkeypatch):
    from types import SimpleNamespace

    import pandas as pd

    from skincancer import evaluate as E
    from skincancer.train import evaluate_splits

    scores, truth = scores_of_known_miscalibration(n=4000, seed=3)
    split = np.where(np.arange(4000) < 2000, "valid", "test")
    df = pd.DataFrame({"split": split, "dx": np.where(truth, "mel", "nv"), "lesion_id": [f"L{i}" for i in range(4000)],
                       "label": np.where(truth, "malignant", "benign")})
    predictions = {s: (np.stack([1 - scores[split == s], scores[split == s]], axis=1), truth[split == s].astype(int))
                   for s in ("valid", "test")}
    monkeypatch.setattr(E, "predict_frame", lambda learn, part: predictions[part["split"].iloc[0]])
    learn = SimpleNamespace(dls=SimpleNamespace(vocab=["benign", "malignant"]))
    metrics, card = evaluate_splits(learn, df, target_sensitivity=0.9)
    valid = split == "valid"
    assert card["calibration"] == fit_calibration(scores[valid], truth[valid])
    assert card["threshold"] == choose_threshold(calibrate(scores[valid], card["calibration"]), truth[valid], 0.9)
    for s in ("valid", "test"):
        assert metrics[s]["threshold"] == card["threshold"]
        assert metrics[s]["brier"] < metrics[s]["brier_uncalibrated"]  # scores half as steep as the truth
        assert metrics[s]["mean_probability"] == pytest.approx(truth[split == s].mean(), abs=0.02)
    assert metrics["valid"]["sensitivity"] >= 0.9


def calibrated_copy(model, folder, cal):
    """The trained model's files under `folder`, its card given `cal` and its threshold mapped onto that scale.

    The threshold's network score is mapped by `cal`, so the copy makes the same calls as the model.
    """
    import shutil

    from skincancer.files import model_files

    for path in model_files(model).values():
        if path.exists():
            shutil.copy(path, folder / path.name)
    card_path = folder / model.with_suffix(".json").name
    card = json.loads(card_path.read_text())
    own = card["calibration"]  # None where the smoke model's validation scores rank backwards
    score = card["threshold"] if own is None else expit((logit(card["threshold"]) - own["intercept"]) / own["slope"])
    # just under the mapped threshold: a float rounding of the map must not flip the image that sits on it
    card.update(calibration=cal, threshold=float(calibrate(score, cal)) * (1 - 1e-12))
    card_path.write_text(json.dumps(card))
    return folder / model.name


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
    scores = plain.get_preds(plain.learn.dls.test_dl(list(df["path"]), num_workers=0))[0][:, 1].numpy()
    assert b["mean_probability"] == pytest.approx(float(np.mean(calibrate(scores, cal))), abs=1e-5)
    assert b["mean_probability"] != pytest.approx(a["mean_probability"], abs=1e-3)
