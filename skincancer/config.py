"""Every training option, defined once: TrainConfig's fields with their help, and the recipes that fill them.

The command line's `train` flags, the settings a resumed run must share and the benchmarks' settings are all
derived from these fields; a field whose default is None takes its value from the run's recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SkinCancerError
from .labels import TASKS, check_task

IMBALANCE: tuple[str, ...] = ("loss", "sampler", "none")
SEED = 42  # the split's and training's
VALID_PCT = TEST_PCT = 0.15  # shares of lesions in the validation and test splits
TARGET_SENSITIVITY = 0.90  # of malignant, on valid: where the operating threshold is put
N_BOOT = 1000  # bootstrap replicates behind every interval a user reads
# the operating threshold keeps the target on this share of resampled validation sets: a margin for new photos
THRESHOLD_CONFIDENCE = 0.95
# predicting: a CPU convolves a large batch slower per image (its activations leave the cache), so by pixels
CPU_BATCH_PIXELS = 8 * 224 * 224
MAX_BATCH = 64
# the web app: this machine only unless told otherwise; a dermoscopy JPEG is a few MB
APP_HOST, APP_PORT, MAX_UPLOAD_MB = "127.0.0.1", 7860, 10.0
# Each recipe fills the fields it names wherever a run leaves them unset; docs/training.md has their measurements.
RECIPES: dict[str, dict[str, Any]] = {
    "resnet50": dict(arch="resnet50", pretrained=True, epochs=10, size=224, bs=64, lr=2e-3, lr_mult=100,
                     freeze_epochs=1),
    "scratch": dict(arch="resnet50", pretrained=False, epochs=60, size=128, bs=256, lr=3e-3, lr_mult=1,
                    freeze_epochs=0),
    "cpu": dict(arch="tf_efficientnet_lite0", pretrained=True, epochs=10, size=160, bs=64, lr=4e-3, lr_mult=1,
                freeze_epochs=0),
}
RECIPE_USE = {"resnet50": "fine-tune ImageNet ResNet50 at 224 px: a GPU",
              "scratch": "ResNet50 from random weights at 128 px: a GPU, no pretrained weights",
              "cpu": "fine-tune ImageNet EfficientNet-Lite0: a laptop's or workstation's CPU"}


def default_presize(size: int) -> int:
    """Item-transform size for presizing: room for rotation and zoom before the final crop."""
    return int(round(size * 1.5))


def read_class_map(path: str) -> dict[str, str]:
    """A JSON file mapping class folder names to diagnoses, as a dict."""
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SkinCancerError(f"{path}: not a readable JSON class map ({e})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise SkinCancerError(f"{path}: expected a JSON object of class folder name -> diagnosis")
    return mapping


def option(default: Any = None, help: str = "", **meta: Any) -> Any:
    """A TrainConfig field with its help text; `identity=False` for settings that change how, not what, it trains."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in the model card."""

    data: str = field(metadata={"help": "HAM10000 folder (metadata CSV and images anywhere below it)"})
    recipe: str | None = option(None, "settings for the hardware: "
                                + "; ".join(f"{k}: {v}" for k, v in RECIPE_USE.items())
                                + " (default: resnet50, or scratch with --no-pretrained)", choices=tuple(RECIPES))
    task: str = option("binary", "benign/malignant, or the 7 diagnoses", choices=TASKS)
    arch: str | None = option(None, "torchvision or timm architecture name")
    pretrained: bool | None = option(None, "start from random weights instead of ImageNet", flag="--no-pretrained")
    weights: str | None = option(None, "start from this local checkpoint instead of a download (a torchvision or timm "
                                       "state dict for --arch, or EfficientNet-PyTorch's EfficientNet-Lite0)")
    epochs: int | None = option(None, "epochs of the unfrozen phase (from scratch: of the one phase)")
    size: int | None = option(None, "final image size in pixels")
    presize: int | None = option(None, "item resize before batch augmentation (default: 1.5 x size)")
    bs: int | None = option(None, "batch size")
    lr: float | None = option(None, "peak one-cycle learning rate (fine-tuning: the frozen phase's, and twice the "
                                    "unfrozen phase's, as fastai's fine_tune)")
    lr_mult: float | None = option(None, "fine-tuning: the earliest layers learn at lr / lr_mult (fastai's fine_tune)")
    freeze_epochs: int | None = option(None, "fine-tuning: epochs training the head alone first")
    wd: float | None = option(None, "AdamW weight decay (default: fastai's, 0.01)")
    imbalance: str = option("loss", "class-weighted loss, balanced sampling, or none", choices=IMBALANCE)
    target_sensitivity: float = option(TARGET_SENSITIVITY, "the operating threshold is chosen on the validation "
                                                           "split to reach this sensitivity", identity=False)
    threshold_confidence: float = option(THRESHOLD_CONFIDENCE, "the threshold is chosen so that valid's sensitivity "
                                         "reaches the target on this share of its resampled lesions, a one-sided "
                                         "lower confidence bound (0: on valid exactly)", identity=False)
    seed: int = option(SEED, "seed for the split, sampling and training")
    valid_pct: float = option(VALID_PCT, "share of lesions in the validation split")
    test_pct: float = option(TEST_PCT, "share of lesions in the test split")
    limit: int | None = option(None, "train on a label-stratified sample of about this many images")
    test_source: str | None = option(None, "test on every lesion photographed at this source (the metadata's "
                                           "'dataset' column, e.g. rosendahl), train and validate on the others: "
                                           "how the model does at a clinic it never saw")
    split_from: str | None = option(None, "a model's NAME.split.csv: train, validate and test on the images and "
                                          "split recorded there (to compare models on the same test images)")
    drop_missing: bool = option(False, "drop (with a warning) images the metadata lists but the disk lacks")
    class_map: dict[str, str] | None = option(None, "JSON file mapping class folder names to diagnoses "
                                                    "(folder-per-class sets)", parse=read_class_map, metavar="FILE")
    num_workers: int | None = option(None, "DataLoader worker processes with --no-cache (default: fastai's)",
                                     flag="--workers", identity=False)
    cache: bool = option(True, "decode files every epoch instead of training from the presized image cache",
                         flag="--no-cache", identity=False)
    cache_dir: str | None = option(None, "where presized caches live (default: $SKINCANCER_CACHE or "
                                         "~/.cache/skincancer)", identity=False)
    compile: bool = option(False, "torch.compile the training step (pays at 224 px on a GPU after ~30 epochs)",
                           identity=False)
    checkpoint_every: float = option(60.0, "seconds between resumable checkpoints (0: after every epoch)",
                                     identity=False)
    out: str = option("models/skincancer.pkl", "where to export the learner (.pkl)", identity=False)
    overwrite: bool = option(False, "replace a model already exported at --out (refused otherwise, before training)",
                             identity=False)

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's values wherever a field is None, and every input checked."""
        check_task(self.task)
        name = self.recipe or ("scratch" if self.pretrained is False else "resnet50")
        if name not in RECIPES:
            raise SkinCancerError(f"recipe: {name!r} is not one of {', '.join(RECIPES)}")
        if self.imbalance not in IMBALANCE:
            raise SkinCancerError(f"imbalance: {self.imbalance!r} is not one of {', '.join(IMBALANCE)}")
        if self.weights is not None and self.pretrained is False:
            raise SkinCancerError("weights and pretrained=False (--weights, --no-pretrained): a checkpoint to start "
                                  "from is pretrained weights; leave one out")
        values = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in RECIPES[name].items()}
        if self.weights is not None:
            values["pretrained"] = True
        for key in ("epochs", "size", "bs", "lr", "lr_mult", "presize", "limit"):
            value = values.get(key, getattr(self, key))
            if value is not None and not value > 0:
                raise SkinCancerError(f"{key}: {value} must be positive")
        if values["freeze_epochs"] < 0:
            raise SkinCancerError(f"freeze_epochs: {values['freeze_epochs']} must be 0 or more")
        if not 0 < self.target_sensitivity <= 1:
            raise SkinCancerError(f"target_sensitivity: {self.target_sensitivity} must be in (0, 1]")
        if not 0 <= self.threshold_confidence < 1:
            raise SkinCancerError(f"threshold_confidence: {self.threshold_confidence} must be in [0, 1)")
        if self.wd is not None and self.wd < 0:
            raise SkinCancerError(f"wd: {self.wd} must be 0 or more")
        if not str(self.out).endswith(".pkl"):
            raise SkinCancerError(f"out: {self.out} must end in .pkl")
        return dataclasses.replace(self, recipe=name, presize=self.presize or default_presize(values["size"]),
                                   **values)

    def identity(self) -> dict[str, Any]:
        """The settings that decide what is trained: a resumed run must share them with the interrupted one."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("identity", True)}


def _value_type(annotation) -> type:
    """The type an annotation such as `int | None` holds."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One command-line flag per TrainConfig field, its help, choices and default taken from the field."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        meta, kind = f.metadata, _value_type(hints[f.name])
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        helptext = meta["help"].replace("%", "%%")
        if f.default is not dataclasses.MISSING and f.default is not None and kind is not bool:
            helptext += f" (default: {f.default})"
        elif f.default is None and kind is not bool and any(f.name in r for r in RECIPES.values()) \
                and "default" not in helptext:
            helptext += " (default: the recipe's)"
        # every default stays None here: TrainConfig's own default applies to what is not given
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_const", const=not flag.startswith("--no-"),
                                help=helptext)
        elif "parse" in meta:
            parser.add_argument(flag, dest=f.name, type=meta["parse"], metavar=meta.get("metavar"), help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, choices=meta.get("choices"),
                                required=f.default is dataclasses.MISSING, help=helptext)


def config_from_arguments(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed `add_config_arguments` flags: the fields given, TrainConfig's defaults elsewhere."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names and v is not None})
