"""The fastai learner: the network for a task from its architecture and weights, the metrics it tracks, and the
memory setting a CPU run needs. What training builds; loading rebuilds it in rebuild.py."""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Callable

import numpy as np
import sklearn.metrics as skm
import torch
from fastai.callback.channelslast import ChannelsLast
from fastai.metrics import ActivationType, accuracy, skm_to_fastai
from fastai.optimizer import OptimWrapper
from fastai.vision.learner import vision_learner

from .arch import resolve_arch
from .labels import check_task
from .pretrained import WEIGHT_ERRORS, _pretrained_error, load_body_weights


# --- the learner -------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def reuse_freed_memory() -> bool:
    """Have glibc keep the memory PyTorch frees on a CPU for its next allocation, instead of unmapping it at once.

    A CPU step allocates and frees large activations; served by fresh mmaps, their page faults cost as much as the
    arithmetic (docs/speed.md). The process keeps its peak memory. Once per process; False off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def auroc_or_nan(targets, scores, **kwargs) -> float:
    """sklearn's roc_auc_score, or NaN while the targets lack a class (undefined: a small validation split)."""
    n_classes = 2 if np.ndim(scores) == 1 else np.shape(scores)[1]
    if len(np.unique(targets)) < n_classes:
        return float("nan")
    return float(skm.roc_auc_score(targets, scores, **kwargs))


def metrics_for(task: str) -> list:
    """fastai metrics for a task: accuracy, balanced accuracy, AUROC; sensitivity/specificity for `binary`."""
    ms = [accuracy, skm_to_fastai(skm.balanced_accuracy_score, name="balanced_accuracy")]
    if check_task(task) == "binary":
        # classes are (benign, malignant): index 1 is the positive class
        ms += [skm_to_fastai(auroc_or_nan, activation=ActivationType.BinarySoftmax, name="auroc"),
               skm_to_fastai(skm.recall_score, pos_label=1, name="sensitivity"),
               skm_to_fastai(skm.recall_score, pos_label=0, name="specificity")]
    else:
        ms += [skm_to_fastai(auroc_or_nan, activation=ActivationType.Softmax, flatten=False,
                             multi_class="ovr", average="macro", name="macro_auroc")]
    return ms


def monitor_for(task: str) -> str:
    """The validation metric that picks the best epoch: AUROC for `binary`, balanced accuracy for `dx`."""
    return "auroc" if check_task(task) == "binary" else "balanced_accuracy"


def fused_adamw():
    """fastai's AdamW (same betas, eps and true weight decay) as PyTorch's fused kernel, for `opt_func`."""
    return functools.partial(OptimWrapper, opt=torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, fused=True)


def make_learner(dls, task: str = "binary", arch: str | Callable = "resnet50", pretrained: bool = True,
                 weights: str | Path | None = None, loss_func=None, path: str | Path | None = None, **kwargs):
    """A fastai `vision_learner` with the task's metrics, started from ImageNet weights, a local file, or random.

    The DataLoaders normalise (with `normalization(arch)`); missing pretrained weights raise SkinCancerError. It trains
    in channels_last layout, and on a GPU in bf16 (fp16 where bf16 is missing) with fused AdamW.
    """
    fn = resolve_arch(arch)
    reuse_freed_memory()
    if torch.cuda.is_available():
        kwargs.setdefault("opt_func", fused_adamw())
    download = pretrained and weights is None
    try:
        learn = vision_learner(dls, fn, pretrained=download, normalize=False, metrics=metrics_for(task),
                               loss_func=loss_func, **kwargs)
    except WEIGHT_ERRORS as e:
        if not download:
            raise
        raise _pretrained_error(arch, e) from e
    if weights is not None:
        learn.weights_sha256 = load_body_weights(learn.model[0], fn, weights)
        learn.freeze()
    if path is not None:
        learn.path = Path(path)
    if torch.cuda.is_available():
        learn = learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    return learn.add_cb(ChannelsLast())  # the faster layout on a CPU (oneDNN's) as on a GPU: docs/speed.md
