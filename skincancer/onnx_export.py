"""The same model as ONNX, fp32 or int8, for serving without torch: the graph with fastai's validation transforms in
front of it, checked against the fastai model, and the int8 copy checked against fp32 on the validation photos."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from sklearn.metrics import roc_auc_score

from .card import ModelCard
from .check import CHECK_PASS
from .classifier import Classifier
from .data import read_metadata, read_split
from .datablock import Stats
from .errors import SkinCancerError
from .files import atomic_path, model_files, write_json_atomic
from .images import open_image
from .labels import label_of
from .rebuild import card_stats
from .activations import Taps
from .predict import load
from .predictor import Predictor
from .runtime import FEATURES, INPUT, OUTPUT, load_onnx, presized


class OnnxGraph(torch.nn.Module):
    """What an .onnx export computes: photos squished to the presize (uint8 NHWC), scaled to 0-1, resized to the
    model's size as fastai's validation transforms do (bilinear, corners aligned), normalised, classified: softmax;
    with `taps` (a dermoscopy check's), also the statistics the check scores."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, model: torch.nn.Module, size: int, stats: Stats, taps: list[str] | None = None):
        super().__init__()
        self.model, self.size = model, size
        self.register_buffer("mean", torch.tensor(stats[0], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(stats[1], dtype=torch.float32).view(1, 3, 1, 1))
        self.taps = Taps(model, taps).__enter__() if taps else None  # hooked for the graph's life

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """The network's input: what fastai's validation transforms make of the presized photos."""
        x = image.permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=True)
        return (x - self.mean) / self.std

    def forward(self, image: torch.Tensor):
        probs = torch.softmax(self.model(self.prepare(image)).float(), dim=1)
        if self.taps is None:
            return probs
        return probs, self.taps.statistics()


def preprocess_record(card: ModelCard) -> dict:
    """How an .onnx export wants its photos prepared, for the model card: what `runtime.presized` and the graph do."""
    mean, std = card_stats(card)
    return {"input": f"uint8, (batch, {card.presize}, {card.presize}, 3), RGB",
            "resize": f"squished to {card.presize} x {card.presize} with Pillow's bilinear filter",
            "in_the_graph": f"scaled to 0-1, resized to {card.size} x {card.size} (bilinear, corners aligned), "
                            "normalised", "mean": list(mean), "std": list(std)}


class TrainingPhotos(CalibrationDataReader):
    """Batches of presized training photos, for the activations' ranges in int8 quantization."""

    def __init__(self, photos: list[str], presize: int, bs: int = 16):
        self.photos, self.presize, self.bs = photos, presize, bs
        self.batches = iter(range(0, len(photos), bs))

    def get_next(self):
        start = next(self.batches, None)
        return None if start is None else {
            INPUT: presized([open_image(p) for p in self.photos[start:start + self.bs]], self.presize)}


def export_onnx(model_path: str | Path, int8: bool = False, data: str | Path | None = None,
                calibration_images: int = 256) -> dict[str, Path]:
    """Write NAME.onnx (and with `int8`, NAME.int8.onnx) beside an export, recording them in its card.

    The graph is checked against the fastai model on random photos. `int8` quantizes Conv and MatMul weights per
    channel and their activations (QDQ), calibrated on photos of the model's own training split in the HAM10000 folder
    `data`, then measures fp32 against int8 on the validation split (`int8_check`): the card records both AUROCs,
    the calls flipped at the threshold, each copy's sensitivity and whether int8 `holds`.
    """
    if int8 and data is None:
        raise SkinCancerError("int8 needs data (--data): the HAM10000 folder the model was trained on, whose training "
                              "photos calibrate the quantization and whose validation photos check it")
    clf = load(model_path)
    if not isinstance(clf, Classifier):
        raise SkinCancerError(f"{model_path}: export reads the fastai model (NAME.pkl), not an ONNX one")
    card, files = copy.deepcopy(clf.card), model_files(model_path)
    taps = clf.check.taps if clf.check else None  # the graph then also gives what the dermoscopy check scores
    graph = OnnxGraph(copy.deepcopy(clf.learn.model).float().cpu().eval(), card.size, card_stats(card), taps).eval()
    names = [OUTPUT, FEATURES] if taps else [OUTPUT]
    presize = card.presize
    example = torch.randint(0, 256, (4, presize, presize, 3), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's notes on its own progress
        program = torch.onnx.export(graph, (example,), input_names=[INPUT], output_names=names, dynamo=True,
                                    dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    assert program is not None  # the dynamo exporter returns the program it saves
    with atomic_path(files["onnx"]) as tmp:
        program.save(str(tmp))
        fp32 = tmp.read_bytes()
    written = {"onnx": files["onnx"]}
    with torch.inference_mode():
        expected = graph(example)
    expected = [t.numpy() for t in (expected if taps else [expected])]
    served = load_onnx(files["onnx"], card, fp32, clf.check)
    got = served.session.run(names, {INPUT: example.numpy()})
    gap = float(np.abs(got[0] - expected[0]).max())
    # the check's scores, relative: photos of noise score far out, where float rounding moves them most
    score_gap = float(np.max(np.abs(clf.check.scores(got[1]) / clf.check.scores(expected[1]) - 1))) if clf.check \
        else 0.0
    if not (gap < 1e-4 and score_gap < 1e-3):
        files["onnx"].unlink()
        raise SkinCancerError(f"{files['onnx']}: its probabilities differ from the fastai model's by {gap:.1e} and "
                              f"its dermoscopy check scores by {score_gap:.1%}; the export was removed")
    card.preprocess = preprocess_record(card)
    card.onnx["onnx"] = {"file": files["onnx"].name, "sha256": hashlib.sha256(fp32).hexdigest(),
                         "largest_difference_from_fastai": gap, "dermoscopy_check": bool(taps)}
    if int8:
        assert data is not None  # checked above
        df = read_metadata(data).assign(split=lambda d: read_split(files["split"], d)).dropna(subset=["split"])
        train_photos = df.loc[df["split"] == "train", "path"].sample(
            min(calibration_images, int((df["split"] == "train").sum())), random_state=0).tolist()

        with tempfile.TemporaryDirectory() as tmp_dir:
            prepared = Path(tmp_dir) / "prepared.onnx"
            quant_pre_process(str(files["onnx"]), str(prepared), skip_symbolic_shape=True)
            with atomic_path(files["int8"]) as tmp:
                quantize_static(str(prepared), str(tmp), TrainingPhotos(train_photos, presize),
                                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                                weight_type=QuantType.QInt8,
                                # and the ReLU/ReLU6 after a Conv: its output range is then measured after the clip
                                op_types_to_quantize=["Conv", "MatMul", "Gemm", "Clip", "Relu"])
                quantized = tmp.read_bytes()
        written["int8"] = files["int8"]
        valid = df[df["split"] == "valid"]
        check = int8_check(served, load_onnx(files["int8"], card, quantized, clf.check), valid)
        card.onnx["int8"] = {"file": files["int8"].name, "sha256": hashlib.sha256(quantized).hexdigest(),
                                "calibrated_on": f"{len(train_photos)} photos of the training split", **check}
    write_json_atomic(files["card"], card.to_dict())
    return written


# how far int8 may stray from fp32 on the validation photos before the export says to serve fp32 instead
INT8_MAX_AUROC_DROP = 0.005
INT8_MAX_CALLS_FLIPPED = 0.01  # share of validation photos whose call at the threshold changes


def int8_check_threshold(results: dict[str, list[dict]]) -> dict:
    """int8's own dermoscopy check threshold: its activations drift from fp32's, which the statistics were fitted on,
    so the threshold letting CHECK_PASS of the validation photos through is set again on int8's scores."""
    scores = {name: np.array([r["check_score"] for r in rs]) for name, rs in results.items()}
    threshold = float(np.quantile(scores["int8"], CHECK_PASS))
    fp32_threshold = results["onnx"][0]["check_threshold"]
    return {"check_threshold": threshold, "valid_check_pass_fp32": float(np.mean(scores["onnx"] <= fp32_threshold)),
            "valid_check_pass_int8_at_fp32_threshold": float(np.mean(scores["int8"] <= fp32_threshold)),
            "valid_check_pass_int8": float(np.mean(scores["int8"] <= threshold))}


def int8_check(fp32: Predictor, int8: Predictor, valid: pd.DataFrame) -> dict:
    """fp32 against int8 on the validation photos: AUROC, the calls at the threshold (sensitivity, calls flipped)
    and how far the probability of malignancy moved; `holds` when within INT8_MAX_AUROC_DROP and
    INT8_MAX_CALLS_FLIPPED; int8's own dermoscopy check threshold (`int8_check_threshold`)."""
    truth = np.asarray([label_of(dx, "binary") == "malignant" for dx in valid["dx"]])
    photos = [open_image(p) for p in valid["path"]]
    results = {name: clf.predict_batch(photos, check=False) for name, clf in (("onnx", fp32), ("int8", int8))}
    p_mal = {name: np.array([r["malignant_probability"] for r in rs]) for name, rs in results.items()}
    said = {name: np.array([r["call"] == "malignant" for r in rs]) for name, rs in results.items()}
    change = np.abs(p_mal["int8"] - p_mal["onnx"])
    if not 0 < truth.sum() < len(truth):
        raise SkinCancerError("the validation split holds one class only: int8 cannot be checked against fp32")
    fp32_auroc, int8_auroc = (float(roc_auc_score(truth, p_mal[name])) for name in ("onnx", "int8"))
    flipped = float((said["onnx"] != said["int8"]).mean())
    drop = fp32_auroc - int8_auroc
    return {"valid_images": len(valid), "valid_auroc_fp32": fp32_auroc, "valid_auroc_int8": int8_auroc,
            "valid_auroc_drop": drop, "largest_probability_change": float(change.max()),
            "mean_probability_change": float(change.mean()), "calls_flipped": flipped,
            "valid_sensitivity_fp32": float(said["onnx"][truth].mean()),
            "valid_sensitivity_int8": float(said["int8"][truth].mean()),
            **(int8_check_threshold(results) if fp32.check and int8.check else {}),
            "tolerance": {"auroc_drop": INT8_MAX_AUROC_DROP, "calls_flipped": INT8_MAX_CALLS_FLIPPED},
            "holds": bool(drop <= INT8_MAX_AUROC_DROP and flipped <= INT8_MAX_CALLS_FLIPPED)}
