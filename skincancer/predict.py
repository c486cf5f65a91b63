"""Load an exported learner and predict lesion photos: one image, or many in batches."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Union

import numpy as np
import pandas as pd

from .calibration import calibrate, check_calibration
from .data import is_malignant_class, malignant_probability, task_of
from .files import model_files, sha256_file
from .errors import SkinCancerError

if TYPE_CHECKING:  # PIL is imported where images are opened, not by `import skincancer`
    import PIL.Image

ImageInput = Union[str, Path, bytes, "PIL.Image.Image"]
DISCLAIMER = "Research tool, not a medical device: never use it to diagnose or to decide on treatment."


def describe(src: Any) -> str:
    """A short name for an image input, for results and error messages."""
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


MAX_PIXELS = 64_000_000  # a dermoscopy photo is a few megapixels; far beyond this is a decompression bomb


def _to_8bit_rgb(img):
    """RGB from any PIL mode; 16-bit and float images are scaled, not clipped to white."""
    from PIL import Image

    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def open_image(src: ImageInput, max_pixels: int = MAX_PIXELS):
    """Decode a path, bytes or PIL image into an upright RGB fastai PILImage, or raise SkinCancerError."""
    from fastai.vision.core import PILImage
    from PIL import Image, ImageOps

    name = describe(src)
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        raise SkinCancerError(f"{name}: a folder, not an image file")
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise SkinCancerError(f"{name}: no such file")
    if not isinstance(src, (str, Path, bytes, bytearray, Image.Image)):
        raise SkinCancerError(f"{name}: expected a file path, bytes or a PIL image")
    if isinstance(src, (bytes, bytearray)) and not src:
        raise SkinCancerError(f"{name}: empty, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = src if isinstance(src, Image.Image) else Image.open(
                io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else src)
            width, height = img.size
            if width * height > max_pixels:  # checked on the header, before any pixel is decoded
                raise SkinCancerError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}")
            img.load()  # decode now, so a truncated file fails here and not inside a batch
            img = _to_8bit_rgb(ImageOps.exif_transpose(img))
    except SkinCancerError:
        raise
    except Exception as e:  # untrusted bytes: whatever the decoder raises means "not a readable image"
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

    @property
    def calibration(self) -> dict | None:
        """The map from the network's score to a calibrated probability of malignancy (None: the score as it is)."""
        return self.card.get("calibration")

    def _result(self, name: str, probs: np.ndarray) -> dict:
        classes = self.classes
        p_mal = float(calibrate(malignant_probability(probs, classes), self.calibration))
        if task_of(classes) == "binary":  # both classes are the calibrated question; a dx model's keep the scores
            probs = np.where(is_malignant_class(classes), p_mal, 1 - p_mal)
        return {"image": name, **self._decision(p_mal, probs)}

    def _decision(self, p_mal: float, probs) -> dict:
        # the call at the operating threshold, for every task: a dx model's most likely diagnosis can be benign
        # while its malignant diagnoses together pass the threshold chosen for the target sensitivity
        classes = self.classes
        call = "malignant" if p_mal >= self.threshold else "benign"
        label = call if task_of(classes) == "binary" else classes[int(np.argmax(probs))]
        return {"label": label, "call": call, "malignant_probability": p_mal,
                "probabilities": {c: float(p) for c, p in zip(classes, probs)}}

    @functools.cached_property
    def model(self):
        """The network made ready for prediction only (`inference_model`), copied from the learner at first use."""
        return inference_model(self.learn.model)

    @property
    def batch_size(self) -> int:
        """The default batch size: on a CPU, about eight 224 px images' worth of pixels; 64 on a GPU."""
        if next(self.learn.model.parameters()).device.type != "cpu":
            return 64
        # a CPU convolves a large batch slower per image than a small one (its activations leave the cache)
        return max(1, min(64, CPU_BATCH_PIXELS // int(self.card.get("size", 224)) ** 2))

    def get_preds(self, dl) -> tuple:
        """Class probabilities (and targets, where `dl` has labels) of every batch of `dl`, as `learn.get_preds`."""
        return batch_preds(self.learn, dl, self.model)

    def _probs(self, images: list, bs: int | None) -> np.ndarray:
        dl = self.learn.dls.test_dl(images, bs=bs or self.batch_size, num_workers=0)
        return self.get_preds(dl)[0].numpy()

    def predict(self, image: ImageInput) -> dict:
        """Label, probability of malignancy and every class probability for one image."""
        return self._result(describe(image), self._probs([open_image(image)], bs=1)[0])

    def explain(self, image: ImageInput, target: str | int | None = None) -> tuple[dict, np.ndarray, Any]:
        """`predict`'s result for one image, with its Grad-CAM heat map and overlay (`gradcam`), from one pass.

        The probabilities are `predict`'s (the same network, input and activation); the map is of `target`
        (default: malignant).
        """
        import torch

        from .gradcam import class_activation, heat_overlay

        img = open_image(image)
        x = self.learn.dls.test_dl([img], bs=1, num_workers=0).one_batch()[0]
        x = x.contiguous(memory_format=torch.channels_last)  # as batch_preds feeds the network
        cam, probs = class_activation(self.model, x, self.classes, target)
        heat, overlay = heat_overlay(img, cam, self.model[0], tuple(x.shape[-2:]))
        return self._result(describe(image), probs), heat, overlay

    def predict_batch(self, images: Iterable[ImageInput], bs: int | None = None, chunk: int = 512) -> list[dict]:
        """Predict many images in batches (`batch_size` by default); an unreadable one yields {'image', 'error'}."""
        return [r for results in self.predict_chunks(images, bs, chunk) for r in results]

    def predict_chunks(self, images: Iterable[ImageInput], bs: int | None = None,
                       chunk: int = 512) -> Iterator[list[dict]]:
        """`predict_batch`'s results, `chunk` images at a time in order, each list as soon as it is ready.

        Only one chunk of decoded images is held at a time; a caller can write results out and show progress.
        """
        images = list(images)
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            results: list[dict | None] = [None] * len(part)
            good, where = [], []
            for i, image in enumerate(part):
                try:
                    good.append(open_image(image))
                    where.append(i)
                except SkinCancerError as e:
                    results[i] = {"image": describe(image), "error": str(e)}
            if good:
                for i, p in zip(where, self._probs(good, bs)):
                    results[i] = self._result(describe(part[i]), p)
            yield results  # type: ignore[misc]

    def predict_lesion(self, images: Iterable[ImageInput], bs: int | None = None) -> dict:
        """One call for several photos of one lesion, on the mean of their probabilities; each photo's result too.

        The mean is taken of the calibrated probability of malignancy (and, for a dx model, of each diagnosis's
        score), as `evaluate` counts lesion by lesion. An unreadable photo is an error naming it: a call on the
        others would silently be about fewer photos than asked.
        """
        images, opened = self._open_lesion(images, "predict_lesion")
        probs = self._probs(opened, bs)
        return self._lesion([self._result(describe(image), p) for image, p in zip(images, probs)])

    def explain_lesion(self, images: Iterable[ImageInput], target: str | int | None = None) -> tuple[dict, list]:
        """`predict_lesion`'s result and each photo's Grad-CAM overlay, one pass a photo (`explain`)."""
        images, opened = self._open_lesion(images, "explain_lesion")
        explained = [self.explain(image, target) for image in opened]
        photos = [{**result, "image": describe(image)} for (result, _, _), image in zip(explained, images)]
        return self._lesion(photos), [overlay for _, _, overlay in explained]

    @staticmethod
    def _open_lesion(images: Iterable[ImageInput], caller: str) -> tuple[list, list]:
        images = list(images)
        if not images:
            raise SkinCancerError(f"{caller}: no photos given")
        return images, [open_image(image) for image in images]  # raises on the first unreadable one, naming it

    def _lesion(self, photos: list[dict]) -> dict:
        p_mal = float(np.mean([r["malignant_probability"] for r in photos]))
        scores = np.mean([list(r["probabilities"].values()) for r in photos], axis=0)
        return {"lesion": [r["image"] for r in photos], **self._decision(p_mal, scores), "photos": photos}


CPU_BATCH_PIXELS = 8 * 224 * 224


def inference_model(model):
    """A copy of `model` for prediction only: in eval mode, each BatchNorm folded into its convolution, channels_last.

    Folding removes a pass over every activation and channels_last is oneDNN's preferred layout on a CPU; the copy
    computes the same function (to float rounding), and the learner's own model stays as trained. A (body, head)
    network is folded part by part, so the copy keeps the two parts Grad-CAM needs (`Classifier.explain`).
    """
    import torch

    model = copy.deepcopy(model).eval()
    if isinstance(model, torch.nn.Sequential):
        model = torch.nn.Sequential(*(_folded(part) for part in model))
    else:
        model = _folded(model)
    return model.to(memory_format=torch.channels_last)


def _folded(module):
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module)
    except Exception:  # an architecture torch.fx cannot trace keeps its BatchNorms: slower, the same predictions
        return module


@contextlib.contextmanager
def lent_model(learn, model):
    """Run fastai's loops on `learn` (`tta`, `get_preds`) through `model` for a while, then give back its own."""
    own, learn.model = learn.model, model
    try:
        yield learn
    finally:
        learn.model = own


def batch_preds(learn, dl, model, show_progress: bool = False) -> tuple:
    """(probabilities, targets or None) of every batch of `dl` through `model`, with `learn`'s loss activation."""
    import torch
    from fastprogress.fastprogress import progress_bar

    activation = getattr(learn.loss_func, "activation", lambda x: x)
    probs: list = []
    targets: list = []
    with torch.inference_mode():
        for batch in progress_bar(dl, leave=False) if show_progress and len(dl) > 1 else dl:
            x = batch[0].contiguous(memory_format=torch.channels_last)
            probs.append(activation(model(x)).float().cpu())
            targets.extend(t.cpu() for t in batch[dl.n_inp:dl.n_inp + 1])
    return torch.cat(probs), (torch.cat(targets) if targets else None)


_CACHE: dict[tuple, Classifier] = {}


def read_card(model_path: str | Path) -> dict:
    """The model card (NAME.json) beside an exported model, or {} when there is none."""
    card_path = model_files(model_path)["card"]
    if not card_path.exists():
        return {}
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SkinCancerError(f"{card_path}: not a valid model card ({e})") from None
    if not isinstance(card, dict):
        raise SkinCancerError(f"{card_path}: not a valid model card (a JSON {type(card).__name__}, not an object)")
    check_calibration(card.get("calibration"), str(card_path))
    return card


def inference_learner(card: dict, weights: str | Path, cpu: bool = True):
    """A learner rebuilt from the card and safetensors weights: no pickle is read, so no code is run."""
    import tempfile

    import torch
    from fastai.torch_core import default_device

    from fastai.vision.learner import vision_learner
    from PIL import Image
    from safetensors.torch import load_file

    from .data import make_datablock
    from .losses import OperatingPointLoss
    from .train import resolve_arch

    missing = [k for k in ("task", "classes", "arch", "size", "presize") if k not in card]
    if missing:
        raise SkinCancerError(f"{weights}: the model card lacks {', '.join(missing)}; it cannot be rebuilt safely")
    if card.get("weights_sha256") and sha256_file(weights) != card["weights_sha256"]:
        raise SkinCancerError(f"{weights}: sha256 does not match the model card; the file was changed or torn")
    # only the validation transforms matter here, and they are the same resize for every `augment`
    dblock = make_datablock(card["task"], int(card["size"]), int(card["presize"]))
    with tempfile.TemporaryDirectory() as tmp:
        # fastai infers the pipeline's types from one item, as export does: a blank image, then emptied
        blank = Path(tmp) / "blank.png"
        Image.new("RGB", (8, 8)).save(blank)
        rows = pd.DataFrame({"path": [str(blank)] * 2, "label": [card["classes"][0]] * 2, "is_valid": [False, True]})
        device = "cpu" if cpu else default_device()  # as load_learner(cpu=...): data and model on one device
        dls = dblock.dataloaders(rows, bs=64, num_workers=0, device=device).new_empty()
    if [str(c) for c in dls.vocab] != list(card["classes"]):
        raise SkinCancerError(f"{weights}: classes {card['classes']} do not match task {card['task']!r}")
    loss_func = OperatingPointLoss()
    if "threshold" in card:  # the learner's own `predict` then calls as this package does
        loss_func.set_operating_point(card["classes"], float(card["threshold"]), card.get("calibration"))

    def build():
        return vision_learner(dls, resolve_arch(card["arch"]), pretrained=False, n_out=len(card["classes"]),
                              normalize=False, loss_func=loss_func)

    try:
        state = load_file(str(weights))
        with torch.device("meta"):  # shapes only: initialising weights the file replaces was most of the load time
            learn = build()
        learn.model.load_state_dict(state, assign=True)
        if any(t.is_meta for t in learn.model.buffers()):  # buffers made at init that no file holds: build for real
            learn = build()
            learn.model.load_state_dict(state)
        learn.model.to(dls.device)
    except Exception as e:  # wrong architecture, truncated file, not safetensors at all
        raise SkinCancerError(f"{weights}: weights do not fit {card['arch']} with {len(card['classes'])} "
                              f"classes ({type(e).__name__}: {e})") from None
    learn.model.eval()
    return learn


def unpickle_learner(path: Path, cpu: bool = True):
    """fastai's load_learner: runs the pickle's code, so only for trusted files."""
    from fastai.learner import load_learner

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*load_learner.*insecure pickle.*")
            return load_learner(path, cpu=cpu)
    except Exception as e:  # a broken pickle can raise nearly anything
        raise SkinCancerError(f"{path}: not a loadable fastai learner ({type(e).__name__}: {e})") from None


def load(path: str | Path, trusted: bool = False, cpu: bool = True) -> Classifier:
    """Load an exported model (cached per path and file version), safely by default.

    Without `trusted`, the safetensors weights beside NAME.pkl are used and no pickle is read; a .pkl with no
    weights beside it is unpickled only if its sha256 matches its model card. With `trusted=True` the .pkl is
    unpickled as fastai's load_learner does, which runs any code the file contains.
    """
    path = Path(path)
    if not path.is_file():
        raise SkinCancerError(f"{path}: no such model file")
    files = model_files(path)
    weights, pickled = files["weights"], files["model"]
    use_pickle = path.suffix == ".pkl" and (trusted or not weights.is_file())
    source = pickled if use_pickle else weights
    if not source.is_file():
        raise SkinCancerError(f"{source}: no such file beside {path.name}")
    stat = source.stat()
    key = (str(source.resolve()), stat.st_mtime_ns, stat.st_size, cpu, use_pickle)
    if key not in _CACHE:
        card = read_card(path)
        if use_pickle:
            if not trusted and card.get("sha256") != sha256_file(pickled):
                raise SkinCancerError(
                    f"{pickled}: refusing to unpickle, which would run any code in the file: there are no safetensors "
                    f"weights beside it and its sha256 does not match {files['card'].name}. "
                    "Pass trusted=True (--trust-pickle) only for a file you trust.")
            learn = unpickle_learner(pickled, cpu=cpu)
        else:
            learn = inference_learner(card, weights, cpu=cpu)
        _CACHE[key] = Classifier(learn=learn, card=card, path=path)
    return _CACHE[key]
