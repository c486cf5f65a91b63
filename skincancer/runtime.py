"""An exported .onnx model served with onnxruntime, numpy and Pillow alone: no torch, no fastai.

The graph takes photos squished to the model's presize as uint8 (N, presize, presize, 3) and does the rest of
fastai's validation pipeline itself (scale to 0-1, the bilinear resize to the model's size, the weights'
normalisation), so the one step left here is the one fastai does with Pillow too: the squish.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from .card import ModelCard
from .check import DermoscopyCheck
from .errors import SkinCancerError
from .predictor import Predictor

INPUT, OUTPUT = "image", "probabilities"  # the names an export gives the graph's input and output
FEATURES = "check_features"  # the graph's second output where the model has a dermoscopy check (check.py)


def presized(images: list, presize: int) -> np.ndarray:
    """Opened photos squished to `presize` as fastai's `Resize(presize, method='squish')` does: a uint8 batch NHWC."""
    return np.stack([np.asarray(img.resize((presize, presize), Image.Resampling.BILINEAR), dtype=np.uint8)
                     for img in images])


@dataclass
class OnnxPredictor(Predictor):
    """A model exported to ONNX, with its card; predicts as the fastai model it came from."""

    session: Any = None

    def outputs(self, images: list, bs: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (n, classes) of opened images, `bs` (or `batch_size`) at a time, and their dermoscopy
        check scores (None where the model or its graph has no check)."""
        bs = bs or self.batch_size
        presize = self.card.presize
        names = [OUTPUT] if self.check is None else [OUTPUT, FEATURES]  # load_onnx: a check has its output
        runs = [self.session.run(names, {INPUT: presized(images[i:i + bs], presize)})
                for i in range(0, len(images), bs)]
        probs = np.concatenate([r[0] for r in runs]).astype(np.float64)
        if self.check is None:
            return probs, None
        return probs, self.check.scores(np.concatenate([r[1] for r in runs]))


def onnx_session(data: bytes, source: Path, card: ModelCard) -> ort.InferenceSession:
    """An onnxruntime session of verified bytes, checked to take the photos the card describes; else one error."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime's notes are not the user's business
    try:
        session = ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # not an ONNX model, or one onnxruntime cannot run
        raise SkinCancerError(f"{source}: not a loadable ONNX model ({type(e).__name__}: {str(e)[:200]})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    presize = card.presize
    if (len(inputs) != 1 or inputs[0].name != INPUT or inputs[0].type != "tensor(uint8)"
            or list(inputs[0].shape)[1:] != [presize, presize, 3]):
        shape = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
        raise SkinCancerError(f"{source}: its input ({shape}) is not the photos this model card describes "
                              f"(image, uint8, [batch, {presize}, {presize}, 3])")
    if (outputs[0].name != OUTPUT or list(outputs[0].shape)[1:] != [len(card.classes)]
            or [o.name for o in outputs[1:]] not in ([], [FEATURES])):
        raise SkinCancerError(f"{source}: its output is not the {len(card.classes)} class probabilities "
                              "this model card describes")
    return session


def load_onnx(path: Path, card: ModelCard, data: bytes, check: DermoscopyCheck | None = None) -> OnnxPredictor:
    """An OnnxPredictor of the verified bytes `data` of `path`, with the export's dermoscopy check if it has one."""
    session = onnx_session(data, path, card)
    if FEATURES not in {o.name for o in session.get_outputs()}:
        check = None  # a graph exported before the check: it cannot give the features
    return OnnxPredictor(card=card, path=path, session=session, check=check)
