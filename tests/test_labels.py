"""The two tasks' vocabularies: which diagnoses are malignant, and the probability of malignancy."""

from __future__ import annotations

import numpy as np
import pytest

from skincancer import SkinCancerError
from skincancer.labels import BINARY_CLASSES, DX_CLASSES, MALIGNANT_DX, classes_for, label_of, malignant_probability


def test_malignant_is_mel_bcc_akiec_and_every_other_dx_is_benign():
    assert {dx for dx in DX_CLASSES if label_of(dx, "binary") == "malignant"} == {"mel", "bcc", "akiec"}
    assert [label_of(dx, "dx") for dx in DX_CLASSES] == list(DX_CLASSES)
    assert classes_for("binary") == BINARY_CLASSES == ("benign", "malignant")  # malignant is the positive, last
    with pytest.raises(SkinCancerError, match="task"):
        classes_for("melanoma")


def test_malignant_probability_sums_the_malignant_diagnoses():
    probs = np.random.default_rng(0).dirichlet(np.ones(7), size=5)
    expected = probs[:, [DX_CLASSES.index(d) for d in MALIGNANT_DX]].sum(axis=1)
    np.testing.assert_allclose(malignant_probability(probs, DX_CLASSES), expected)
    np.testing.assert_allclose(malignant_probability(probs[:, :2], BINARY_CLASSES), probs[:, 1])
