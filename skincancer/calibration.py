"""The probability of malignancy, calibrated: a logistic map of the model's score fitted on the validation split.

A class-weighted loss (the default) trains the network as if benign and malignant were equally common, so its
scores run high. Platt scaling, sigmoid(slope * logit(score) + intercept), fitted on the validation images maps
scores back to the frequencies observed there. It is increasing, so AUROC and every call at the threshold (chosen
on the calibrated scale) stay as they were.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import SkinCancerError


FIT_BOUND = 17.0  # |logit| beyond which a float32 probability is 0 or 1


def _sigmoid(z) -> np.ndarray:
    # exp(-log(1 + exp(-z))): exact in both tails, with no overflow
    return np.exp(-np.logaddexp(0.0, -np.asarray(z, dtype=np.float64)))


def _logit(p) -> np.ndarray:
    # a float32 softmax can saturate at exactly 0 or 1; these bounds lie beyond every other float32 value
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, 1 - 2.0**-53)
    return np.log(p) - np.log1p(-p)


def _loss_and_gradient(w: np.ndarray, x: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
    z = w[0] * x + w[1]
    residual = _sigmoid(z) - t
    return float(np.mean(np.logaddexp(0, z) - t * z)), np.array([np.mean(residual * x), np.mean(residual)])


def fit_calibration(p_malignant, is_malignant) -> dict | None:
    """Platt scaling of these (validation) scores; None where undefined (one class only, or scores that rank backwards).

    The targets are Platt's (1999) smoothed ones, (n+ + 1)/(n+ + 2) and 1/(n- + 2), so that perfectly separated
    scores still give a finite fit. The log loss is convex in (slope, intercept); L-BFGS starts from the identity.
    """
    from scipy.optimize import minimize  # training only: serving an .onnx model runs without scipy

    # a float32 score saturates near logit +-16.6: a score of exactly 0 or 1 says "beyond that", not "at +-690",
    # and must not lever the fit (calibrate still maps each score on its own, so the order is kept)
    x, y = np.clip(_logit(p_malignant), -FIT_BOUND, FIT_BOUND), np.asarray(is_malignant, dtype=bool)
    if x.shape != y.shape or x.ndim != 1:
        raise SkinCancerError(f"{x.shape} scores do not match {y.shape} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    t = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    fit = minimize(_loss_and_gradient, np.array([1.0, 0.0]), args=(x, t), jac=True, method="L-BFGS-B",
                   options={"gtol": 1e-10, "ftol": 1e-14, "maxiter": 1000})
    slope, intercept = (float(v) for v in fit.x)
    if not slope > 0 or not math.isfinite(intercept):
        return None
    return {"method": "platt", "slope": slope, "intercept": intercept, "fitted_on": "valid",
            "n": n_pos + n_neg, "n_malignant": n_pos}


def check_calibration(calibration, where: str = "model card") -> dict | None:
    """The calibration of a model card, validated: None, or a Platt map with a finite positive slope."""
    if calibration is None:
        return None
    if not isinstance(calibration, dict) or calibration.get("method") != "platt":
        raise SkinCancerError(f"{where}: calibration must be null or an object with method 'platt', "
                              f"not {calibration!r}")
    for key in ("slope", "intercept"):
        value = calibration.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SkinCancerError(f"{where}: calibration {key} must be a finite number, not {value!r}")
    if calibration["slope"] <= 0:
        raise SkinCancerError(f"{where}: calibration slope must be positive (a map that keeps the ranking), "
                              f"not {calibration['slope']!r}")
    return calibration


def calibrate(p_malignant, calibration: dict | None):
    """The calibrated probability of malignancy for the model's scores; the scores unchanged without a calibration."""
    if calibration is None:
        return np.asarray(p_malignant, dtype=np.float64)
    return _sigmoid(calibration["slope"] * _logit(p_malignant) + calibration["intercept"])
