"""A fastai learner behind the `Predictor` interface: batched prediction through a fast inference copy of the
network, test-time augmentation, and Grad-CAM from the same pass."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.core import Callback
from fastprogress.fastprogress import progress_bar

from .config import MAX_BATCH
from .console import on_terminal
from .data import add_labels
from .gradcam import class_activation, heat_overlay
from .images import ImageInput, describe, open_photo
from .labels import task_of
from .inference import inference_model
from .activations import Taps
from .predictor import Predictor


@dataclass
class Classifier(Predictor):
    """An exported fastai learner with its model card."""

    learn: Any = None
    can_explain = True

    @property
    def classes(self) -> list[str]:
        """The class names, in the model's output order."""
        return [str(c) for c in self.learn.dls.vocab]

    @functools.cached_property
    def model(self):
        """The network made ready for prediction only (`inference_model`), copied from the learner at first use."""
        return inference_model(self.learn.model)

    @property
    def batch_size(self) -> int:
        """The default batch size: on a CPU, `Predictor.batch_size`; MAX_BATCH on a GPU."""
        return MAX_BATCH if next(self.learn.model.parameters()).device.type != "cpu" else super().batch_size

    def outputs(self, images: list, bs: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities and dermoscopy check scores (None without a check) of opened images, in one pass
        through fastai's test DataLoader and the inference copy."""
        dl = self.learn.dls.test_dl(images, bs=bs or self.batch_size, num_workers=0)
        with self._taps() as taps:
            probs = batch_preds(self.learn, dl, self.model, taps=taps)[0].numpy()
            return probs, self._check_scores(taps)

    def predict_frame(self, df: pd.DataFrame, tta: bool = False, bs: int | None = None) -> tuple:
        """Class probabilities and targets of a labelled frame (`path`, `dx`) through the inference copy."""
        return self.predict_checked(df, tta=tta, bs=bs)[:2]

    def predict_checked(self, df: pd.DataFrame, tta: bool = False, bs: int | None = None) -> tuple:
        """`predict_frame`'s probabilities and targets, and each photo's dermoscopy check score (None without a
        check), from the same passes (with `tta`, from its plain one)."""
        with self._taps() as taps:
            probs, targets = predict_frame(self.learn, df, tta=tta, bs=bs or self.batch_size, model=self.model,
                                           taps=taps)
            return probs, targets, self._check_scores(taps)

    def _taps(self) -> contextlib.AbstractContextManager:
        return Taps(self.model, self.check.taps) if self.check else contextlib.nullcontext()

    def _check_scores(self, taps: Taps | None) -> np.ndarray | None:
        return None if taps is None or self.check is None else self.check.scores(taps.collected())

    def explain(self, image: ImageInput, target: str | int | None = None,
                check: bool = True) -> tuple[dict, np.ndarray, Any]:
        """`predict`'s result for one image, with its Grad-CAM heat map and overlay, from one pass.

        The probabilities and the dermoscopy check are `predict`'s (the same network, input and activation); the
        map is of `target` (default: malignant).
        """
        img = open_photo(image)
        x = self.learn.dls.test_dl([img], bs=1, num_workers=0).one_batch()[0]
        x = x.contiguous(memory_format=torch.channels_last)  # as batch_preds feeds the network
        with self._taps() as taps:
            cam, probs = class_activation(self.model, x, self.classes, target)
            if taps is not None:
                taps.keep()
            scores = self._check_scores(taps)
        heat, overlay = heat_overlay(img, cam, self.model[0], tuple(x.shape[-2:]))
        return self._result(describe(image), probs, None if scores is None else scores[0], check), heat, overlay

    def explain_lesion(self, images, target: str | int | None = None, check: bool = True) -> tuple[dict, list]:
        """`predict_lesion`'s result and each photo's Grad-CAM overlay, one pass a photo (`explain`)."""
        images, opened = self._open_lesion(images, "explain_lesion")
        explained = [self.explain(image, target, check) for image in opened]
        photos = [{**result, "image": describe(image)} for (result, _, _), image in zip(explained, images)]
        return self._lesion(photos, check), [overlay for _, _, overlay in explained]


class KeepTaps(Callback):
    """Keeps the tapped activation statistics of each batch fastai's own loops predict (`learn.tta`'s passes)."""

    def __init__(self, taps: Taps):
        self.taps = taps

    def after_pred(self):
        self.taps.keep()


@contextlib.contextmanager
def lent_model(learn, model):
    """Run fastai's loops on `learn` (`tta`, `get_preds`) through `model` for a while, then give back its own."""
    own, learn.model = learn.model, model
    try:
        yield learn
    finally:
        learn.model = own


def batch_preds(learn, dl, model, show_progress: bool = False, taps: Taps | None = None) -> tuple:
    """(probabilities, targets or None) of every batch of `dl` through `model`, with `learn`'s loss activation;
    `taps` (entered on `model`) keeps each batch's activation statistics."""
    activation = getattr(learn.loss_func, "activation", lambda x: x)
    probs: list = []
    targets: list = []
    batches = dl
    if show_progress and len(dl) > 1 and on_terminal():
        batches = progress_bar(dl, leave=False)
        batches.comment = f"predicting {len(dl.dataset):,} images"
    with torch.inference_mode():
        for batch in batches:
            x = batch[0].contiguous(memory_format=torch.channels_last)
            probs.append(activation(model(x)).float().cpu())
            if taps is not None:
                taps.keep()
            targets.extend(t.cpu() for t in batch[dl.n_inp:dl.n_inp + 1])
    return torch.cat(probs), (torch.cat(targets) if targets else None)


def predict_frame(learn, df: pd.DataFrame, tta: bool = False, bs: int = 64, model=None,
                  taps: Taps | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and targets for a frame with `path` and `dx`, through the learner's validation pipeline.

    With `model` (a loaded model's `Classifier.model`), the batches go through it, not `learn.model`; with `tta`,
    fastai's `learn.tta` does (its augmented passes and their mix with the plain one). `taps`, entered on `model`,
    keeps the plain pass's activation statistics.
    """
    dl = learn.dls.test_dl(add_labels(df, task_of(learn.dls.vocab)), with_labels=True, bs=bs)
    metrics, learn.metrics = learn.metrics, []  # computed here from the predictions, not by fastai per pass
    try:
        if tta:
            kept = learn.added_cbs(KeepTaps(taps)) if taps is not None else contextlib.nullcontext()
            with lent_model(learn, learn.model if model is None else model), kept:
                probs, targets = learn.tta(dl=dl)
            if taps is not None:  # the check scores the plain pass, fastai's last
                taps.kept = taps.kept[-len(dl):]
        elif model is not None:
            probs, targets = batch_preds(learn, dl, model, show_progress=True, taps=taps)
        else:
            with learn.no_bar():
                probs, targets = learn.get_preds(dl=dl)
    finally:
        learn.metrics = metrics
    return probs.float().numpy(), targets.numpy()
