"""Fitting the dermoscopy check (check.py) on a trained learner: the activation statistics of its training photos,
the threshold on its validation photos; written beside an export (NAME.check.safetensors) and named in its card."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import save_file

from .activations import Taps, tap_names
from .card import ModelCard
from .check import CHECK_FIT_PHOTOS, DermoscopyCheck, fit_check
from .classifier import Classifier, batch_preds
from .data import read_metadata, read_split
from .errors import SkinCancerError
from .files import atomic_path, model_files, sha256_file, write_json_atomic
from .inference import inference_model
from .predict import load


def split_features(learn, model, taps: Taps, df: pd.DataFrame, bs: int = 64) -> np.ndarray:
    """The tapped statistics of a frame's photos (`path`) through `model`, fastai's validation pipeline in front."""
    dl = learn.dls.test_dl(df["path"].tolist(), bs=bs, num_workers=0)
    with taps:
        batch_preds(learn, dl, model, show_progress=True, taps=taps)
        return taps.collected()


def fit_dermoscopy_check(learn, df: pd.DataFrame, size: int,
                         fit_photos: int = CHECK_FIT_PHOTOS) -> tuple[DermoscopyCheck, dict]:
    """The check fitted on (at most `fit_photos` of) the training split, its threshold set on valid; and what the
    card says of the fit: the photos it was fitted on and the share of each held-out split's photos that pass."""
    model = inference_model(learn.model)  # the copy prediction runs: the same modules, so the same taps
    taps = Taps(model, tap_names(model, size))
    train = df[df["split"] == "train"]
    train = train.sample(min(fit_photos, len(train)), random_state=0)
    features = {"train": split_features(learn, model, taps, train)}
    widths = taps.widths
    for split in ("valid", "test"):
        if (df["split"] == split).any():
            features[split] = split_features(learn, model, taps, df[df["split"] == split])
    if "valid" not in features:
        raise SkinCancerError("the dermoscopy check needs validation photos to set its threshold")
    check = fit_check(features["train"], features["valid"], taps.names, widths)
    passed = {s: float(check.passes(check.scores(f)).mean()) for s, f in features.items() if s != "train"}
    return check, {"fitted_on": f"{len(train)} photos of the training split", "passed": passed}


def check_record(check: DermoscopyCheck, fit: dict, written: Path, name: str) -> dict:
    """The card's `check`: what is scored, the threshold, `fit_dermoscopy_check`'s summary, the file `name` and the
    sha256 of the bytes `written` (its temporary path, before the rename)."""
    return {**check.record(), **fit, "file": name, "sha256": sha256_file(written)}


def write_check(check: DermoscopyCheck, path: Path) -> None:
    """The check's arrays as safetensors at `path` (the caller renames it into place)."""
    save_file(check.tensors(), str(path))


def add_check(model_path: str | Path, data: str | Path) -> tuple[ModelCard, Path]:
    """Fit the dermoscopy check of an export that has none (or replace its check) from the HAM10000 folder it was
    trained on, by the split recorded beside it; the card is rewritten last. Returns the new card and the file."""
    clf = load(model_path)
    if not isinstance(clf, Classifier):
        raise SkinCancerError(f"{model_path}: the check is fitted on the fastai model (NAME.pkl), not an ONNX one")
    files = model_files(model_path)
    df = read_metadata(data)
    df = df.assign(split=read_split(files["split"], df)).dropna(subset=["split"])
    check, fit = fit_dermoscopy_check(clf.learn, df, clf.card.size)
    with atomic_path(files["check"]) as tmp:
        write_check(check, tmp)
        card = dataclasses.replace(clf.card, check=check_record(check, fit, tmp, files["check"].name))
    write_json_atomic(files["card"], card.to_dict())
    return card, files["check"]
