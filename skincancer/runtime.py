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
from .errors import SkinCancerError
from .predictor import Predictor

INPUT, OUTPUT = "image", "probabilities"  # the names an export gives the graph's input and output


def presized(images: list, presize: int) -> np.ndarray:
    """Opened photos squished to `presize` as fastai's `Resize(presize, method='squish')` does: a uint8 batch NHWC."""
    return np.stack([np.asarray(img.resize((presize, presize), Image.Resampling.BILINEAR), dtype=np.uint8)
                     for img in images])


@dataclass
class OnnxPredictor(Predictor):
    """A model exported to ONNX, with its card; predicts as the fastai model it came from."""

    session: Any = None

    def probabilities(self, images: list, bs: int | None = None) -> np.ndarray:
        """Class probabilities (n, classes) of opened images, `bs` (or `batch_size`) at a time."""
        bs = bs or self.batch_size
        presize = self.card.presize
        out = [self.session.run([OUTPUT], {INPUT: presized(images[i:i + bs], presize)})[0]
               for i in range(0, len(images), bs)]
        return np.concatenate(out).astype(np.float64)


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
    if len(outputs) != 1 or outputs[0].name != OUTPUT or list(outputs[0].shape)[1:] != [len(card.classes)]:
        raise SkinCancerError(f"{source}: its output is not the {len(card.classes)} class probabilities "
                              "this model card describes")
    return session


def load_onnx(path: Path, card: ModelCard, data: bytes) -> OnnxPredictor:
    """An OnnxPredictor of the verified bytes `data` of `path`."""
    return OnnxPredictor(card=card, path=path, session=onnx_session(data, path, card))
