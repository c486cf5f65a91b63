"""Load an exported learner and predict lesion photos: one image, or many in batches."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

from .data import malignant_probability
from .errors import SkinCancerError

ImageInput = Union[str, Path, bytes, "PIL.Image.Image"]  # noqa: F821
DISCLAIMER = "Research tool, not a medical device: never use it to diagnose or to decide on treatment."


def describe(src: Any) -> str:
    """A short name for an image input, for results and error messages."""
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def open_image(src: ImageInput):
    """Decode a path, bytes or PIL image into an upright RGB fastai PILImage, or raise SkinCancerError."""
    from fastai.vision.core import PILImage
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = describe(src)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a pixel bomb is an error, not a warning
            if isinstance(src, Image.Image):
                img = src
            elif isinstance(src, (bytes, bytearray)):
                img = Image.open(io.BytesIO(bytes(src)))
            elif isinstance(src, (str, Path)):
                if not Path(src).is_file():
                    raise SkinCancerError(f"{name}: no such file")
                img = Image.open(src)
            else:
                raise SkinCancerError(f"{name}: expected a file path, bytes or a PIL image")
            img.load()  # decode now, so a truncated file fails here and not inside a batch
            img = ImageOps.exif_transpose(img).convert("RGB")
    except SkinCancerError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise SkinCancerError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None
    return PILImage(img) if not isinstance(img, PILImage) else img


@dataclass
class Classifier:
    """An exported learner with its model card; `predict` one image or `predict_batch` many."""

    learn: Any
    card: dict
    path: Path

    @property
    def classes(self) -> list[str]:
        """The class names, in the model's output order."""
        return [str(c) for c in self.learn.dls.vocab]

    @property
    def threshold(self) -> float:
        """Probability of malignancy at which a binary model says 'malignant' (from the card, else 0.5)."""
        return float(self.card.get("threshold", 0.5))

    def _result(self, name: str, probs: np.ndarray) -> dict:
        classes = self.classes
        p_mal = float(malignant_probability(probs, classes))
        if classes == ["benign", "malignant"]:
            label = "malignant" if p_mal >= self.threshold else "benign"
        else:
            label = classes[int(np.argmax(probs))]
        return {"image": name, "label": label, "malignant_probability": p_mal,
                "probabilities": {c: float(p) for c, p in zip(classes, probs)}}

    def _probs(self, images: list, bs: int) -> np.ndarray:
        dl = self.learn.dls.test_dl(images, bs=bs, num_workers=0)
        with self.learn.no_bar():
            probs, _ = self.learn.get_preds(dl=dl)
        return probs.float().numpy()

    def predict(self, image: ImageInput) -> dict:
        """Label, probability of malignancy and every class probability for one image."""
        return self._result(describe(image), self._probs([open_image(image)], bs=1)[0])

    def predict_batch(self, images: Iterable[ImageInput], bs: int = 64, chunk: int = 512) -> list[dict]:
        """Predict many images through batched DataLoaders; an unreadable one yields {'image', 'error'}."""
        images = list(images)
        results: list[dict | None] = [None] * len(images)
        for start in range(0, len(images), chunk):
            good, where = [], []
            for i in range(start, min(start + chunk, len(images))):
                try:
                    good.append(open_image(images[i]))
                    where.append(i)
                except SkinCancerError as e:
                    results[i] = {"image": describe(images[i]), "error": str(e)}
            if good:
                for i, p in zip(where, self._probs(good, bs)):
                    results[i] = self._result(describe(images[i]), p)
        return results  # type: ignore[return-value]


_CACHE: dict[tuple, Classifier] = {}


def read_card(model_path: str | Path) -> dict:
    """The model card (NAME.json) beside an exported model, or {} when there is none."""
    card_path = Path(model_path).with_suffix(".json")
    if not card_path.exists():
        return {}
    try:
        return json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkinCancerError(f"{card_path}: not a valid model card ({e})") from None


def load(path: str | Path, cpu: bool = True) -> Classifier:
    """Load an exported learner (cached per path and file version) with its card.

    A fastai .pkl is a pickle: loading it runs code it contains, so load only files you trust.
    """
    from fastai.learner import load_learner

    path = Path(path)
    if not path.is_file():
        raise SkinCancerError(f"{path}: no such model file")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, cpu)
    if key not in _CACHE:
        card = read_card(path)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*load_learner.*insecure pickle.*")
                learn = load_learner(path, cpu=cpu)
        except Exception as e:  # a broken pickle can raise nearly anything
            raise SkinCancerError(f"{path}: not a loadable fastai learner ({type(e).__name__}: {e})") from None
        _CACHE[key] = Classifier(learn=learn, card=card, path=path)
    return _CACHE[key]
