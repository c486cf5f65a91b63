"""The model card (NAME.json): what a model is, how it calls, and the sha256 of every file that loading reads.

Loading reads each file's bytes once, checks them against the card, and hands those same bytes on: a file replaced,
torn or swapped for another model's is refused with its name, and no loader ever sees unverified bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from .calibration import check_calibration
from .errors import SkinCancerError
from .files import model_files

REQUIRED = ("task", "classes", "arch", "size", "presize")
# which card key holds the sha256 of each file of an export
SHA256_KEYS = {"model": "sha256", "weights": "weights_sha256"}


def read_card(model_path: str | Path) -> dict:
    """The model card beside any file of an export, checked: it must exist and say what loading needs."""
    card_path = model_files(model_path)["card"]
    if not card_path.is_file():
        raise SkinCancerError(
            f"{card_path}: no model card beside {Path(model_path).name}. An export writes NAME.json with NAME.pkl; "
            "loading needs it for the classes, the threshold and each file's sha256 (fastai's load_learner reads a "
            "trusted .pkl alone)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkinCancerError(f"{card_path}: not a valid model card ({e})") from None
    if not isinstance(card, dict):
        raise SkinCancerError(f"{card_path}: not a valid model card (a JSON {type(card).__name__}, not an object)")
    missing = [k for k in REQUIRED if k not in card]
    if missing:
        raise SkinCancerError(f"{card_path}: the model card lacks {', '.join(missing)}")
    threshold = card.get("threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise SkinCancerError(f"{card_path}: threshold must be a number, not {threshold!r}")
    check_calibration(card.get("calibration"), str(card_path))
    return card


def describe_export(model_path: str | Path) -> str:
    """What an export holds, in a phrase from its card (recipe, date, test AUROC), for a message about replacing it."""
    card_path = model_files(model_path)["card"]
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        auroc = card["metrics"]["test"]["auroc"]
        return (f"recipe {card.get('recipe') or card['arch']}, trained {str(card.get('created', '?'))[:10]}, "
                f"test AUROC {'undefined' if auroc is None else f'{auroc:.3f}'}")
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable model card at {card_path.name}"


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


def verify_file(path: str | Path, card: dict, role: str) -> bytes:
    """`verified_bytes` of the export's `role` file ('model', 'weights', 'onnx' or 'int8') against `card`."""
    files = model_files(path)
    expected = card.get(SHA256_KEYS[role]) if role in SHA256_KEYS else card.get("onnx", {}).get(role, {}).get("sha256")
    return verified_bytes(path, expected, files["card"].name)
