"""The loss: a binary model decodes to its call at the operating threshold, as fastai's learn.predict shows."""

from __future__ import annotations


def test_the_loss_decodes_a_binary_model_at_its_operating_threshold():
    import torch

    from skincancer.calibration import calibrate
    from skincancer.losses import OperatingPointLoss

    scores = torch.linspace(0.01, 0.99, 99)
    probs = torch.stack([1 - scores, scores], dim=1)
    loss = OperatingPointLoss()
    assert loss.decodes(probs).tolist() == probs.argmax(dim=1).tolist()  # no operating point yet: fastai's argmax
    calibration = {"method": "platt", "slope": 1.2, "intercept": -1.5}
    loss.set_operating_point(["benign", "malignant"], 0.2, calibration)
    expected = (calibrate(scores.numpy(), calibration) >= 0.2).astype(int)
    assert loss.decodes(probs).tolist() == expected.tolist()
    assert 0 < expected.mean() and (expected != probs.argmax(dim=1).numpy()).any()  # a threshold that is not 0.5
    dx = torch.softmax(torch.randn(20, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    loss.set_operating_point(["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"], 0.2, calibration)
    assert loss.decodes(dx).tolist() == dx.argmax(dim=1).tolist()  # a diagnosis model's label: its likeliest class
