"""Load an exported model, safely by default, and predict lesion photos: `load(path).predict(photo)`."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .card import read_card, verify_file
from .check import read_check
from .errors import SkinCancerError
from .files import model_files
from .predictor import Predictor

_CACHE: dict[tuple, Predictor] = {}


def _file_key(*paths: Path) -> tuple:
    return tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths if p.is_file())


def load(path: str | Path, trusted: bool = False, cpu: bool = True) -> Predictor:
    """Load an exported model from any of its files, checking every file it reads against the model card.

    Without `trusted`, NAME.safetensors and the card rebuild the learner and no pickle is read; a .pkl named here
    must still match the card, and one with no weights beside it is unpickled only if it does. With
    `trusted=True` the .pkl is unpickled as fastai's load_learner does, which runs any code the file contains. An
    .onnx model (`export`) is served by onnxruntime, without torch. Loaded models are cached per file version.
    """
    path = Path(path)
    if not path.is_file():
        raise SkinCancerError(f"{path}: no such model file")
    if path.suffix not in (".pkl", ".safetensors", ".onnx"):
        raise SkinCancerError(f"{path}: not a model file (NAME.pkl, NAME.safetensors or NAME.onnx)")
    files = model_files(path)
    use_pickle = path.suffix != ".onnx" and (trusted or not files["weights"].is_file())
    read = path if path.suffix == ".onnx" else files["model" if use_pickle else "weights"]
    key = (_file_key(path, files["card"], read, files["check"]), cpu, use_pickle)
    if key not in _CACHE:
        _CACHE[key] = _load(path, files, use_pickle, trusted, cpu)
    return _CACHE[key]


def _load(path: Path, files: dict[str, Path], use_pickle: bool, trusted: bool, cpu: bool) -> Predictor:
    card = read_card(path)
    check = read_check(path, card)
    if path.suffix == ".onnx":
        # onnxruntime alone: a server of .onnx models needs neither torch nor fastai
        from .runtime import load_onnx

        role = "int8" if path.name.endswith(".int8.onnx") else "onnx"
        threshold = card.onnx.get(role, {}).get("check_threshold")  # int8's own: its activations drift from fp32's
        if check is not None and threshold is not None:
            check = dataclasses.replace(check, threshold=float(threshold))
        return load_onnx(path, card, verify_file(path, card, role), check)
    # torch and fastai are imported only to load a fastai model: start-up time
    from .classifier import Classifier
    from .rebuild import rebuild_learner, unpickle_learner

    named = verify_file(path, card, "model" if path.suffix == ".pkl" else "weights")  # the file the user named
    if use_pickle:
        pickled = files["model"]
        if not pickled.is_file():
            raise SkinCancerError(f"{pickled}: no such file beside {path.name}")
        # without `trusted`: unpickled only as the very file the export wrote beside this card
        data = named if pickled == path else verify_file(pickled, card, "model")
        learn = unpickle_learner(data, pickled, cpu=cpu)
    else:
        weights = files["weights"]
        data = named if weights == path else verify_file(weights, card, "weights")
        learn = rebuild_learner(card, data, weights, cpu=cpu)
    return Classifier(card=card, path=path, learn=learn, check=check)
