"""A training run end to end: the card's numbers, tasks, reused splits, calibration, errors, resuming."""

from __future__ import annotations

import dataclasses
import json
import urllib.error

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, SMALL, scores_of_known_miscalibration, wait_for_checkpoint

from skincancer import SkinCancerError, cli
from skincancer.calibration import calibrate, fit_calibration
from skincancer.config import TrainConfig
from skincancer.data import prepare
from skincancer.metrics import choose_confident_threshold, choose_threshold
from skincancer.predict import load
from skincancer.pretrained import pretrained_weights_file
from skincancer import train as T


def test_the_split_is_reproducible_from_the_card(trained, ham_dir):
    card = json.loads(trained.with_suffix(".json").read_text())
    cfg = card["config"]
    again = prepare(ham_dir, cfg["task"], cfg["valid_pct"], cfg["test_pct"], cfg["seed"], cfg["limit"])
    saved = pd.read_csv(trained.with_suffix(".split.csv"))
    assert again[["image_id", "split"]].reset_index(drop=True).equals(saved[["image_id", "split"]])


@pytest.mark.slow
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
    recalibrated = dataclasses.replace(clf, card=dataclasses.replace(clf.card, calibration=cal)).predict(
        original_images[0])
    assert recalibrated["probabilities"] == res["probabilities"] and recalibrated["label"] == res["label"]
    assert recalibrated["malignant_probability"] == pytest.approx(float(calibrate(summed, cal)), abs=1e-6)
    for threshold, call in ((p - 1e-6, "malignant"), (p + 1e-6, "benign")):
        moved = dataclasses.replace(clf, card=dataclasses.replace(clf.card, threshold=threshold)).predict(
            original_images[0])
        assert moved["call"] == call and moved["label"] == res["label"]
    # several photos of one lesion: the mean of each diagnosis's score names the label, the mean probability calls
    lesion = clf.predict_lesion(original_images[:3])
    photos = [clf.predict(path) for path in original_images[:3]]
    mean = {d: np.mean([r["probabilities"][d] for r in photos]) for d in card["classes"]}
    assert lesion["probabilities"] == pytest.approx(mean, abs=1e-5) and lesion["label"] == max(mean, key=mean.get)
    assert lesion["malignant_probability"] == pytest.approx(np.mean([r["malignant_probability"] for r in photos]),
                                                            abs=1e-5)


def test_bad_training_input_is_an_error_line_not_a_traceback(tmp_path, capsys):
    assert cli.main(["train", "--data", str(tmp_path / "nowhere"), "--no-pretrained"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not exist" in err and "Traceback" not in err


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


def test_a_batch_larger_than_the_training_split_is_refused(ham_dir, tmp_path, capsys):
    code = cli.main(["train", "--data", str(ham_dir), "--limit", "60", "--no-pretrained", "--bs", "512",
                     "--out", str(tmp_path / "m.pkl")])
    assert code == 2
    assert "bs: 512 is more than the" in capsys.readouterr().err and not (tmp_path / "m.pkl").exists()


def test_a_run_can_reuse_another_models_split(trained, ham_dir, tmp_path):
    from skincancer.train import setup

    recorded = trained.with_suffix(".split.csv")  # the binary smoke model's split, reused by a dx run
    config, df, _ = setup(TrainConfig(data=str(ham_dir), task="dx", pretrained=False, size=32, bs=8, epochs=1,
                                      split_from=str(recorded), num_workers=0, out=str(tmp_path / "dx.pkl")))
    want = pd.read_csv(recorded).set_index("image_id")["split"].sort_index()
    assert df.set_index("image_id")["split"].sort_index().equals(want)
    assert "split_from" in dataclasses.asdict(config) and config.split_from == str(recorded)  # on the card


def test_training_calibrates_on_valid_and_puts_the_threshold_on_that_scale(monkeypatch):
    from types import SimpleNamespace

    import pandas as pd

    from skincancer.train import evaluate_splits

    scores, truth = scores_of_known_miscalibration(n=4000, seed=3)
    split = np.where(np.arange(4000) < 2000, "valid", "test")
    df = pd.DataFrame({"split": split, "dx": np.where(truth, "mel", "nv"), "lesion_id": [f"L{i}" for i in range(4000)],
                       "label": np.where(truth, "malignant", "benign")})
    predictions = {s: (np.stack([1 - scores[split == s], scores[split == s]], axis=1), truth[split == s].astype(int))
                   for s in ("valid", "test")}
    monkeypatch.setattr(T, "predict_frame", lambda learn, part, model: predictions[part["split"].iloc[0]])
    monkeypatch.setattr(T, "inference_model", lambda model: model)
    learn = SimpleNamespace(dls=SimpleNamespace(vocab=["benign", "malignant"]), model=None)
    metrics, card, _ = evaluate_splits(learn, df, target_sensitivity=0.9, confidence=0)
    valid = split == "valid"
    assert card["calibration"] == fit_calibration(scores[valid], truth[valid])
    assert card["threshold"] == choose_threshold(calibrate(scores[valid], card["calibration"]), truth[valid], 0.9)
    # by default the threshold keeps the target on 95% of valid's resampled lesions: a lower threshold
    confident, card95, scored = evaluate_splits(learn, df, target_sensitivity=0.9)
    assert card95["threshold"] == choose_confident_threshold(calibrate(scores[valid], card["calibration"]),
                                                             truth[valid], 0.9, 0.95, groups=df["lesion_id"][valid])
    assert card95["threshold"] < card["threshold"] and card95["threshold_rule"]["confidence"] == 0.95
    assert confident["valid"]["sensitivity"] > metrics["valid"]["sensitivity"]
    assert confident["test"]["target"]["sensitivity"] == confident["test"]["sensitivity"]
    assert 0 <= confident["test"]["target"]["share_of_replicates_met"] <= 1
    assert scored["test"][1] == pytest.approx(calibrate(scores[~valid], card["calibration"]))
    for s in ("valid", "test"):
        assert metrics[s]["threshold"] == card["threshold"]
        assert metrics[s]["brier"] < metrics[s]["brier_uncalibrated"]  # scores half as steep as the truth
        assert metrics[s]["mean_probability"] == pytest.approx(truth[split == s].mean(), abs=0.02)
    assert metrics["valid"]["sensitivity"] >= 0.9


def test_a_diverging_loss_stops_training_with_a_clear_error(ham_dir, tmp_path):
    from skincancer.train import TrainConfig, fit, setup

    config, df, learn = setup(TrainConfig(data=str(ham_dir), pretrained=False, epochs=1, size=32, bs=16, limit=80,
                                          num_workers=0, out=str(tmp_path / "m.pkl")))
    base = learn.loss_func
    learn.loss_func = lambda pred, *y: base(pred, *y) * float("nan")
    with pytest.raises(SkinCancerError, match=r"training diverged: the loss became nan at epoch 1, iteration 1"):
        fit(learn, config)
    assert not (tmp_path / "m.pkl").exists()


@pytest.mark.slow
def test_resume_continues_a_killed_run_from_its_last_epoch(ham_dir, tmp_path, capsys, monkeypatch):
    import json
    import subprocess
    import sys


    from skincancer import cli
    from skincancer.train import checkpoint_dir

    out = tmp_path / "r.pkl"
    args = ["train", "--data", str(ham_dir), "--limit", "200", "--size", "32", "--bs", "32", "--epochs", "4",
            "--no-pretrained", "--workers", "0", "--out", str(out), "--checkpoint-every", "0"]
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

    assert cli.main([*args[:10], "5", *args[11:], "--resume"]) == 2  # other settings: refused, checkpoint kept
    assert "the interrupted run used other settings (epochs: 4 then, 5 now)" in capsys.readouterr().err

    assert cli.main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resuming from {checkpoint_dir(out)}: phase 1, epoch {done + 2} of 4" in printed
    assert out.exists() and not checkpoint_dir(out).exists()
    assert json.loads(out.with_suffix(".json").read_text())["config"]["epochs"] == 4


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
    ckpt = pretrained_weights_file("resnet50")
    ckpt.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet50().state_dict(), ckpt)
    config = T.TrainConfig(data=str(ham_dir), pretrained=True, freeze_epochs=1, epochs=2, size=32, bs=32, limit=120,
                           num_workers=0, out=str(tmp_path / "ft.pkl"), checkpoint_every=0)
    real_stop = T.StopOnNaN
    seen = []

    class Interrupt(Callback):
        order = 100  # after the epoch's checkpoint is written, as a crash between epochs would be

        def after_epoch(self):
            seen.append((self.learn.model[0][0].weight.requires_grad, self.epoch))
            if len(seen) == 2:  # the first epoch of the unfrozen phase
                raise KeyboardInterrupt

    monkeypatch.setattr(T, "StopOnNaN", Interrupt)
    config, df, learn = T.setup(config)
    with pytest.raises(KeyboardInterrupt):
        T.fit(learn, config)
    assert seen == [(False, 0), (True, 0)]  # frozen body first, then unfrozen

    monkeypatch.setattr(T, "StopOnNaN", real_stop)
    config, df, learn = T.setup(config)
    T.fit(learn, config, resume=True)
    assert "phase 2, epoch 2 of 2" in capsys.readouterr().out
    assert learn.model[0][0].weight.requires_grad  # resumed unfrozen


@pytest.mark.slow
def test_fine_tuning_from_a_file_trains_the_head_alone_then_all_with_lower_rates_early(ham_dir, tmp_path,
                                                                                        lite0_weights, monkeypatch):
    config = TrainConfig(data=str(ham_dir), recipe="cpu", weights=str(lite0_weights), freeze_epochs=1, epochs=1,
                         lr_mult=100, size=32, bs=32, limit=200, num_workers=0, checkpoint_every=0,
                         out=str(tmp_path / "ft.pkl"))
    config, df, learn = T.setup(config)
    stem = learn.model[0].model.conv_stem.weight
    before, seen = stem.detach().clone(), []

    class Watch(T.StopOnNaN):
        def after_epoch(self):
            seen.append((torch.equal(stem, before), [h["lr"] for h in self.opt.hypers]))

    monkeypatch.setattr(T, "StopOnNaN", Watch)
    T.fit(learn, config)
    (frozen_kept, _), (unfrozen_kept, lrs) = seen
    assert frozen_kept and not unfrozen_kept  # the body learns only once unfrozen
    assert len(lrs) == 2 and lrs[1] == pytest.approx(100 * lrs[0])  # discriminative rates: the body's 100x lower


def test_an_existing_export_is_refused_before_training_unless_overwrite(tmp_path):
    from skincancer.cli import build_parser
    from skincancer.config import config_from_arguments

    out = tmp_path / "skincancer.pkl"
    out.write_bytes(b"the real model")
    out.with_suffix(".json").write_text(json.dumps({
        "task": "binary", "classes": ["benign", "malignant"], "arch": "tf_efficientnet_lite0", "size": 160,
        "presize": 240, "recipe": "cpu", "created": "2026-11-30T10:00:00+00:00",
        "metrics": {"test": {"auroc": 0.9391}}}))
    config = TrainConfig(data=str(ROOT / "data" / "sample"), out=str(out), pretrained=False, size=32, epochs=1,
                         bs=16, cache=False, num_workers=0)
    with pytest.raises(SkinCancerError, match=r"skincancer.pkl: a model is already exported there \(recipe cpu, "
                                              r"trained 2026-11-30, test AUROC 0.939\); pass --overwrite"):
        T.setup(config)
    assert out.read_bytes() == b"the real model"
    args = build_parser().parse_args(["train", "--data", "d", "--out", str(out), "--overwrite"])
    assert config_from_arguments(args).overwrite is True
    _, df, learn = T.setup(dataclasses.replace(config, overwrite=True))  # past the check: the data and learner
    assert len(df) == 408 and learn.dls.bs == 16


def test_the_cards_figures_come_from_the_fp32_copy_even_under_mixed_precision(ham_dir, monkeypatch):
    from skincancer.classifier import batch_preds
    from skincancer.datablock import make_dataloaders
    from skincancer.inference import inference_model
    from skincancer.model import make_learner

    df = prepare(ham_dir, limit=120, seed=0)
    learn = make_learner(make_dataloaders(df, "binary", size=32, bs=16, num_workers=0), "binary", "resnet18",
                         pretrained=False).to_bf16()  # as a GPU run trains: fastai's autocast on
    with learn.no_bar():
        learn.fit(1, 1e-3)
    used = []
    real = T.predict_frame
    monkeypatch.setattr(T, "predict_frame", lambda learn, part, **kw: used.append(kw.get("model")) or
                        real(learn, part, **kw))
    _, card, scores = T.evaluate_splits(learn, df, 0.9, confidence=0)
    # predicted through a plain loop over the inference copy, which fastai's mixed precision never touches
    assert len(used) == 2 and all(m is not None and m is not learn.model for m in used)
    assert not any(p.dtype != torch.float32 for p in used[0].parameters())
    valid = df[df["split"] == "valid"]
    served = batch_preds(learn, learn.dls.test_dl(valid, bs=16, num_workers=0), inference_model(learn.model))[0]
    assert scores["valid"][1] == pytest.approx(calibrate(served[:, 1].numpy(), card["calibration"]), abs=1e-5)
