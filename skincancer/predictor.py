"""What a loaded model answers, whatever runs it: the call at the operating threshold on the calibrated probability of
malignancy, for one photo, many, or several photos of one lesion. No torch here: see classifier.py and runtime.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .calibration import calibrate
from .card import ModelCard
from .check import CHECK_PASS, DermoscopyCheck
from .config import CPU_BATCH_PIXELS, MAX_BATCH
from .errors import SkinCancerError
from .images import ImageInput, describe, open_photo
from .labels import is_malignant_class, malignant_probability, task_of



@dataclass
class Predictor:
    """A model and its card; `predict` one image, `predict_batch` many, `predict_lesion` several of one lesion."""

    card: ModelCard
    path: Path
    check: DermoscopyCheck | None = None  # None: the export has no dermoscopy check (made before it existed)

    @property
    def classes(self) -> list[str]:
        """The class names, in the model's output order."""
        return self.card.classes

    @property
    def threshold(self) -> float:
        """Probability of malignancy at which the model calls 'malignant' (the card's)."""
        return self.card.threshold

    @property
    def target_sensitivity(self) -> float | None:
        """The validation sensitivity the threshold was chosen to reach (None where the card records no rule)."""
        return self.card.target_sensitivity

    @property
    def calibration(self) -> dict | None:
        """The map from the network's score to a calibrated probability of malignancy (None: the score as it is)."""
        return self.card.calibration

    @property
    def scores_title(self) -> str:
        """What a chart of the class probabilities shows: a calibrated dx model's diagnoses are raw scores."""
        return "diagnosis scores (not calibrated)" if self.calibration and len(self.classes) > 2 \
            else "class probabilities"

    @property
    def batch_size(self) -> int:
        """Images predicted together by default: on a CPU, about eight 224 px images' worth of pixels."""
        return max(1, min(MAX_BATCH, CPU_BATCH_PIXELS // self.card.size ** 2))

    can_explain = False  # whether `explain` can draw a Grad-CAM map

    def outputs(self, images: list, bs: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Class probabilities (n, classes) of opened images (`open_photo`'s), `bs` (or `batch_size`) at a time, and
        their dermoscopy check scores (None without a check), from one pass."""
        raise NotImplementedError

    def probabilities(self, images: list, bs: int | None = None) -> np.ndarray:
        """Class probabilities (n, classes) of opened images (`open_photo`'s), `bs` (or `batch_size`) at a time."""
        return self.outputs(images, bs)[0]

    def explain(self, image: ImageInput, target: str | int | None = None,
                check: bool = True) -> tuple[dict, np.ndarray, Any]:
        """`predict`'s result with a Grad-CAM heat map and overlay; only a fastai model has the gradients it needs."""
        raise self._no_gradients()

    def explain_lesion(self, images: Iterable[ImageInput], target: str | int | None = None,
                       check: bool = True) -> tuple[dict, list]:
        """`predict_lesion`'s result with each photo's Grad-CAM overlay; only a fastai model can draw them."""
        raise self._no_gradients()

    def _no_gradients(self) -> SkinCancerError:
        return SkinCancerError(f"{self.path.name}: Grad-CAM needs the network's gradients, which only the fastai "
                               "model (NAME.pkl with NAME.safetensors) gives; load that to see where it looked")

    def predict(self, image: ImageInput, check: bool = True) -> dict:
        """Call, label, probability of malignancy, threshold and every class probability for one image, and the
        dermoscopy check: a photo that fails it gets no call but a `reason` (with `check=False`, the call anyway)."""
        probs, scores = self.outputs([open_photo(image)], bs=1)
        return self._result(describe(image), probs[0], None if scores is None else scores[0], check)

    def predict_batch(self, images: Iterable[ImageInput], bs: int | None = None, chunk: int = 512,
                      check: bool = True) -> list[dict]:
        """Predict many images in batches (`batch_size` by default); an unreadable one yields {'image', 'error'}."""
        return [r for results in self.predict_chunks(images, bs, chunk, check) for r in results]

    def predict_chunks(self, images: Iterable[ImageInput], bs: int | None = None, chunk: int = 512,
                       check: bool = True) -> Iterator[list[dict]]:
        """`predict_batch`'s results, `chunk` images at a time in order, each list as soon as it is ready.

        Only one chunk of decoded images is held at a time; a caller can write results out and show progress.
        """
        images = list(images)
        for start in range(0, len(images), chunk):
            part = images[start:start + chunk]
            results: list[dict] = [{}] * len(part)
            good, where = [], []
            for i, image in enumerate(part):
                try:
                    good.append(open_photo(image))
                    where.append(i)
                except SkinCancerError as e:
                    results[i] = {"image": describe(image), "error": str(e)}
            if good:
                probs, scores = self.outputs(good, bs)
                for k, (i, p) in enumerate(zip(where, probs)):
                    results[i] = self._result(describe(part[i]), p, None if scores is None else scores[k], check)
            yield results

    def predict_lesion(self, images: Iterable[ImageInput], bs: int | None = None, check: bool = True) -> dict:
        """One call for several photos of one lesion, on the mean of their probabilities; each photo's result too.

        The mean is taken of the calibrated probability of malignancy (and, for a dx model, of each diagnosis's
        score), as `evaluate` counts lesion by lesion. An unreadable photo is an error naming it: a call on the
        others would silently be about fewer photos than asked. A photo that fails the dermoscopy check is named in
        the `reason` and the lesion gets no call (with `check=False`, the call anyway).
        """
        images, opened = self._open_lesion(images, "predict_lesion")
        probs, scores = self.outputs(opened, bs)
        return self._lesion([self._result(describe(image), p, None if scores is None else scores[k], False)
                             for k, (image, p) in enumerate(zip(images, probs))], check)

    @staticmethod
    def _open_lesion(images: Iterable[ImageInput], caller: str) -> tuple[list, list]:
        images = list(images)
        if not images:
            raise SkinCancerError(f"{caller}: no photos given")
        return images, [open_photo(image) for image in images]  # raises on the first unusable one, naming it

    def _checked(self, score: float | None) -> dict:
        """The dermoscopy check's fields of a result: passed or not (None: no check), its score and threshold."""
        if self.check is None or score is None:
            return {"dermoscopy": None, "check_score": None, "check_threshold": None}
        return {"dermoscopy": bool(self.check.passes(score)), "check_score": float(score),
                "check_threshold": self.check.threshold}

    def _refused(self, what: str, score: float) -> str:
        assert self.check is not None  # only a checked photo is refused
        return (f"{what} not look like a dermoscopy photo (check score {score:.2f}, above the "
                f"{self.check.threshold:.2f} that {CHECK_PASS:.0%} of validation photos stay within): no call is made; "
                "check=False (predict --no-check) gives one anyway")

    def _without_call(self, result: dict) -> dict:
        keep = ("image", "dermoscopy", "check_score", "check_threshold")
        return {**{k: result[k] for k in keep}, "reason": self._refused(f"{result['image']} does",
                                                                        result["check_score"])}

    def _result(self, name: str, probs: np.ndarray, score: float | None = None, check: bool = True) -> dict:
        checked = self._checked(score)
        classes = self.classes
        p_mal = float(calibrate(malignant_probability(probs, classes), self.calibration))
        if task_of(classes) == "binary":  # both classes are the calibrated question; a dx model's keep the scores
            probs = np.where(is_malignant_class(classes), p_mal, 1 - p_mal)
        result = {"image": name, **self._decision(p_mal, probs), **checked}
        return self._without_call(result) if check and checked["dermoscopy"] is False else result

    def _decision(self, p_mal: float, probs) -> dict:
        # the call at the operating threshold, for every task: a dx model's most likely diagnosis can be benign
        # while its malignant diagnoses together pass the threshold chosen for the target sensitivity
        classes = self.classes
        call = "malignant" if p_mal >= self.threshold else "benign"
        label = call if task_of(classes) == "binary" else classes[int(np.argmax(probs))]
        return {"label": label, "call": call, "malignant_probability": p_mal, "threshold": self.threshold,
                "target_sensitivity": self.target_sensitivity,
                "probabilities": {c: float(p) for c, p in zip(classes, probs)}}

    def _lesion(self, photos: list[dict], check: bool = True) -> dict:
        names = [r["image"] for r in photos]
        failed = [r for r in photos if r["dermoscopy"] is False]
        passed = None if self.check is None else not failed
        if check and failed:
            worst = max(failed, key=lambda r: r["check_score"])
            which = ", ".join(r["image"] for r in failed)
            return {"lesion": names, "dermoscopy": False, "reason": self._refused(
                f"{len(failed)} of the {len(photos)} photos ({which}) do", worst["check_score"]),
                "photos": [self._without_call(r) if r["dermoscopy"] is False else r for r in photos]}
        p_mal = float(np.mean([r["malignant_probability"] for r in photos]))
        scores = np.mean([list(r["probabilities"].values()) for r in photos], axis=0)
        return {"lesion": names, **self._decision(p_mal, scores), "dermoscopy": passed, "photos": photos}
