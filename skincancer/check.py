"""The dermoscopy check: does a photo look like the photos the model was trained on? No torch here (a serve-only
install checks too): the network's activations come in as features, this scores them.

The features are each channel's mean and standard deviation after early blocks of the network (`activations.py`
picks the layers and computes them): colour, texture and contrast statistics that a dermoscopy photo's skin, light
and lens share, and a temple, a face, a screenshot or a page do not. Each layer's features are scored by their
Mahalanobis distance from the training photos' (Ledoit-Wolf covariance, so the few thousand photos pin down
hundreds of features), divided by the median distance of the validation photos; the score is the mean over layers.
The threshold lets CHECK_PASS of the validation photos through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .card import ModelCard, verify_file
from .errors import SkinCancerError
from .files import model_files

CHECK_PASS = 0.99  # share of validation photos the threshold lets through
CHECK_FIT_PHOTOS = 4000  # training photos the statistics are fitted on, at most (more changes nothing measurable)


@dataclass
class DermoscopyCheck:
    """The fitted check: per layer (`taps`), the training features' mean and precision; the score's threshold."""

    taps: list[str]  # the network's modules whose outputs are summarised, in the order of the features
    widths: list[int]  # features per tap (twice its channels: means, then standard deviations)
    means: list[np.ndarray]
    precisions: list[np.ndarray]
    scales: np.ndarray  # each tap's median validation distance: the taps' distances on one scale
    threshold: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        """The score of each row of `features` (n, sum(widths)): 1 is a typical validation photo's, higher is
        further from the training photos."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != sum(self.widths):
            raise SkinCancerError(f"the dermoscopy check takes {sum(self.widths)} features a photo, not "
                                  f"{features.shape[1:] if features.ndim == 2 else features.shape}")
        return np.mean([d / s for d, s in zip(self._distances(features), self.scales)], axis=0)

    def _distances(self, features: np.ndarray) -> list[np.ndarray]:
        out, start = [], 0
        for width, mean, precision in zip(self.widths, self.means, self.precisions):
            d = features[:, start:start + width] - mean
            out.append(np.sqrt(np.maximum(((d @ precision) * d).sum(1), 0)))
            start += width
        return out

    def passes(self, scores: np.ndarray | float) -> np.ndarray:
        """Whether each score is within the threshold: the photo looks like dermoscopy."""
        return np.asarray(scores) <= self.threshold

    def record(self) -> dict:
        """What the model card says of the check (the arrays live in NAME.check.safetensors)."""
        return {"score": "Mahalanobis distance of early layers' channel statistics from the training photos'",
                "taps": list(self.taps), "threshold": self.threshold, "valid_pass": CHECK_PASS}

    def tensors(self) -> dict[str, np.ndarray]:
        """The check's arrays by name, as NAME.check.safetensors holds them."""
        out = {"scales": self.scales.astype(np.float64), "threshold": np.array([self.threshold])}
        for i, (mean, precision) in enumerate(zip(self.means, self.precisions)):
            out[f"mean.{i}"], out[f"precision.{i}"] = mean.astype(np.float64), precision.astype(np.float64)
        return out


def check_from_tensors(tensors: dict[str, np.ndarray], taps: list[str], source: str) -> DermoscopyCheck:
    """A check from NAME.check.safetensors' arrays and the taps its card names; SkinCancerError naming `source`."""
    try:
        means = [tensors[f"mean.{i}"] for i in range(len(taps))]
        precisions = [tensors[f"precision.{i}"] for i in range(len(taps))]
        check = DermoscopyCheck(taps=list(taps), widths=[len(m) for m in means], means=means, precisions=precisions,
                                scales=tensors["scales"], threshold=float(tensors["threshold"][0]))
    except (KeyError, IndexError) as e:
        raise SkinCancerError(f"{source}: not the dermoscopy check its model card describes (no {e})") from None
    if any(p.shape != (w, w) for p, w in zip(precisions, check.widths)) or len(check.scales) != len(taps):
        raise SkinCancerError(f"{source}: its arrays' shapes do not fit one another")
    return check


def fit_check(train: np.ndarray, valid: np.ndarray, taps: list[str], widths: list[int],
              valid_pass: float = CHECK_PASS) -> DermoscopyCheck:
    """Fit the check on training photos' features and set its threshold so `valid_pass` of the validation photos'
    pass."""
    from sklearn.covariance import LedoitWolf  # training only: a serve-only install scores, never fits

    train, valid = np.asarray(train, dtype=np.float64), np.asarray(valid, dtype=np.float64)
    means, precisions, start = [], [], 0
    for width in widths:
        lw = LedoitWolf().fit(train[:, start:start + width])
        means.append(lw.location_)
        precisions.append(lw.precision_)
        start += width
    check = DermoscopyCheck(taps=list(taps), widths=list(widths), means=means, precisions=precisions,
                            scales=np.ones(len(taps)), threshold=np.inf)
    check.scales = np.array([np.median(d) for d in check._distances(valid)])
    check.threshold = float(np.quantile(check.scores(valid), valid_pass))
    return check


def read_check(model_path: str | Path, card: ModelCard) -> DermoscopyCheck | None:
    """The export's dermoscopy check (NAME.check.safetensors, verified against the card), or None where its card
    records none: an export made before the check, which still loads and predicts."""
    if not card.check:
        return None
    from safetensors.numpy import load  # numpy only: a serve-only install reads it too

    path = model_files(model_path)["check"]
    data = verify_file(path, card, "check")
    try:
        tensors = load(data)
    except Exception as e:  # not safetensors at all
        raise SkinCancerError(f"{path}: not a dermoscopy check file ({type(e).__name__}: {e})") from None
    return check_from_tensors(tensors, card.check["taps"], str(path))
