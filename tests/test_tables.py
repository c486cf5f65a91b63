"""The text tables say what each number counts."""

from __future__ import annotations

import re

import numpy as np

from skincancer.labels import DX_CLASSES
from skincancer.metrics import classification_metrics
from skincancer.tables import metrics_table


def test_metrics_table_tells_class_recall_from_the_benign_malignant_call():
    targets = np.array([0, 4, 4, 5, 5, 5])  # akiec, mel, mel, nv, nv, nv
    probs = np.full((6, 7), 0.01)
    probs[[0, 1, 2, 3, 4, 5], [1, 4, 5, 5, 5, 0]] = 0.94  # akiec -> bcc, mel -> mel, mel -> nv, nv, nv, nv -> akiec
    dx = np.array(DX_CLASSES)[targets]
    table = metrics_table(classification_metrics(probs, targets, DX_CLASSES, threshold=0.5, dx=dx))
    by_class = table.split("recall per class")[1].split("recall per diagnosis")[0]
    by_call = table.split("recall per diagnosis")[1]
    # 7-class recall: akiec named bcc is wrong; the benign/malignant call on it (malignant) is right
    assert re.search(r"akiec\s+0\.0000", by_class) and re.search(r"akiec\s+1\.0000", by_call)
    assert re.search(r"mel\s+0\.5000", by_class) and re.search(r"nv\s+0\.6667", by_class)
    assert re.search(r"mel\s+0\.5000", by_call) and re.search(r"nv\s+0\.6667", by_call)
    assert re.search(r"bcc\s+null", by_class)  # no bcc image: undefined, not 0
    binary = metrics_table(classification_metrics(probs[:, [5, 4]], (targets == 4).astype(int),
                                                  ["benign", "malignant"], dx=dx))
    assert "recall per class" not in binary and "recall per diagnosis" in binary
    # which call accuracy scores: a binary model's is the threshold's, a dx model's the most likely diagnosis
    assert re.search(r"balanced_accuracy\s+\S+\s+\(at the threshold\)", binary)
    assert re.search(r"balanced_accuracy\s+\S+\s+\(7 classes, most likely diagnosis\)", table)
