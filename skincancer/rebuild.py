"""An export's model: its weights saved as safetensors, and the learner rebuilt from them and the model card with
no pickle read (or, for trusted files only, unpickled as fastai's load_learner does)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pandas as pd
import torch
from fastai.torch_core import default_device
from fastai.vision.learner import vision_learner
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from .arch import resolve_arch
from .card import ModelCard
from .datablock import IMAGENET_STATS, Stats, make_datablock
from .errors import SkinCancerError
from .losses import OperatingPointLoss
from .model import reuse_freed_memory


# --- an export's model: saved, rebuilt without a pickle, copied to predict ------------------------

def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """The model's weights as safetensors: plain tensors, nothing that runs code when loaded."""
    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def card_stats(card: ModelCard) -> Stats:
    """The normalisation a model card records (ImageNet's where an older card records none)."""
    norm = card.normalize
    return (tuple(norm["mean"]), tuple(norm["std"])) if norm else IMAGENET_STATS


def rebuild_learner(card: ModelCard, weights: bytes, source: Path, cpu: bool = True):
    """A learner rebuilt from the card and safetensors `weights` (bytes already verified): no pickle is read."""
    reuse_freed_memory()
    dblock = make_datablock(card.task, card.size, card.presize, card_stats(card))
    with tempfile.TemporaryDirectory() as tmp:
        # fastai infers the pipeline's types from one item, as export does: a blank image, then emptied
        blank = Path(tmp) / "blank.png"
        Image.new("RGB", (8, 8)).save(blank)
        rows = pd.DataFrame({"path": [str(blank)] * 2, "label": [card.classes[0]] * 2, "is_valid": [False, True]})
        device = "cpu" if cpu else default_device()  # as load_learner(cpu=...): data and model on one device
        dls = dblock.dataloaders(rows, bs=64, num_workers=0, device=device).new_empty()
    if [str(c) for c in dls.vocab] != card.classes:
        raise SkinCancerError(f"{source}: classes {card.classes} do not match task {card.task!r}")
    loss_func = OperatingPointLoss()
    if "threshold" in card.present:  # the learner's own `predict` then calls as this package does
        loss_func.set_operating_point(card.classes, card.threshold, card.calibration)

    def build():
        return vision_learner(dls, resolve_arch(card.arch), pretrained=False, n_out=len(card.classes),
                              normalize=False, loss_func=loss_func)

    try:
        state = load_safetensors(weights)
        with torch.device("meta"):  # shapes only: initialising weights the file replaces was most of the load time
            learn = build()
        learn.model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in learn.model.buffers()):  # buffers made at init that no file holds: build for real
            learn = build()
            learn.model.load_state_dict(state)
        learn.model.to(dls.device)
    except Exception as e:  # wrong architecture, not safetensors at all
        raise SkinCancerError(f"{source}: weights do not fit {card.arch} with {len(card.classes)} "
                              f"classes ({type(e).__name__}: {e})") from None
    learn.model.eval()
    return learn


def unpickle_learner(data: bytes, source: Path, cpu: bool = True):
    """fastai's `load_learner` on a .pkl's bytes: runs the pickle's code, so only for trusted files."""
    reuse_freed_memory()
    try:
        learn = torch.load(io.BytesIO(data), map_location="cpu" if cpu else default_device(), weights_only=False)
    except Exception as e:  # a broken pickle can raise nearly anything
        raise SkinCancerError(f"{source}: not a loadable fastai learner ({type(e).__name__}: {e})") from None
    if cpu:  # as load_learner does
        learn.dls.cpu()
        if hasattr(learn, "channels_last"):
            learn = learn.to_contiguous(to_fp32=True)
        elif hasattr(learn, "mixed_precision"):
            learn = learn.to_fp32()
    return learn
