"""Safe to load, hard to crash: crafted pickles, the safetensors path, hostile images, diverging training."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import wait_for_checkpoint
from skincancer import SkinCancerError
from skincancer.predict import load, open_image


class _Payload:
    """Unpickling this creates a file: the stand-in for arbitrary code in a hostile .pkl."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_pickle(path, marker):
    path.write_bytes(pickle.dumps(_Payload(marker)))


@pytest.fixture
def export_copy(trained, tmp_path):
    """A copy of the trained export (pkl, safetensors, card, split) that a test may tamper with."""
    for suffix in (".pkl", ".safetensors", ".json", ".split.csv"):
        shutil.copy(trained.with_suffix(suffix), tmp_path / f"model{suffix}")
    return tmp_path / "model.pkl"


def test_a_crafted_pickle_alone_is_refused_and_never_run(tmp_path):
    model, marker = tmp_path / "evil.pkl", tmp_path / "pwned"
    _crafted_pickle(model, marker)
    with pytest.raises(SkinCancerError, match="refusing to unpickle"):
        load(model)
    assert not marker.exists()
    with pytest.raises(SkinCancerError):
        load(model, trusted=True)  # the caller vouched for it: it is unpickled, and the payload runs
    assert marker.exists()  # which proves the payload was real


def test_a_crafted_pickle_beside_real_weights_is_ignored(export_copy, tmp_path, original_images):
    marker = tmp_path / "pwned"
    _crafted_pickle(export_copy, marker)
    clf = load(export_copy)  # the default path reads the safetensors weights, never the pickle
    assert not marker.exists()
    assert 0 <= clf.predict(original_images[0])["malignant_probability"] <= 1


def test_a_crafted_pickle_whose_hash_does_not_match_the_card_is_refused(export_copy, tmp_path):
    marker = tmp_path / "pwned"
    _crafted_pickle(export_copy, marker)
    export_copy.with_suffix(".safetensors").unlink()
    with pytest.raises(SkinCancerError, match="sha256 does not match"):
        load(export_copy)
    assert not marker.exists()


def test_the_genuine_pickle_loads_when_its_hash_matches_the_card(export_copy, original_images):
    export_copy.with_suffix(".safetensors").unlink()
    assert load(export_copy).predict(original_images[0])["label"] in ("benign", "malignant")


def test_tampered_weights_are_refused(export_copy):
    weights = export_copy.with_suffix(".safetensors")
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(SkinCancerError, match="sha256 does not match the model card"):
        load(export_copy)


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
    import fastai.vision.learner
    import torch

    real = fastai.vision.learner.vision_learner

    def with_init_buffer(*args, **kwargs):
        learn = real(*args, **kwargs)
        learn.model.register_buffer("made_at_init", torch.ones(3), persistent=False)
        return learn

    monkeypatch.setattr(fastai.vision.learner, "vision_learner", with_init_buffer)
    clf = load(export_copy)  # a path not loaded before, so not from load's cache
    assert not clf.learn.model.made_at_init.is_meta and clf.learn.model.made_at_init.sum() == 3
    probs = [list(r["probabilities"].values()) for r in clf.predict_batch(original_images[:3])]
    expected = [list(r["probabilities"].values()) for r in load(trained).predict_batch(original_images[:3])]
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_safe_weights_predict_what_the_pickle_predicts(trained, original_images):
    safe, pickled = load(trained), load(trained, trusted=True)
    assert safe is not pickled
    a = np.array([list(r["probabilities"].values()) for r in safe.predict_batch(original_images)])
    b = np.array([list(r["probabilities"].values()) for r in pickled.predict_batch(original_images)])
    np.testing.assert_allclose(a, b, atol=1e-5)


# --- images ------------------------------------------------------------------------------------

def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_sixteen_bit_images_are_scaled_not_clipped(original_images):
    grey = np.asarray(Image.open(original_images[0]).convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray((grey * 257).astype("<u2"))
    assert sixteen.mode.startswith("I;16")
    out = np.asarray(open_image(_png(sixteen)))
    assert out.shape == (450, 600, 3)
    np.testing.assert_allclose(out[..., 0].astype(float), grey, atol=1)  # 255 would mean clipped to white


def test_palette_png_with_transparency_becomes_rgb(original_images):
    img = Image.open(original_images[0]).convert("P", palette=Image.Palette.ADAPTIVE)
    img.info["transparency"] = 0
    assert open_image(_png(img)).mode == "RGB"


@pytest.mark.parametrize("size", [(9000, 9000), (100000, 100000)])
def test_pixel_bombs_are_refused_from_the_header(size):
    with pytest.raises(SkinCancerError, match=r"over the limit|not a readable image"):
        open_image(_png_header_only(*size))


def test_empty_and_non_image_inputs(tmp_path):
    with pytest.raises(SkinCancerError, match="empty"):
        open_image(b"")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(SkinCancerError, match="zero.jpg: not a readable image"):
        open_image(tmp_path / "zero.jpg")
    with pytest.raises(SkinCancerError, match="expected a file path, bytes or a PIL image"):
        open_image(12345)


_SEEDS = {}


def _seeds(original_images):
    if not _SEEDS:
        small = Image.open(original_images[0]).resize((60, 45))
        jpeg = io.BytesIO()
        small.save(jpeg, format="JPEG")
        _SEEDS["jpeg"], _SEEDS["png"] = jpeg.getvalue(), _png(small)
    return _SEEDS


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_decode_or_raise_a_clear_error(data, original_images):
    seeds = _seeds(original_images)
    kind = data.draw(st.sampled_from(["random", "jpeg", "png"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2048))
    else:
        blob = bytearray(seeds[kind])
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] = data.draw(st.integers(0, 255))
        blob = bytes(blob[: data.draw(st.integers(1, len(blob)))])
    try:
        img = open_image(blob)
    except SkinCancerError as e:
        assert "not a readable image" in str(e) or "empty" in str(e) or "over the limit" in str(e)
    else:
        assert img.mode == "RGB" and img.size[0] > 0


def test_a_batch_of_hostile_inputs_still_predicts_the_good_images(trained, original_images):
    seeds = _seeds(original_images)
    hostile = [b"", b"\x00" * 100, seeds["jpeg"][:200], _png_header_only(100000, 100000), b"GIF89a" + b"\xff" * 50]
    inputs = [original_images[0], *hostile, original_images[1]]
    results = load(trained).predict_batch(inputs)
    assert ["error" in r for r in results] == [False, True, True, True, True, True, False]


# --- training ----------------------------------------------------------------------------------

def test_a_diverging_loss_stops_training_with_a_clear_error(ham_dir, tmp_path):
    from skincancer.train import TrainConfig, fit, monitor_for, setup

    config, df, learn = setup(TrainConfig(data=str(ham_dir), pretrained=False, epochs=1, size=32, bs=16, limit=80,
                                          num_workers=0, out=str(tmp_path / "m.pkl")))
    base = learn.loss_func
    learn.loss_func = lambda pred, *y: base(pred, *y) * float("nan")
    with pytest.raises(SkinCancerError, match=r"training diverged: the loss became nan at epoch 1, iteration 1"):
        fit(learn, config, monitor_for("binary"))
    assert not (tmp_path / "m.pkl").exists()


def test_resume_continues_a_killed_run_from_its_last_epoch(ham_dir, tmp_path, capsys, monkeypatch):
    import json
    import subprocess
    import sys

    import torch

    from skincancer import cli
    from skincancer import train as T
    from skincancer.train import checkpoint_dir

    out = tmp_path / "r.pkl"
    args = ["train", "--data", str(ham_dir), "--limit", "200", "--size", "32", "--bs", "32", "--epochs", "4",
            "--no-pretrained", "--workers", "0", "--out", str(out), "--checkpoint-every", "0", "--ema", "0.9"]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "skincancer", *args], stdout=log, stderr=log)
        try:
            wait_for_checkpoint(checkpoint_dir(out) / "state.json", 1, proc)
        finally:
            proc.kill()  # as a crash or a lost machine would
            proc.wait()
    state = json.loads((checkpoint_dir(out) / "state.json").read_text())
    done = state["epoch"]
    assert not out.exists() and done < 3
    steps = torch.load(checkpoint_dir(out) / state["files"]["average"], weights_only=True)["steps"]
    assert steps > 0

    assert cli.main([*args[:10], "5", *args[11:], "--resume"]) == 2  # other settings: refused, checkpoint kept
    assert "the interrupted run used other settings (epochs: 4 then, 5 now)" in capsys.readouterr().err

    continued, real_average = [], T.weight_average
    monkeypatch.setattr(T, "weight_average",
                        lambda decay, state=None: continued.append(state) or real_average(decay, state))
    assert cli.main([*args, "--resume"]) == 0
    assert [c["steps"] for c in continued] == [steps]  # the interrupted run's average goes on
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoint_dir(out)}: phase 1, epoch {done + 2} of 4" in printed
    assert out.exists() and not checkpoint_dir(out).exists()
    assert json.loads(out.with_suffix(".json").read_text())["config"]["epochs"] == 4


def test_a_crash_while_checkpointing_leaves_the_previous_checkpoint_whole(ham_dir, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    from skincancer import train as T

    config = T.TrainConfig(data=str(ham_dir), pretrained=False, epochs=3, size=32, bs=32, limit=120, num_workers=0,
                           ema=0.9, out=str(tmp_path / "c.pkl"), checkpoint_every=0)
    real_write, writes = T.write_json_atomic, []

    def crash_on_the_second_state(path, data):
        writes.append(path)
        if len(writes) == 2:  # epoch 2's weights are written, its state.json is not: the process dies here
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(T, "write_json_atomic", crash_on_the_second_state)
    config, df, learn = T.setup(config)
    with pytest.raises(KeyboardInterrupt):
        T.fit(learn, config, T.monitor_for("binary"))
    folder = T.checkpoint_dir(config.out)
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 0 and state["files"]["last"] == "last-0-0.pth"
    assert (folder / "last-0-1.pth").exists()  # the torn save's weights: named by no state, never read

    monkeypatch.setattr(T, "write_json_atomic", real_write)
    config, df, learn = T.setup(config)
    loaded, real_load = [], learn.load
    learn.load = lambda name, **kwargs: loaded.append(Path(name).name) or real_load(name, **kwargs)
    T.fit(learn, config, T.monitor_for("binary"), resume=True)
    assert loaded[0] == "last-0-0" and "phase 1, epoch 2 of 3" in capsys.readouterr().out
    state = json.loads((folder / "state.json").read_text())
    assert state["epoch"] == 2 and sorted(p.name for p in folder.glob("*.pth")) == sorted(state["files"].values())


def test_resume_refuses_a_state_whose_files_are_gone_or_unnamed(tmp_path):
    import json

    from skincancer.train import TrainConfig, read_resume_state

    config = TrainConfig(data=".", out=str(tmp_path / "m.pkl")).resolved()
    folder = tmp_path / "m.checkpoints"
    folder.mkdir()
    (folder / "last-0-3.pth").write_bytes(b"weights")
    state = {"phase": 0, "epoch": 3, "best": 0.8, "best_epoch": 2, "config": {}}
    (folder / "state.json").write_text(json.dumps(state))
    with pytest.raises(SkinCancerError, match="written by an older skincancer, which named no checkpoint files"):
        read_resume_state(folder, config)
    (folder / "state.json").write_text(json.dumps({**state, "files": {"last": "last-0-3.pth", "best": "best-0-2.pth"}}))
    with pytest.raises(SkinCancerError, match=r"the checkpoint files it names are missing \(best-0-2.pth\)"):
        read_resume_state(folder, config)


def test_resume_inside_the_unfrozen_phase_of_fine_tuning(ham_dir, tmp_path, monkeypatch, capsys):
    import torch
    import torchvision
    from fastai.callback.core import Callback

    from skincancer import train as T

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ckpt = T.pretrained_weights_file("resnet50")
    ckpt.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)
    config = T.TrainConfig(data=str(ham_dir), pretrained=True, freeze_epochs=1, epochs=2, size=32, bs=32, limit=120,
                           num_workers=0, out=str(tmp_path / "ft.pkl"), checkpoint_every=0)
    real_stop = T.stop_on_nan
    seen = []

    class Interrupt(Callback):
        order = 100  # after the epoch's checkpoint is written, as a crash between epochs would be

        def after_epoch(self):
            seen.append((self.learn.model[0][0].weight.requires_grad, self.epoch))
            if len(seen) == 2:  # the first epoch of the unfrozen phase
                raise KeyboardInterrupt

    monkeypatch.setattr(T, "stop_on_nan", Interrupt)
    config, df, learn = T.setup(config)
    with pytest.raises(KeyboardInterrupt):
        T.fit(learn, config, T.monitor_for("binary"))
    assert seen == [(False, 0), (True, 0)]  # frozen body first, then unfrozen

    monkeypatch.setattr(T, "stop_on_nan", real_stop)
    config, df, learn = T.setup(config)
    T.fit(learn, config, T.monitor_for("binary"), resume=True)
    assert "phase 2, epoch 2 of 2" in capsys.readouterr().out
    assert learn.model[0][0].weight.requires_grad  # resumed unfrozen
