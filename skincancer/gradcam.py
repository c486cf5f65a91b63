"""Grad-CAM: where in the photo the network looked for its answer (Selvaraju et al., 2017)."""

from __future__ import annotations

import math

import numpy as np


def _target_index(classes: list[str], target: str | int | None, probs) -> int:
    if isinstance(target, int):
        return target
    if target is not None:
        return classes.index(target)
    return classes.index("malignant") if "malignant" in classes else int(probs.argmax())


def gradcam(learn, image, target: str | int | None = None, alpha: float = 0.45):
    """Heat map (H, W) in [0, 1] at the image's size and an RGB overlay, for `target` (default: malignant or argmax).

    The map comes from the gradients of the class score with respect to the last convolutional block (the body).
    """
    import torch
    from matplotlib import colormaps
    from PIL import Image

    from .predict import open_image

    img = open_image(image)
    x = learn.dls.test_dl([img], num_workers=0).one_batch()[0]
    model = learn.model.eval()
    body = model[0]
    store: dict = {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["acts"] = output

    handle = body.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)  # gradients flow even through a frozen body
            logits = model(x)
            probs = torch.softmax(logits.float(), dim=1)[0].detach().cpu().numpy()
            idx = _target_index([str(c) for c in learn.dls.vocab], target, probs)
            model.zero_grad()
            logits[0, idx].backward()
    finally:
        handle.remove()
    acts, grads = store["acts"].detach(), store["acts"].grad.detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * acts).sum(dim=1))[0].float().cpu().numpy()
    if cam.max() > 0:
        cam = cam / cam.max()
    # the model saw the photo squished to a square, so stretching the map back to the photo's shape is exact
    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(img.size, Image.BILINEAR),
                      dtype=np.float32) / 255.0
    colour = colormaps["jet"](heat)[..., :3] * 255
    # colour in proportion to the heat: where nothing raised the score the photo shows through unchanged
    a = (alpha * heat)[..., None]
    overlay = Image.fromarray((np.asarray(img.convert("RGB"), dtype=np.float32) * (1 - a) + colour * a)
                              .round().astype(np.uint8))
    return heat, overlay


def plot_gradcam_grid(learn, images, titles=None, cols: int = 4, target: str | int | None = None):
    """A figure of Grad-CAM overlays, one per image."""
    from .plotting import pyplot

    plt = pyplot()
    images = list(images)
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.flat, images)):
        _, overlay = gradcam(learn, image, target=target)
        ax.imshow(overlay)
        ax.set_title(titles[i] if titles else str(i), fontsize=8)
    fig.suptitle("Grad-CAM (red: regions that raised the score)")
    fig.tight_layout()
    return fig
