"""The calibrated probability of malignancy: the Platt fit, the order it keeps, the card that carries it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import scores_of_known_miscalibration

from skincancer import SkinCancerError
from skincancer.calibration import calibrate, check_calibration, fit_calibration
from skincancer.card import read_card
from skincancer.metrics import choose_threshold, classification_metrics


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
    card = {"task": "binary", "classes": ["benign", "malignant"], "arch": "resnet50", "size": 64, "presize": 96}
    (tmp_path / "m.json").write_text(json.dumps({**card, "calibration": bad}))
    with pytest.raises(SkinCancerError, match=f"m.json: calibration.*{message}"):
        read_card(tmp_path / "m.pkl")
    assert check_calibration(None) is None


