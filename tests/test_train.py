"""Training through the CLI, the exported files, pretrained weights and the offline error."""

from __future__ import annotations

import dataclasses
import json
import pickle
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch

from skincancer import SkinCancerError, cli
from skincancer.calibration import calibrate
from skincancer.data import prepare
from skincancer.files import sha256_file
from skincancer.predict import load
from conftest import SMALL
from skincancer.train import TrainConfig, export, make_dataloaders, make_learner, pretrained_weights_file

def test_train_exports_the_learner_its_card_and_its_split(trained):
    card = json.loads(trained.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(trained)
    assert card["task"] == "binary" and card["classes"] == ["benign", "malignant"]
    assert card["arch"] == "resnet50" and card["pretrained"] is False and card["size"] == 64 and card["seed"] == 42
    assert {"fastai", "torch", "torchvision", "skincancer", "python"} <= set(card["versions"])
    for split in ("valid", "test"):
        m = card["metrics"][split]
        for key in ("accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity"):
            assert 0.0 <= m[key] <= 1.0, (split, key)
        assert m["n"] == card["split_images"][split]
    split = pd.read_csv(trained.with_suffix(".split.csv"))
    assert list(split.columns) == ["image_id", "lesion_id", "split"]
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all()
    assert split["split"].value_counts().to_dict() == {k: v for k, v in card["split_images"].items() if v}
    assert sum(sum(c.values()) for c in card["split_counts"].values()) == len(split)


def test_the_split_is_reproducible_from_the_card(trained, ham_dir):
    card = json.loads(trained.with_suffix(".json").read_text())
    cfg = card["config"]
    again = prepare(ham_dir, cfg["task"], cfg["valid_pct"], cfg["test_pct"], cfg["seed"], cfg["limit"])
    saved = pd.read_csv(trained.with_suffix(".split.csv"))
    assert again[["image_id", "split"]].reset_index(drop=True).equals(saved[["image_id", "split"]])


def test_a_failed_export_leaves_the_previous_model_intact(trained, tmp_path, monkeypatch):
    from skincancer.predict import load

    learn = load(trained).learn
    target = tmp_path / "model.pkl"
    target.write_bytes(b"the previous good model")

    def boom(self, fname, **kwargs):
        fname.write_bytes(b"half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(type(learn), "export", boom)
    with pytest.raises(OSError, match="disk full"):
        export(learn, target, {}, pd.DataFrame(columns=["image_id", "lesion_id", "split"]))
    assert target.read_bytes() == b"the previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pkl"]  # no temporary files left behind


def test_dx_task_trains_with_seven_classes(tmp_path, ham_dir, original_images):
    out = tmp_path / "dx.pkl"
    assert cli.main(["train", "--data", str(ham_dir), "--task", "dx", *SMALL, "--size", "32",
                     "--out", str(out)]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert len(card["classes"]) == 7 and card["monitor"] == "balanced_accuracy"
    assert 0.0 <= card["metrics"]["test"]["macro_auroc"] <= 1.0
    # predict: the label is the most likely diagnosis, the call the benign/malignant decision at the threshold
    clf = load(out)
    res = clf.predict(original_images[0])
    assert res["label"] == max(res["probabilities"], key=res["probabilities"].get)
    p = res["malignant_probability"]
    # the diagnoses keep the network's scores; the probability of malignancy is their malignant sum, calibrated
    summed = sum(res["probabilities"][d] for d in ("mel", "bcc", "akiec"))
    assert p == pytest.approx(float(calibrate(summed, card["calibration"])), abs=1e-6)
    cal = {"method": "platt", "slope": 0.7, "intercept": -0.5}  # as training fits one where valid ranks rightly
    recalibrated = dataclasses.replace(clf, card={**clf.card, "calibration": cal}).predict(original_images[0])
    assert recalibrated["probabilities"] == res["probabilities"] and recalibrated["label"] == res["label"]
    assert recalibrated["malignant_probability"] == pytest.approx(float(calibrate(summed, cal)), abs=1e-6)
    for threshold, call in ((p - 1e-6, "malignant"), (p + 1e-6, "benign")):
        moved = dataclasses.replace(clf, card={**clf.card, "threshold": threshold}).predict(original_images[0])
        assert moved["call"] == call and moved["label"] == res["label"]
    # several photos of one lesion: the mean of each diagnosis's score names the label, the mean probability calls
    lesion = clf.predict_lesion(original_images[:3])
    photos = [clf.predict(path) for path in original_images[:3]]
    mean = {d: np.mean([r["probabilities"][d] for r in photos]) for d in card["classes"]}
    assert lesion["probabilities"] == pytest.approx(mean, abs=1e-5) and lesion["label"] == max(mean, key=mean.get)
    assert lesion["malignant_probability"] == pytest.approx(np.mean([r["malignant_probability"] for r in photos]),
                                                            abs=1e-5)


def test_weight_decay_one_pass_augmentation_the_loss_on_device_and_the_average_reach_the_run(tmp_path, ham_dir,
                                                                                             monkeypatch):
    from fastai.vision.all import RandomResizedCropGPU

    from skincancer import train as T

    guards, real = [], T.loss_on_device
    averages, real_average = [], T.weight_average

    def spy():
        guards.append(real())
        return guards[-1]

    def spy_average(*args):
        averages.append(real_average(*args))
        return averages[-1]

    monkeypatch.setattr(T, "loss_on_device", spy)
    monkeypatch.setattr(T, "weight_average", spy_average)
    result = T.train(T.TrainConfig(data=str(ham_dir), pretrained=False, limit=60, size=32, bs=8, epochs=1, wd=0.05,
                                   augment="one-pass", loss_on_device=True, ema=0.9, num_workers=0,
                                   out=str(tmp_path / "m.pkl")))
    assert len(averages) == 1 and averages[0].steps == len(result.learn.dls.train)
    assert result.card["config"]["ema"] == 0.9
    exported = load(tmp_path / "m.pkl").learn.model.state_dict()  # the one epoch's average, not the last weights
    assert all(torch.equal(exported[k].float(), v.float()) for k, v in averages[0].averaged_state().items())
    assert {g["wd"] for g in result.learn.opt.hypers} == {0.05}
    assert not any(isinstance(t, RandomResizedCropGPU) for t in result.learn.dls.train.after_batch.fs)
    assert result.card["config"]["wd"] == 0.05 and result.card["config"]["augment"] == "one-pass"
    assert len(guards) == 1 and guards[0].fitted is result.learn  # it guarded the fit in place of stop_on_nan
    assert type(result.learn.recorder.smooth_loss).__name__ == "AvgSmoothLoss"  # fastai's again: it was exported


@pytest.mark.parametrize("reproducible", [True, False])
def test_reproducible_sets_cudnn_either_way_and_reaches_the_run_from_the_cli(reproducible, monkeypatch):
    from skincancer import train as T

    cudnn = torch.backends.cudnn
    # the other choice left behind by an earlier run in this process (monkeypatch restores the flags after)
    monkeypatch.setattr(cudnn, "deterministic", not reproducible)
    monkeypatch.setattr(cudnn, "benchmark", reproducible)
    T.seed_everything(3, reproducible)
    assert (cudnn.deterministic, cudnn.benchmark) == (reproducible, not reproducible)
    first = torch.rand(4)
    T.seed_everything(3, reproducible)
    assert torch.equal(torch.rand(4), first)  # seeded either way

    configs = []
    monkeypatch.setattr(T, "train", lambda config, resume=False: configs.append(config))
    flags = [] if reproducible else ["--no-reproducible"]
    assert cli.main(["train", "--data", "somewhere", "--no-pretrained", *flags]) == 0
    assert configs[0].reproducible is reproducible


def test_bad_training_input_is_an_error_line_not_a_traceback(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--no-pretrained"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


# --- pretrained weights --------------------------------------------------------------------------

@pytest.fixture
def small_dls(ham_dir):
    df = prepare(ham_dir, limit=60, seed=0)
    return make_dataloaders(df, "binary", size=32, bs=8, num_workers=0)


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


def test_cli_train_offline_is_one_clear_error(tmp_path, monkeypatch, ham_dir, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("SKINCANCER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    code = cli.main(["train", "--data", str(ham_dir), "--limit", "60", "--size", "32", "--epochs", "1", "--bs", "16",
                     "--out", str(tmp_path / "m.pkl")])
    err = capsys.readouterr().err
    assert code == 2 and "resnet50-11ad3fa6.pth" in err and "Traceback" not in err
    assert not (tmp_path / "m.pkl").exists()
    assert not (tmp_path / "cache").exists()  # it failed before presizing a single image


def test_a_corrupt_cached_checkpoint_says_to_delete_it(tmp_path, monkeypatch, small_dls):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = pretrained_weights_file("resnet50")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SkinCancerError, match=r"could not be read.*delete the file"):
        make_learner(small_dls, "binary", "resnet50", pretrained=True)


def test_config_rejects_nonsense():
    with pytest.raises(SkinCancerError, match="imbalance"):
        TrainConfig(data=".", imbalance="oversample").resolved()
    with pytest.raises(SkinCancerError, match=r"out: .* must end in \.pkl"):
        TrainConfig(data=".", out="models/model.pt").resolved()
    with pytest.raises(SkinCancerError, match="label_smoothing"):
        TrainConfig(data=".", label_smoothing=1.5).resolved()
    with pytest.raises(SkinCancerError, match="wd: -0.1 must be 0 or more"):
        TrainConfig(data=".", wd=-0.1).resolved()
    with pytest.raises(SkinCancerError, match="augment: 'random' is not one of two-pass, one-pass"):
        TrainConfig(data=".", augment="random").resolved()


def test_each_start_gets_its_own_recipe_and_explicit_settings_win():
    from skincancer.train import RECIPES

    for pretrained in (True, False):
        c = TrainConfig(data=".", pretrained=pretrained).resolved()
        assert {k: getattr(c, k) for k in RECIPES[pretrained]} == RECIPES[pretrained]
        assert c.presize == round(1.5 * c.size)
    assert RECIPES[False]["epochs"] > RECIPES[True]["epochs"]  # from scratch needs more passes
    c = TrainConfig(data=".", pretrained=False, epochs=3, size=96, mixup=0.0, bs=8).resolved()
    assert (c.epochs, c.size, c.bs, c.presize, c.lr) == (3, 96, 8, 144, RECIPES[False]["lr"])


def test_a_batch_larger_than_the_training_split_is_refused(ham_dir, tmp_path, capsys):
    code = cli.main(["train", "--data", str(ham_dir), "--limit", "60", "--no-pretrained", "--bs", "512",
                     "--out", str(tmp_path / "m.pkl")])
    assert code == 2
    assert "bs: 512 is more than the" in capsys.readouterr().err and not (tmp_path / "m.pkl").exists()


def test_a_learner_with_the_gpu_optimiser_trains_and_exports(small_dls, tmp_path):
    from skincancer.predict import unpickle_learner
    from skincancer.train import fused_adamw

    learn = make_learner(small_dls, "binary", "resnet50", pretrained=False, opt_func=fused_adamw())
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3)
    learn.export(tmp_path / "gpu.pkl")  # the learner keeps opt_func: it must pickle
    assert type(learn.opt.opt).__name__ == "AdamW"
    assert unpickle_learner(tmp_path / "gpu.pkl").dls.vocab == ["benign", "malignant"]


def test_compile_builds_one_training_graph_and_validates_eagerly(small_dls, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    from skincancer.callbacks import compile_model

    # 60 images at bs 8: full training batches, and a last validation batch smaller than the others
    assert len(small_dls.valid_ds) % small_dls.valid.bs != 0
    learn = make_learner(small_dls, "binary", "resnet18", pretrained=False)
    plain = learn.model
    torch._dynamo.reset()
    counters.clear()
    try:
        with learn.no_bar(), learn.no_logging():
            # dynamo's graph capture is what recompiles; the "eager" backend skips the slow code generation
            learn.fit_one_cycle(2, 1e-3, cbs=[compile_model(backend="eager")])
        graphs, captured = counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]
    finally:
        torch._dynamo.reset()
    assert graphs == 1 and captured > 0  # one graph for training: no grad-free, no dynamic-shape recompiles
    assert learn.model is plain and plain._compiled_call_impl is None
    assert "CompileModel" not in [type(cb).__name__ for cb in learn.cbs]
    learn.export(tmp_path / "compiled.pkl")


@pytest.mark.parametrize("task, n_classes", [("binary", 2), ("dx", 7)])
def test_an_auroc_undefined_on_a_small_validation_split_is_nan_not_a_crash(task, n_classes):
    import math
    from types import SimpleNamespace

    from fastai.torch_core import to_detach
    from sklearn.metrics import roc_auc_score

    from skincancer.train import metrics_for

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


def test_a_run_can_reuse_another_models_split(trained, ham_dir, tmp_path):
    from skincancer.train import setup

    recorded = trained.with_suffix(".split.csv")  # the binary smoke model's split, reused by a dx run
    config, df, _ = setup(TrainConfig(data=str(ham_dir), task="dx", pretrained=False, size=32, bs=8, epochs=1,
                                      split_from=str(recorded), num_workers=0, out=str(tmp_path / "dx.pkl")))
    want = pd.read_csv(recorded).set_index("image_id")["split"].sort_index()
    assert df.set_index("image_id")["split"].sort_index().equals(want)
    assert "split_from" in dataclasses.asdict(config) and config.split_from == str(recorded)  # on the card


def _tiny_learner(model=None):
    """A linear model (or `model`) on 64 random vectors: fastai's training loop in a fraction of a second."""
    import fastai.callback.progress  # noqa: F401  (fastai's progress bar and Learner.no_bar, as in training)
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.torch_core import set_seed

    set_seed(0)  # the data, the model and the shuffling: two learners train alike
    x = torch.randn(64, 4)
    items = list(zip(x, (x[:, 0] > 0).long()))
    dls = DataLoaders.from_dsets(items, items, bs=8, device="cpu", num_workers=0)  # fastai would fork one per core
    return Learner(dls, torch.nn.Linear(4, 2) if model is None else model, loss_func=torch.nn.CrossEntropyLoss())


def _poison_loss(epoch: int, iteration: int):
    """A callback making one training batch's loss NaN (0-based epoch and iteration)."""
    from fastai.callback.core import Callback

    class PoisonLoss(Callback):
        def after_loss(self):
            if self.training and self.epoch == epoch and self.iter == iteration:
                self.learn.loss_grad = self.loss_grad * float("nan")
                self.learn.loss = self.loss_grad.clone()

    return PoisonLoss()


@pytest.mark.parametrize("guard", ["stop_on_nan", "loss_on_device"])
@pytest.mark.parametrize("epoch, iteration", [(1, 2), (2, 7)])  # (2, 7): the fit's last batch, read as it ends
def test_training_stops_with_a_clear_error_when_the_loss_stops_being_finite(guard, epoch, iteration):
    from skincancer import callbacks

    learn = _tiny_learner()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2, cbs=[_poison_loss(epoch, iteration), getattr(callbacks, guard)()])  # finite: trains quietly
        with pytest.raises(SkinCancerError, match=rf"became nan at epoch {epoch + 1}, iteration {iteration + 1}; "
                                                  "nothing was exported"):
            learn.fit(3, 1e-2, cbs=[_poison_loss(epoch, iteration), getattr(callbacks, guard)()])
    assert type(learn.recorder.smooth_loss).__name__ == "AvgSmoothLoss"  # fastai's, picklable, even after the error
    pickle.dumps(learn.recorder)


def _fit_and_watch(guard=None, epochs: int = 2):
    """Fit the tiny learner; return it and the smoothed loss the progress bar was given at each training batch."""
    from fastai.callback.core import Callback

    shown = []

    class Watch(Callback):
        order = 59  # just before fastai's progress bar reads learn.smooth_loss

        def after_batch(self):
            if self.training:
                shown.append(float(self.learn.smooth_loss))

    learn = _tiny_learner()
    with learn.no_logging():
        learn.fit(epochs, 1e-2, cbs=[Watch(), *([guard] if guard is not None else [])])
    return learn, shown


def test_the_loss_kept_on_the_device_records_what_fastai_records_and_shows_it_a_batch_late():
    from skincancer.callbacks import loss_on_device

    ref, ref_shown = _fit_and_watch()
    ours, shown = _fit_and_watch(loss_on_device())
    assert [float(v) for v in ours.recorder.losses] == [float(v) for v in ref.recorder.losses]
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in ours.recorder.losses)
    assert ours.recorder.values == ref.recorder.values and ours.recorder.iters == ref.recorder.iters
    assert float(ours.smooth_loss) == float(ref.smooth_loss) and ours.recorder.smooth_loss.count == 16
    assert ref_shown == [float(v) for v in ref.recorder.losses]
    # each epoch's first batch at once, then the previous batch's value
    per_epoch = [ref_shown[i:i + 8] for i in (0, 8)]
    assert shown == [v for e in per_epoch for v in (e[:1] + e[:-1])]
    assert type(ours.recorder.smooth_loss).__name__ == "AvgSmoothLoss"
    pickle.dumps(ours.recorder)


def test_restore_gives_fastai_its_smoothing_back_after_an_interrupted_fit():
    from fastai.callback.core import Callback

    from skincancer.callbacks import loss_on_device

    class Interrupt(Callback):
        order = 100  # after the Recorder and the guard have seen the batch

        def after_batch(self):
            if self.training and self.iter == 4:
                raise KeyboardInterrupt

    learn, guard = _tiny_learner(), loss_on_device()
    with learn.no_bar(), learn.no_logging(), pytest.raises(KeyboardInterrupt):
        learn.fit(1, 1e-2, cbs=[guard, Interrupt()])
    assert type(learn.recorder.smooth_loss).__name__ != "AvgSmoothLoss"  # fastai skipped after_fit
    guard.restore()  # as skincancer.train.fit does when a fit ends early
    assert type(learn.recorder.smooth_loss).__name__ == "AvgSmoothLoss" and learn.recorder.smooth_loss.count == 5
    assert len(learn.recorder.losses) == 5
    pickle.dumps(learn.recorder)

def _float_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("decay", [0.5, 0.9])  # 0.5: exponential from the 2nd step; 0.9: the plain mean for 10 steps
def test_the_weight_average_is_the_mean_then_an_ema_validates_and_gives_training_its_weights_back(decay):
    from fastai.callback.core import Callback

    from skincancer.callbacks import weight_average

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    steps, validated, after = [], [], []

    class Watch(Callback):
        order = 10  # after the average's own events

        def after_step(self):
            steps.append(_float_state(self.model))

        def before_validate(self):
            validated.append(_float_state(self.model))

        def after_epoch(self):
            after.append(_float_state(self.model))

    learn, average = _tiny_learner(model), weight_average(decay)
    with learn.no_bar(), learn.no_logging():
        learn.fit(2, 1e-2, cbs=[average, Watch()])
    expected = []
    for n, w in enumerate(steps, start=1):  # BatchNorm's running statistics too, as they stood after each step
        d = min(decay, (n - 1) / n)
        expected.append({k: d * expected[-1][k] + (1 - d) * v for k, v in w.items()} if expected else w)
    assert len(steps) == 16 and len(validated) == 2
    pairs = (validated[0], expected[7]), (validated[1], expected[15]), (average.averaged_state(), expected[-1])
    for got, want in pairs:
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    # training went on from its own weights, and ends with them: only validation saw the average
    for k in steps[-1]:
        assert torch.equal(after[-1][k], steps[-1][k]) and torch.equal(after[0][k], steps[7][k])
    assert not torch.equal(validated[1]["0.weight"], steps[-1]["0.weight"])
    assert average.averaged_state()["1.num_batches_tracked"] == 16  # an integer buffer is the model's own


def test_weight_average_rejects_a_decay_outside_zero_one():
    from skincancer.callbacks import weight_average

    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(SkinCancerError, match="ema: .* must be in \\(0, 1\\)"):
            weight_average(decay)
    with pytest.raises(SkinCancerError, match="ema: 1.5 must be 0 \\(off\\) or a decay in \\(0, 1\\)"):
        TrainConfig(data=".", ema=1.5).resolved()
