"""Every training option defined once: the command line, the recipes and the resume check derive from TrainConfig."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from skincancer import SkinCancerError, cli
from skincancer.config import RECIPES, TrainConfig, add_config_arguments, config_from_arguments


def parsed(*flags: str) -> TrainConfig:
    """The TrainConfig that `train` flags give."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_arguments(parser.parse_args(["--data", "somewhere", *flags]))


def test_every_field_is_a_flag_whose_help_gives_its_default():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert set(actions) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(a.help for a in actions.values())
    assert "(default: 0.9)" in actions["target_sensitivity"].help and "recipe's" in actions["epochs"].help
    assert actions["num_workers"].option_strings == ["--workers"] and actions["cache"].option_strings == ["--no-cache"]


def test_flags_left_out_take_the_fields_defaults_and_each_flag_reaches_its_field(tmp_path):
    assert parsed() == TrainConfig(data="somewhere")
    (tmp_path / "map.json").write_text(json.dumps({"Melanoma": "mel"}))
    c = parsed("--no-pretrained", "--no-cache", "--compile", "--drop-missing", "--size", "96", "--lr", "0.01",
               "--workers", "3", "--recipe", "cpu", "--class-map", str(tmp_path / "map.json"), "--seed", "7")
    assert (c.pretrained, c.cache, c.compile, c.drop_missing, c.size, c.lr, c.num_workers, c.recipe, c.seed) == \
        (False, False, True, True, 96, 0.01, 3, "cpu", 7)
    assert c.class_map == {"Melanoma": "mel"}


def test_the_command_line_trains_the_config_its_flags_give(monkeypatch):
    from skincancer import train as T

    configs = []
    monkeypatch.setattr(T, "train", lambda config, resume=False: configs.append((config, resume)))
    assert cli.main(["train", "--data", "somewhere", "--epochs", "3", "--resume"]) == 0
    assert configs == [(TrainConfig(data="somewhere", epochs=3), True)]


def test_a_recipe_fills_what_a_run_leaves_unset_and_explicit_settings_win():
    for name, recipe in RECIPES.items():
        c = TrainConfig(data=".", recipe=name).resolved()
        assert {k: getattr(c, k) for k in recipe} == recipe and c.presize == round(1.5 * c.size)
    assert TrainConfig(data=".").resolved().recipe == "resnet50"
    scratch = TrainConfig(data=".", pretrained=False).resolved()  # --no-pretrained alone: the from-scratch recipe
    assert scratch.recipe == "scratch" and scratch.epochs == RECIPES["scratch"]["epochs"]
    assert RECIPES["scratch"]["epochs"] > RECIPES["resnet50"]["epochs"]  # from scratch needs more passes
    c = TrainConfig(data=".", pretrained=False, epochs=3, size=96, bs=8).resolved()
    assert (c.epochs, c.size, c.bs, c.presize, c.lr) == (3, 96, 8, 144, RECIPES["scratch"]["lr"])
    lite = TrainConfig(data=".", recipe="cpu", pretrained=False).resolved()  # the cpu recipe's network, from scratch
    assert lite.arch == RECIPES["cpu"]["arch"] and lite.pretrained is False
    assert TrainConfig(data=".", recipe="scratch", weights="w.pth").resolved().pretrained is True


def test_config_rejects_nonsense():
    cases = {"imbalance: 'oversample'": dict(imbalance="oversample"), r"out: .* must end in \.pkl": dict(out="m.pt"),
             "wd: -0.1 must be 0 or more": dict(wd=-0.1), "recipe: 'tpu'": dict(recipe="tpu"),
             "epochs: 0 must be positive": dict(epochs=0), "task: 'melanoma'": dict(task="melanoma"),
             "freeze_epochs: -1": dict(freeze_epochs=-1), r"target_sensitivity: 1.5 must be in \(0, 1\]":
             dict(target_sensitivity=1.5), "weights and pretrained=False": dict(weights="w.pth", pretrained=False)}
    for message, fields in cases.items():
        with pytest.raises(SkinCancerError, match=message):
            TrainConfig(data=".", **fields).resolved()


def test_a_resumed_run_must_share_what_decides_the_training_not_how_it_runs():
    identity = TrainConfig(data=".").resolved().identity()
    assert {"task", "arch", "epochs", "lr", "seed", "weights", "split_from"} <= set(identity)
    assert not {"out", "num_workers", "cache", "cache_dir", "compile", "checkpoint_every",
                "target_sensitivity"} & set(identity)
