"""The model copied to predict fast on a CPU: eval mode, each BatchNorm folded into its convolution, channels_last."""

from __future__ import annotations

import copy
import warnings

import torch
from torch.fx.experimental.optimization import fuse


def inference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` for prediction only: in eval mode, each BatchNorm folded into its convolution, channels_last.

    Folding removes a pass over every activation and channels_last is oneDNN's preferred layout on a CPU; the copy
    computes the same function (to float rounding), and the learner's own model stays as trained. A (body, head)
    network is folded part by part, so the copy keeps the two parts Grad-CAM needs.
    """
    model = copy.deepcopy(model).eval()
    if isinstance(model, torch.nn.Sequential):
        model = torch.nn.Sequential(*(_folded(part) for part in model))
    else:
        model = _folded(model)
    return model.to(memory_format=torch.channels_last)


def _folded(module: torch.nn.Module) -> torch.nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fuse(module)
    except Exception:  # an architecture torch.fx cannot trace keeps its BatchNorms: slower, the same predictions
        return module
