"""Grad-CAM: where in the photo the network looked for its answer (Selvaraju et al., 2017)."""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import fx

from .errors import SkinCancerError
from .images import open_image
from .labels import is_malignant_class

# Modules that leave every pixel where it is: their output cell i sits where their input cell i sat.
_POINTWISE = ("BatchNorm2d", "GroupNorm", "InstanceNorm2d", "ReLU", "ReLU6", "LeakyReLU", "PReLU", "SiLU", "GELU",
              "Mish", "Sigmoid", "Tanh", "Hardswish", "Hardsigmoid", "Identity", "Dropout", "Dropout2d")
# Tensor operations that do the same (residual sums, gates, channel concatenation, stochastic depth).
_POINTWISE_OPS = {"add", "iadd", "sub", "mul", "imul", "truediv", "relu", "relu_", "sigmoid", "silu", "gelu",
                  "cat", "contiguous", "clone", "stochastic_depth", "dropout", "getattr", "size"}
_GLOBAL = "global"  # a pooled (1x1) tensor, as a squeeze-and-excitation gate makes: it has no position
_grids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

Grid = tuple[tuple[float, float], tuple[float, float]]  # (step, first) in y, then in x


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _through(module, grid: Grid) -> Grid | None:
    """The grid after a convolution or pooling: out cell i looks at in cells [s*i - p, s*i - p + d*(k-1)]."""
    if isinstance(module.padding, str):  # "same"/"valid": no fixed pixel offset to trace
        return None
    k, s = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    p, d = _pair(module.padding), _pair(getattr(module, "dilation", 1))
    y, x = ((a * s_, b + a * ((k_ - 1) / 2 * d_ - p_)) for (a, b), k_, s_, p_, d_ in zip(grid, k, s, p, d))
    return y, x


def feature_grid(body) -> Grid | None:
    """Where the body's output cells sit in its input, ((step_y, first_y), (step_x, first_x)), or None if unknown.

    Cell (i, j) of the feature map is centred on input pixel (first_y + step_y * i, first_x + step_x * j), traced
    through the body's convolutions and pools with torch.fx. For torchvision's ResNets the first cell sits on pixel
    0 (the corner), not half a step in, which is what a plain resize of the map assumes.
    """
    if body not in _grids:
        try:
            _grids[body] = _trace_grid(body)
        except Exception:  # not traceable (data-dependent control flow, say): the caller falls back to a plain resize
            _grids[body] = None
    return _grids[body]


def _trace_grid(body) -> Grid | None:
    gm = fx.symbolic_trace(body)
    modules = dict(gm.named_modules())
    grids: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            grids[node] = ((1.0, 0.0), (1.0, 0.0))
            continue
        if node.op == "output":
            out = grids.get(node.args[0])
            return out if isinstance(out, tuple) else None
        inputs = [grids[n] for n in node.all_input_nodes if n in grids]
        # grids are sums of halves: exact, so a set compares them
        placed: set[Grid] = {g for g in inputs if isinstance(g, tuple)}
        if len(placed) > 1:
            return None  # branches that disagree: no single grid
        if not placed:  # parameters, constants, shapes, or what only pooled tensors feed
            if _GLOBAL in inputs:
                grids[node] = _GLOBAL
            continue
        grid: Grid | str | None
        (grid,) = placed  # the one grid the inputs share
        if node.op == "call_module":
            module = modules[node.target]
            kind = type(module).__name__
            if kind in ("Conv2d", "MaxPool2d", "AvgPool2d"):
                grid = _through(module, grid)
                if grid is None:
                    return None
            elif kind in ("AdaptiveAvgPool2d", "AdaptiveMaxPool2d") and _pair(module.output_size) == (1, 1):
                grid = _GLOBAL
            elif kind not in _POINTWISE:
                return None
        elif getattr(node.target, "__name__", str(node.target)).strip("_") not in _POINTWISE_OPS:
            return None  # a reshape, permute, interpolation or pooling we cannot place: give up rather than guess
        grids[node] = grid
    return None


def upsample_map(cam, grid: Grid | None, input_hw: tuple[int, int], out_hw: tuple[int, int]):
    """Resample a feature-map heat `cam` (h, w) to an image of `out_hw` that was squished to `input_hw` for the model.

    Each output pixel takes the bilinear value at the point of the feature grid it falls on (the cells at the
    image's border extend outwards). Without a known `grid`, cells are assumed evenly spread with half a step
    at each border, as a plain resize assumes.
    """
    cam = torch.as_tensor(cam, dtype=torch.float32)
    n_hw = cam.shape[-2:]
    if grid is not None and any(abs(step * n - size) > step for (step, _), n, size in zip(grid, n_hw, input_hw)):
        grid = None  # the traced grid does not span the input: it was not this map's
    if grid is None:
        grid = ((input_hw[0] / n_hw[0], (input_hw[0] / n_hw[0] - 1) / 2),
                (input_hw[1] / n_hw[1], (input_hw[1] / n_hw[1] - 1) / 2))
    axes = []
    for (step, first), size, n, out in zip(grid, input_hw, n_hw, out_hw):
        pixel = (torch.arange(out, dtype=torch.float64) + 0.5) * size / out - 0.5  # in the model's input
        cell = (pixel - first) / step
        axes.append((2 * cell / (n - 1) - 1) if n > 1 else torch.zeros_like(cell))
    gy, gx = torch.meshgrid(*axes, indexing="ij")
    where = torch.stack([gx, gy], dim=-1).float()[None]
    return F.grid_sample(cam[None, None], where, mode="bilinear", padding_mode="border", align_corners=True)[0, 0]


def _target_indices(classes: list[str], target: str | int | None, probs) -> list[int]:
    if isinstance(target, int):
        return [target]
    malignant = np.flatnonzero(is_malignant_class(classes))
    if target in (None, "malignant") and len(malignant):
        return [int(i) for i in malignant]
    if target is None:
        return [int(probs.argmax())]
    if target not in classes:
        raise SkinCancerError(f"target: {target!r} is not one of the model's classes ({', '.join(classes)})")
    return [classes.index(target)]


def class_activation(model, x, classes: list[str], target: str | int | None = None):
    """(Grad-CAM map at the body's feature size, scaled to [0, 1]; class probabilities) of a one-image batch `x`.

    `model` is a (body, head) network as fastai's vision_learner builds it. The map needs the score's gradient at the
    body's output only, which the head alone decides: the body runs without a graph and only the head is
    differentiated (a backward pass through the whole network, the textbook way, would also differentiate every
    weight, for the same map at more cost).
    """
    if not isinstance(model, torch.nn.Sequential) or len(model) < 2:
        raise SkinCancerError(f"Grad-CAM needs a (body, head) network as fastai's vision_learner builds, "
                              f"not a {type(model).__name__}")
    body, head = model[0], model[1:]
    with torch.no_grad():
        acts = body(x)
    acts = acts.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = head(acts)
        probs = torch.softmax(logits.float(), dim=1)[0].detach().cpu().numpy()
        idx = _target_indices(classes, target, probs)
        # one class: its logit; a group (a dx model's mel, bcc, akiec): the log-sum-exp of theirs, the score
        # whose softmax share is the group's probability, so the map is of the probability of malignancy
        (grads,) = torch.autograd.grad(torch.logsumexp(logits[0, idx].float(), dim=0), acts)
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts.detach()).sum(dim=1))[0].float().cpu().numpy()
    return (cam / cam.max() if cam.max() > 0 else cam), probs


def heat_overlay(img, cam, body, input_hw: tuple[int, int], alpha: float = 0.45):
    """(heat map at the photo's size in [0, 1], RGB overlay) of a feature-size `cam` of `img` seen at `input_hw`."""
    # the model saw the photo squished to a square, so stretching the map back to the photo's shape is exact
    heat = upsample_map(cam, feature_grid(body), input_hw, (img.height, img.width)).numpy()
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps["jet"](heat)[..., :3] * 255
    # colour in proportion to the heat: where nothing raised the score the photo shows through unchanged
    a = (alpha * heat)[..., None]
    overlay = Image.fromarray((np.asarray(img.convert("RGB"), dtype=np.float32) * (1 - a) + colour * a)
                              .round().astype(np.uint8))
    return heat, overlay


def gradcam(learn, image, target: str | int | None = None, alpha: float = 0.45, model=None):
    """Heat map (H, W) in [0, 1] at the image's size and an RGB overlay, for `target` (default: malignant).

    The map comes from the gradients of the class score with respect to the last convolutional block (the body),
    and is laid on the image where the body's cells sit (`feature_grid`). `target` is a class name or index;
    'malignant' (the default) is a 7-diagnosis model's mel, bcc and akiec together; a model with no malignant
    class gets its most likely class. `model` runs in place of the learner's network (`Classifier.model`, say).
    """
    img = open_image(image)
    x = learn.dls.test_dl([img], num_workers=0).one_batch()[0]
    model = (learn.model if model is None else model).eval()
    cam, _ = class_activation(model, x, [str(c) for c in learn.dls.vocab], target)
    return heat_overlay(img, cam, model[0], tuple(x.shape[-2:]), alpha)
