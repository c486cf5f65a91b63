"""The two tasks' vocabularies and what counts as malignant: HAM10000's seven diagnoses."""

from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import SkinCancerError

Task = Literal["binary", "dx"]
TASKS: tuple[str, ...] = ("binary", "dx")
DX_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
MALIGNANT_DX: frozenset[str] = frozenset({"mel", "bcc", "akiec"})
BINARY_CLASSES: tuple[str, ...] = ("benign", "malignant")
DX_NAMES: dict[str, str] = {
    "akiec": "actinic keratosis / intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesion",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevus",
    "vasc": "vascular lesion",
}


def check_task(task: str) -> str:
    """Return `task` if it is a known task, else raise SkinCancerError."""
    if task not in TASKS:
        raise SkinCancerError(f"task: {task!r} is not one of {', '.join(TASKS)}")
    return task


def classes_for(task: str) -> tuple[str, ...]:
    """The fixed, ordered vocabulary of a task (malignant is last for `binary`)."""
    return BINARY_CLASSES if check_task(task) == "binary" else DX_CLASSES


def label_of(dx: str, task: str) -> str:
    """The label of one diagnosis under `task`."""
    if check_task(task) == "dx":
        return dx
    return "malignant" if dx in MALIGNANT_DX else "benign"


def is_malignant_class(classes) -> np.ndarray:
    """Boolean mask over `classes`: which ones count as malignant ('malignant', or mel, bcc, akiec)."""
    return np.array([str(c) == "malignant" or str(c) in MALIGNANT_DX for c in classes], dtype=bool)


def task_of(classes) -> str:
    """The task a model's vocabulary belongs to."""
    return "binary" if [str(c) for c in classes] == list(BINARY_CLASSES) else "dx"


def malignant_probability(probs: np.ndarray, classes) -> np.ndarray:
    """Probability of malignancy from class probabilities: the malignant class, or the sum of mel, bcc and akiec."""
    mask = is_malignant_class(classes)
    if not mask.any():
        raise SkinCancerError(f"classes {list(classes)} name neither 'malignant' nor any of {sorted(MALIGNANT_DX)}")
    return np.asarray(probs)[..., mask].sum(axis=-1)
