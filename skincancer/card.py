"""The model card (NAME.json): what a model is, how it calls, and the sha256 of every file that loading reads.

Loading reads each file's bytes once, checks them against the card, and hands those same bytes on: a file replaced,
torn or swapped for another model's is refused with its name, and no loader ever sees unverified bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .calibration import check_calibration
from .errors import SkinCancerError
from .files import model_files

CARD_VERSION = 2  # 1: cards written before the version was recorded (skincancer 0.1 and 0.2.0)
DEFAULT_THRESHOLD = 0.5  # a card that records none: the argmax of a binary model's two probabilities
REQUIRED = ("task", "classes", "arch", "size", "presize")
# which card key holds the sha256 of each file of an export
SHA256_KEYS = {"model": "sha256", "weights": "weights_sha256"}


@dataclass
class ModelCard:
    """The model card (NAME.json) as one typed object: read, upgraded and checked once (`from_dict`), written once
    (`to_dict`). Its fields are what the card's JSON holds; keys a later version added are None in older cards."""

    task: str
    classes: list[str]
    arch: str
    size: int
    presize: int
    threshold: float = DEFAULT_THRESHOLD
    threshold_rule: dict | str | None = None
    calibration: dict | None = None
    normalize: dict | None = None
    pretrained: bool | None = None
    pretrained_weights: dict | None = None
    recipe: str | None = None
    seed: int | None = None
    test_source: str | None = None  # a source held out as the test split (None: a random lesion split)
    processes: int | None = None
    monitor: str | None = None
    best_epoch: int | None = None
    split_counts: dict | None = None
    split_images: dict | None = None
    lesion_ids: bool | None = None
    split_lesions: dict | None = None
    metrics: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    versions: dict | None = None
    created: str | None = None
    disclaimer: str | None = None
    sha256: str | None = None
    weights_sha256: str | None = None
    split_sha256: str | None = None
    files: dict | None = None
    preprocess: dict | None = None
    onnx: dict = field(default_factory=dict)
    check: dict | None = None  # the dermoscopy check: its file, sha256, layers and threshold (check.py)
    card_version: int = CARD_VERSION
    extra: dict = field(default_factory=dict)  # keys this version does not know, written back as read
    # the keys the JSON held, so that writing it back keeps those that were null
    present: frozenset = field(default=frozenset(), repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "model card") -> ModelCard:
        """A card from its JSON object, upgraded to this version and checked; SkinCancerError naming `source`."""
        if not isinstance(data, dict):
            raise SkinCancerError(f"{source}: not a valid model card (a JSON {type(data).__name__}, not an object)")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise SkinCancerError(f"{source}: the model card lacks {', '.join(missing)}")
        data = _upgrade(dict(data), source)
        threshold = data.get("threshold", DEFAULT_THRESHOLD)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise SkinCancerError(f"{source}: threshold must be a number, not {threshold!r}")
        check_calibration(data.get("calibration"), source)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "present"}
        known = {k: v for k, v in data.items() if k in names and v is not None}
        card = cls(**known, extra={k: v for k, v in data.items() if k not in names}, present=frozenset(data))
        card.classes, card.size, card.presize = [str(c) for c in card.classes], int(card.size), int(card.presize)
        card.threshold = float(card.threshold)
        return card

    def to_dict(self) -> dict:
        """The card's JSON object: every field that was read or holds more than its default, then `extra`'s keys."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("extra", "present"):
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if f.name in self.present or value != default or f.name in (*REQUIRED, "card_version"):
                out[f.name] = value
        return {**out, **self.extra}

    @property
    def target_sensitivity(self) -> float | None:
        """The validation sensitivity the threshold was chosen to reach (None where the card records no rule)."""
        rule = self.threshold_rule
        return float(rule["target_sensitivity"]) if isinstance(rule, dict) and "target_sensitivity" in rule else None

    def file_sha256(self, role: str) -> str | None:
        """The sha256 the card records for an export's `role` file ('model', 'weights', 'check', 'onnx', 'int8')."""
        if role in SHA256_KEYS:
            return getattr(self, SHA256_KEYS[role])
        if role == "check":
            return (self.check or {}).get("sha256")
        return self.onnx.get(role, {}).get("sha256")


def _upgrade(data: dict, source: str) -> dict:
    """A card of any version written so far, as this version writes it: the one place old cards are handled."""
    version = data.get("card_version", 1)
    if not isinstance(version, int) or version > CARD_VERSION:
        raise SkinCancerError(f"{source}: card version {version!r} is newer than this skincancer reads "
                              f"({CARD_VERSION}); upgrade skincancer")
    # 1 -> 2: the version recorded; a held-out source, the lesion-id flag and a rule's confidence could be absent,
    # and mean what absent means (a random split, HAM10000's lesion ids, the plain rule)
    rule = data.get("threshold_rule")
    if version == 1 and isinstance(rule, dict) and "target_sensitivity" in rule:
        data["threshold_rule"] = {**rule, "confidence": rule.get("confidence", 0.0)}
    data["card_version"] = CARD_VERSION
    return data


def read_card(model_path: str | Path) -> ModelCard:
    """The model card beside any file of an export, checked: it must exist and say what loading needs."""
    card_path = model_files(model_path)["card"]
    if not card_path.is_file():
        raise SkinCancerError(
            f"{card_path}: no model card beside {Path(model_path).name}. An export writes NAME.json with NAME.pkl; "
            "loading needs it for the classes, the threshold and each file's sha256 (fastai's load_learner reads a "
            "trusted .pkl alone)")
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkinCancerError(f"{card_path}: not a valid model card ({e})") from None
    return ModelCard.from_dict(data, str(card_path))


def describe_export(model_path: str | Path) -> str:
    """What an export holds, in a phrase from its card (recipe, date, test AUROC), for a message about replacing it."""
    try:
        card = read_card(model_path)
        auroc = card.metrics.get("test", {}).get("auroc")
        return (f"recipe {card.recipe or card.arch}, trained {(card.created or '?')[:10]}, "
                f"test AUROC {'not recorded' if auroc is None else f'{auroc:.3f}'}")
    except (SkinCancerError, OSError, AttributeError):
        return f"no readable model card at {model_files(model_path)['card'].name}"


def verified_bytes(path: str | Path, expected: str | None, card_name: str) -> bytes:
    """The bytes of `path`, read once, if their sha256 is `expected` (the card's); else SkinCancerError naming it."""
    path = Path(path)
    if not path.is_file():
        raise SkinCancerError(f"{path}: no such file (the model card {card_name} names it)")
    if not expected:
        raise SkinCancerError(f"{path}: the model card {card_name} records no sha256 for it, so it cannot be "
                              "checked; export the model again")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        raise SkinCancerError(f"{path}: its sha256 does not match the model card {card_name}: the file was replaced, "
                              "changed or torn since the export (or belongs to another model)")
    return data


def verify_file(path: str | Path, card: ModelCard, role: str) -> bytes:
    """`verified_bytes` of the export's `role` file ('model', 'weights', 'onnx' or 'int8') against `card`."""
    return verified_bytes(path, card.file_sha256(role), model_files(path)["card"].name)
