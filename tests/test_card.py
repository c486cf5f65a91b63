"""The model card as one typed object: every version written so far read, upgraded and written back."""

from __future__ import annotations

import json

import pytest

from skincancer import SkinCancerError
from skincancer.card import CARD_VERSION, ModelCard, read_card
from skincancer.predictor import Predictor

RULE = {"target_sensitivity": 0.9, "chosen_on": "valid", "how": "...", "valid_sensitivity": 0.9,
        "valid_specificity": 0.7}
# a card as 0.1 and 0.2.0 wrote it: no version, no held-out source, a rule without a confidence
VERSION_1 = {"task": "binary", "classes": ["benign", "malignant"], "arch": "tf_efficientnet_lite0", "pretrained": True,
             "pretrained_weights": {"source": "timm timm/tf_efficientnet_lite0.in1k"}, "recipe": "cpu", "size": 160,
             "presize": 240, "normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}, "seed": 42, "processes": 1,
             "threshold": 0.157, "threshold_rule": RULE, "calibration": {"method": "platt", "slope": 0.8,
                                                                            "intercept": -1.1},
             "monitor": "auroc", "best_epoch": 9, "split_counts": {"test": {"benign": 1222, "malignant": 296}},
             "split_images": {"train": 7055, "valid": 1442, "test": 1518}, "split_lesions": {"test": 1120},
             "metrics": {"test": {"auroc": 0.939}}, "config": {"data": "data/HAM10000"}, "versions": {},
             "created": "2026-11-30T10:00:00+00:00", "disclaimer": "...", "sha256": "a" * 64,
             "weights_sha256": "b" * 64, "split_sha256": "c" * 64, "files": {"model": "m.pkl"}}
# a 0.1 card of a model without calibration, threshold or rule (its call the argmax)
VERSION_1_BARE = {"task": "binary", "classes": ["benign", "malignant"], "arch": "resnet50", "size": 224,
                  "presize": 336, "calibration": None, "sha256": "a" * 64, "weights_sha256": "b" * 64}
VERSION_2 = {**VERSION_1, "threshold_rule": {**RULE, "confidence": 0.95}, "test_source": "rosendahl",
             "lesion_ids": True, "card_version": 2,
             "onnx": {"onnx": {"file": "m.onnx", "sha256": "d" * 64}}, "preprocess": {"input": "uint8"}}


def test_this_versions_card_reads_and_writes_back_unchanged():
    assert CARD_VERSION == 2
    card = ModelCard.from_dict(json.loads(json.dumps(VERSION_2)))
    assert card.to_dict() == VERSION_2
    assert card.test_source == "rosendahl" and card.threshold == 0.157 and card.target_sensitivity == 0.9
    assert card.file_sha256("weights") == "b" * 64 and card.file_sha256("onnx") == "d" * 64
    assert card.file_sha256("int8") is None


def test_a_version_1_card_is_upgraded_in_one_place():
    card = ModelCard.from_dict(json.loads(json.dumps(VERSION_1)))
    assert card.card_version == 2 and card.threshold_rule["confidence"] == 0.0  # the plain rule it was chosen by
    assert card.test_source is None and card.lesion_ids is None
    assert card.to_dict() == {**VERSION_1, "threshold_rule": {**RULE, "confidence": 0.0}, "card_version": 2}
    bare = ModelCard.from_dict(dict(VERSION_1_BARE))
    assert bare.threshold == 0.5 and bare.threshold_rule is None and bare.calibration is None
    assert bare.to_dict() == {**VERSION_1_BARE, "card_version": 2}  # its null calibration kept as written
    assert Predictor(card=bare, path=None).threshold == 0.5  # type: ignore[arg-type]


def test_unknown_keys_are_kept_and_bad_cards_are_named():
    card = ModelCard.from_dict({**VERSION_2, "notes": "a later version's key"})
    assert card.extra == {"notes": "a later version's key"} and card.to_dict()["notes"] == "a later version's key"
    with pytest.raises(SkinCancerError, match="m.json: the model card lacks presize"):
        ModelCard.from_dict({k: v for k, v in VERSION_2.items() if k != "presize"}, "m.json")
    with pytest.raises(SkinCancerError, match="threshold must be a number"):
        ModelCard.from_dict({**VERSION_2, "threshold": "high"})
    with pytest.raises(SkinCancerError, match="card version 3 is newer than this skincancer reads"):
        ModelCard.from_dict({**VERSION_2, "card_version": 3})
    with pytest.raises(SkinCancerError, match="not an object"):
        ModelCard.from_dict([VERSION_2])


def test_an_export_writes_its_card_once_and_reads_it_back_as_written(trained):
    written = json.loads(trained.with_suffix(".json").read_text())
    card = read_card(trained)
    assert written["card_version"] == CARD_VERSION and card.to_dict() == written
    assert card.threshold_rule["confidence"] == 0.95 and card.lesion_ids is True and card.test_source is None
