"""The loss of a skincancer learner: fastai's cross-entropy, class-weighted, decoding a binary model's scores to its
call. A learner exported with it pickles a reference to `OperatingPointLoss` here."""

from __future__ import annotations

import numpy as np
import torch
from fastai.losses import CrossEntropyLossFlat

from .calibration import calibrate
from .config import IMBALANCE
from .data import class_weights
from .errors import SkinCancerError
from .labels import classes_for, is_malignant_class, malignant_probability, task_of


class OperatingPointLoss(CrossEntropyLossFlat):
    """fastai's `CrossEntropyLossFlat`, whose `decodes` gives a binary model's call at its operating threshold.

    As `BCEWithLogitsLossFlat(thresh=...)` does for fastai's multi-label models: once `set_operating_point` is given
    the model card's threshold and calibration, fastai's own `learn.predict` and `get_preds(with_decoded=True)`
    decode 'malignant' where the calibrated probability of malignancy reaches the threshold, the call
    `skincancer.predict` makes, instead of the argmax (0.5 on the network's class-weighted score). Training and
    `activation` (the softmax) are unchanged; a 7-diagnosis model decodes to its most likely diagnosis.
    """

    threshold: float | None = None
    calibration: dict | None = None
    classes: list[str] | None = None

    def set_operating_point(self, classes, threshold: float, calibration: dict | None) -> None:
        """Decode a binary model's scores to the call at `threshold` on the probability `calibration` maps them to."""
        self.classes, self.threshold, self.calibration = [str(c) for c in classes], float(threshold), calibration

    def decodes(self, x):
        """The class index the model calls: at the operating threshold for a binary model once set, else argmax."""
        if self.threshold is None or not self.classes or task_of(self.classes) != "binary":
            return super().decodes(x)
        probs = x.detach().float().cpu().numpy()
        called = calibrate(malignant_probability(probs, self.classes), self.calibration) >= self.threshold
        malignant = int(np.flatnonzero(is_malignant_class(self.classes))[0])
        return torch.as_tensor(np.where(called, malignant, 1 - malignant), device=x.device)


def make_loss(task: str, train_labels=None, imbalance: str = "loss") -> OperatingPointLoss:
    """Cross-entropy, class-weighted by inverse frequency of `train_labels` when `imbalance == 'loss'`."""
    if imbalance not in IMBALANCE:
        raise SkinCancerError(f"imbalance: {imbalance!r} is not one of {', '.join(IMBALANCE)}")
    weight = None
    if imbalance == "loss":
        if train_labels is None:
            raise SkinCancerError("imbalance='loss' needs the training labels to weigh the classes")
        weight = torch.tensor(class_weights(train_labels, classes_for(task)), dtype=torch.float32)
    return OperatingPointLoss(weight=weight)
