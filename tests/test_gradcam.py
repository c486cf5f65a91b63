"""Grad-CAM: the heat where the evidence is, cells placed where the body looked, and the textbook map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from skincancer import SkinCancerError
from skincancer.gradcam import feature_grid, gradcam, upsample_map
from skincancer.labels import DX_CLASSES
from skincancer.predict import load
from skincancer.gradcam import class_activation
from skincancer.images import open_image
from skincancer.files import sha256_file


def _red_means_malignant(body):
    """A model whose malignant score is the mean of the body's first channel: red makes it malignant."""
    import torch
    from torch import nn

    class Score(nn.Module):
        def forward(self, acts):
            s = acts[:, 0].mean(dim=(1, 2))
            return torch.stack([-s, s], dim=1)

    return nn.Sequential(body, Score())


def _gradcam_with(learn, model, photo):
    kept, learn.model = learn.model, model
    try:
        heat, _ = gradcam(learn, Image.fromarray(photo), target="malignant")
    finally:
        learn.model = kept
    return heat


def test_gradcam_puts_the_heat_where_the_evidence_is(trained):
    from torch import nn

    photo = np.zeros((150, 200, 3), np.uint8)
    photo[:75, 100:, 0] = 255  # red in the top-right quarter only: a flip or a transpose moves it
    heat = _gradcam_with(load(trained).learn, _red_means_malignant(nn.AvgPool2d(8)), photo)  # the image, 8x coarser
    assert heat.shape == (150, 200)
    quarters = {(r, c): float(heat[r * 75:(r + 1) * 75, c * 100:(c + 1) * 100].mean()) for r in (0, 1) for c in (0, 1)}
    # hot where the red is; the rest cools (a blurred edge, as upsampling a coarse map gives), never flipped
    assert quarters[0, 1] > 0.8 and max(quarters[0, 0], quarters[1, 1]) < 0.3 and quarters[1, 0] < 0.1, quarters


def test_a_seven_class_gradcam_maps_malignancy_by_default_and_any_class_on_request(trained):
    """mel's logit follows red, nv's green; nv wins the argmax, yet the default map is of malignancy (mel's red)."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    class Score(nn.Module):
        def forward(self, acts):
            red, green = acts[:, 0].mean(dim=(1, 2)), acts[:, 1].mean(dim=(1, 2))
            zero = torch.zeros_like(red)
            by_class = {"mel": red, "nv": green + 10.0}
            return torch.stack([by_class.get(c, zero) for c in DX_CLASSES], dim=1)

    dls = load(trained).learn.dls
    learn = SimpleNamespace(dls=SimpleNamespace(test_dl=dls.test_dl, vocab=list(DX_CLASSES)),
                            model=nn.Sequential(nn.AvgPool2d(8), Score()))
    photo = np.zeros((150, 200, 3), np.uint8)
    photo[:75, 100:, 0] = 255  # red: top right
    photo[75:, :100, 1] = 255  # green: bottom left
    top_right, bottom_left = (slice(0, 75), slice(100, 200)), (slice(75, 150), slice(0, 100))
    for target, hot, cold in [(None, top_right, bottom_left), ("malignant", top_right, bottom_left),
                              ("nv", bottom_left, top_right)]:
        heat, _ = gradcam(learn, Image.fromarray(photo), target=target)
        assert heat[hot].mean() > 0.8 and heat[cold].mean() < 0.1, (target, heat[hot].mean(), heat[cold].mean())
    with pytest.raises(SkinCancerError, match="'melanoma' is not one of the model's classes"):
        gradcam(learn, Image.fromarray(photo), target="melanoma")


def test_gradcam_cells_land_where_the_body_looked(trained):
    """A ResNet-like body (3x3 convolutions of stride 2, padding 1) centres cell i on pixel 8i, not 8i + 3.5."""
    import torch
    from torch import nn

    convs = [nn.Conv2d(3 if i == 0 else 1, 1, 3, stride=2, padding=1, bias=False) for i in range(3)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.weight[0, 0] = 1 / 9  # an average of the red channel, then of that
    learn = load(trained).learn
    model = _red_means_malignant(nn.Sequential(*convs))
    photo = np.zeros((150, 200, 3), np.uint8)
    photo[..., 0] = 124  # the red that ImageNet normalisation turns into 0: only the spot raises the score
    size = learn.dls.test_dl([Image.fromarray(photo)], num_workers=0).one_batch()[0].shape[-1]  # the model's input
    # a red spot on the input pixel that cell (3, 5) of the map is centred on, (24, 40), drawn in the 200x150 photo
    cy, cx = (24 + 0.5) * 150 / size - 0.5, (40 + 0.5) * 200 / size - 0.5
    photo[round(cy) - 4:round(cy) + 5, round(cx) - 5:round(cx) + 6, 0] = 255
    heat = _gradcam_with(learn, model, photo)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    # a plain resize of the map would put the hot cell 3.5 input pixels down and right: 8 and 11 photo pixels
    assert abs(y - cy) <= 2 and abs(x - cx) <= 2, ((y, x), (cy, cx))


def _receptive_field_centre(body, size: int, cell: int) -> float:
    """The middle of the input pixels that feature cell (cell, cell) depends on, measured with gradients."""
    import torch

    # a max pool passes gradient to one pixel of its window, and a ReLU to the active ones: a single input can miss
    # pixels at the edge of the field, so take the pixels any of several inputs depends on
    x = torch.rand(16, 3, size, size, requires_grad=True)
    grad = torch.autograd.grad(body(x)[:, :, cell, cell].sum(), x)[0].abs().sum(dim=(0, 1))
    cols = (grad.sum(0) > 0).nonzero().flatten()
    return (int(cols.min()) + int(cols.max())) / 2


def test_feature_grid_matches_the_receptive_fields():
    import torchvision
    from fastai.vision.all import create_body
    from torch import nn

    resnet = create_body(torchvision.models.resnet18(weights=None)).eval()  # residual branches, a max pool
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                             nn.BatchNorm2d(4), nn.MaxPool2d(2)).eval()  # pools of 2 put cells between pixels
    for body, size, cell in [(resnet, 512, 8), (vgg_like, 64, 8)]:  # cells whose field is inside the image
        (step_y, first_y), (step_x, first_x) = feature_grid(body)
        assert (step_y, first_y) == (step_x, first_x)
        assert first_x + step_x * cell == _receptive_field_centre(body, size, cell)
    assert feature_grid(resnet) == ((32, 0), (32, 0)) and feature_grid(vgg_like) == ((4, 1.5), (4, 1.5))
    assert feature_grid(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) is None  # nowhere to place: plain resize


def test_gradcam_map_and_overlay_on_a_real_lesion(trained, original_images):
    clf = load(trained)
    pred = clf.predict(original_images[0])["label"]
    heat, overlay = gradcam(clf.learn, original_images[0], target=pred)
    assert heat.shape == (450, 600) and overlay.size == (600, 450)
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-2) and heat.std() > 0.01
    photo = np.asarray(Image.open(original_images[0]).convert("RGB"), dtype=float)
    change = np.abs(np.asarray(overlay, dtype=float) - photo).sum(-1)
    hot, cold = heat >= np.quantile(heat, 0.8), heat <= np.quantile(heat, 0.2)
    assert change[hot].mean() > change[cold].mean()  # colour goes where the heat is


def full_backward_gradcam(learn, image, target: int):
    """The textbook Grad-CAM heat map (the body's output hooked, the whole network differentiated): the oracle."""
    x = learn.dls.test_dl([image], num_workers=0).one_batch()[0].requires_grad_(True)
    model, store = learn.model.eval(), {}

    def keep(module, inputs, output):
        output.retain_grad()
        store["acts"] = output

    handle = model[0].register_forward_hook(keep)
    try:
        with torch.enable_grad():
            model.zero_grad()
            model(x)[0, target].backward()
    finally:
        handle.remove()
    acts, grads = store["acts"].detach(), store["acts"].grad
    cam = torch.relu((grads.mean(dim=(2, 3), keepdim=True) * acts).sum(dim=1))[0]
    cam = cam / cam.max() if cam.max() > 0 else cam
    return upsample_map(cam, feature_grid(model[0]), tuple(x.shape[-2:]), (image.height, image.width)).clamp(0, 1)


def test_gradcam_is_the_textbook_map_without_the_full_backward_pass(trained, original_images):
    """Differentiating the head alone gives the map that hooking the body and differentiating everything gives."""
    from torch import nn

    learn = load(trained).learn
    learn.model.zero_grad(set_to_none=True)
    cases = [(Image.open(path), target) for path in original_images[:3] for target in (0, 1)]
    heats = [gradcam(learn, image, target=target)[0] for image, target in cases]
    assert all(p.grad is None for p in learn.model.parameters())  # no weight was differentiated
    textbooks = [full_backward_gradcam(learn, image, target).numpy() for image, target in cases]
    assert sum(t.std() > 0.01 for t in textbooks) >= len(cases) / 2  # 2x2 maps with a shape to get wrong
    for heat, textbook in zip(heats, textbooks):
        np.testing.assert_allclose(heat, textbook, atol=1e-5)
    with pytest.raises(SkinCancerError, match=r"Grad-CAM needs a \(body, head\) network .* not a Conv2d"):
        _gradcam_with(learn, nn.Conv2d(3, 2, 1), np.zeros((150, 200, 3), np.uint8))


def test_gradcam_and_the_inference_copy_work_on_efficientnet_lite0(trained_lite0, lite0_weights, original_images):
    clf = load(trained_lite0)
    photo = original_images[0]
    result, heat, overlay = clf.explain(photo)
    assert heat.shape == (450, 600) and overlay.size == (600, 450) and 0 <= heat.min() <= heat.max() <= 1
    assert result["malignant_probability"] == pytest.approx(clf.predict(photo)["malignant_probability"], abs=1e-5)
    assert clf.card.normalize == {"mean": [0.5] * 3, "std": [0.5] * 3}  # the weights' own, not ImageNet's
    assert clf.card.pretrained_weights == {"file": "efficientnet-lite0-57934424.pth",
                                           "sha256": sha256_file(lite0_weights)}
    x = clf.learn.dls.test_dl([open_image(photo)], bs=1, num_workers=0).one_batch()[0]
    cam, _ = class_activation(clf.model, x, clf.classes)
    assert cam.shape == (2, 2)  # the body's last feature map: 64 px over 32
    pickled = load(trained_lite0, trusted=True)  # fastai's own network, unfolded
    a = [r["malignant_probability"] for r in clf.predict_batch(original_images[:4])]
    b = [r["malignant_probability"] for r in pickled.predict_batch(original_images[:4])]
    np.testing.assert_allclose(a, b, atol=1e-5)
