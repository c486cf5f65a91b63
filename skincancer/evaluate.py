"""Metrics that do not flatter an imbalanced problem: AUROC, balanced accuracy, sensitivity, specificity."""

from __future__ import annotations

import math

import numpy as np

from .data import MALIGNANT_DX, malignant_probability
from .errors import SkinCancerError


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def classification_metrics(probs, targets, classes, threshold: float = 0.5) -> dict:
    """Metrics for class probabilities `probs` (n, k) and integer `targets` (n,); undefined ones are None.

    accuracy and balanced_accuracy use the predicted class; auroc, sensitivity and specificity are about
    malignant vs benign, with malignant predicted when its probability reaches `threshold`.
    """
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    probs, targets, classes = np.asarray(probs, dtype=np.float64), np.asarray(targets), list(classes)
    if probs.ndim != 2 or probs.shape != (len(targets), len(classes)):
        raise SkinCancerError(f"probabilities of shape {probs.shape} do not match {len(targets)} targets "
                              f"and {len(classes)} classes")
    if len(targets) == 0:
        raise SkinCancerError("no images to evaluate")
    pred = probs.argmax(axis=1)
    malignant_set = {i for i, c in enumerate(classes) if c == "malignant" or c in MALIGNANT_DX}
    is_malignant = np.isin(targets, list(malignant_set))
    p_mal = malignant_probability(probs, classes)
    said_malignant = p_mal >= threshold
    n_pos, n_neg = int(is_malignant.sum()), int((~is_malignant).sum())
    out = {
        "n": int(len(targets)),
        "n_malignant": n_pos,
        "accuracy": float((pred == targets).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(targets, pred)),
        "auroc": float(roc_auc_score(is_malignant, p_mal)) if n_pos and n_neg else None,
        "threshold": float(threshold),
        "sensitivity": float(said_malignant[is_malignant].mean()) if n_pos else None,
        "specificity": float((~said_malignant[~is_malignant]).mean()) if n_neg else None,
    }
    if len(classes) > 2:
        present = np.unique(targets)
        if len(present) == len(classes):
            out["macro_auroc"] = float(roc_auc_score(targets, probs, multi_class="ovr", average="macro"))
        else:
            out["macro_auroc"] = None  # undefined while a class has no example
    return {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in out.items()}
