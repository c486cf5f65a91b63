"""Learner, training and export: ResNet50 on HAM10000, fine-tuned from ImageNet or trained from scratch."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import pickle
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import __version__
from .callbacks import best_epoch_tracker, compile_model, loss_on_device, stop_on_nan, weight_average
from .data import (SPLITS, check_augment, class_weights, classes_for, check_no_lesion_leak, check_task, default_presize,
                   make_dataloaders, prepare, split_table)
from .distributed import (alone, distributed_fit, from_main_process, is_main_process, local_main_process_first,
                          process_state, quiet_unless_main, world_size)
from .errors import SkinCancerError
from .evaluate import lesion_table, metrics_table
from .files import atomic_path, model_files, sha256_file, write_json_atomic
from .predict import DISCLAIMER

IMBALANCE = ("loss", "sampler", "none")
# Defaults by `pretrained`. Fine-tuning keeps fastai's: a few epochs at bs 64. From scratch needs many more
# passes, larger batches and stronger regularisation: the recipe measured on one GPU (README, "Speed").
RECIPES: dict[bool, dict[str, Any]] = {
    True: dict(epochs=10, size=224, bs=64, lr=2e-3, label_smoothing=0.0, mixup=0.0, ema=0.0),
    False: dict(epochs=60, size=128, bs=256, lr=3e-3, label_smoothing=0.0, mixup=0.0, ema=0.0),
}


# --- architecture and weights -------------------------------------------------------------------

def resolve_arch(arch: str | Callable) -> str | Callable:
    """A torchvision model function for a torchvision name (e.g. 'resnet50'), else the name itself for timm."""
    if callable(arch):
        return arch
    import torchvision.models as tvm

    fn = getattr(tvm, arch, None)
    if callable(fn) and not isinstance(fn, type):
        return fn
    try:
        import timm  # noqa: F401
    except ImportError:
        raise SkinCancerError(f"arch: {arch!r} is not a torchvision model, and timm (for other names) "
                              "is not installed (pip install timm)") from None
    return arch


def imagenet_weights(arch: str | Callable):
    """The torchvision weights enum fastai loads for `arch` when pretrained (None for timm names)."""
    import torchvision.models as tvm
    from fastai.vision.learner import model_meta

    fn = resolve_arch(arch)
    return tvm.get_model_weights(fn)[model_meta.get(fn, {}).get("weights", "DEFAULT")] if callable(fn) else None


def pretrained_weights_file(arch: str | Callable) -> Path | None:
    """Where torch caches the ImageNet weights fastai uses for a torchvision `arch` (None for timm names)."""
    import torch

    weights = imagenet_weights(arch)
    if weights is None:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / weights.url.rsplit("/", 1)[-1]


# what loading a checkpoint raises when it is missing, cannot be downloaded, or is not a checkpoint
WEIGHT_ERRORS = (OSError, RuntimeError, EOFError, ValueError, ImportError, pickle.UnpicklingError)


def ensure_pretrained_weights(arch: str | Callable) -> None:
    """Find the ImageNet weights in torch's cache, or download them, before any long work: a missing file fails now.

    A cached file is not read here (the learner reads it, and reports a corrupt one). Names torchvision does not
    know (timm) are checked when the learner is built.
    """
    weights, file = imagenet_weights(arch), pretrained_weights_file(arch)
    if weights is None or file is None or file.exists():
        return
    try:
        weights.get_state_dict(progress=True)
    except WEIGHT_ERRORS as e:
        raise _pretrained_error(arch, e) from e


def _pretrained_error(arch, cause: BaseException) -> SkinCancerError:
    path = pretrained_weights_file(arch)
    name = arch if isinstance(arch, str) else getattr(arch, "__name__", str(arch))
    if path is None:
        return SkinCancerError(f"could not load the pretrained weights of {name!r} ({type(cause).__name__}: "
                               f"{cause}); train with --no-pretrained (pretrained=False) to start from random weights")
    if path.exists():
        return SkinCancerError(f"the ImageNet weights at {path} could not be read ({type(cause).__name__}: {cause}); "
                               "delete the file so it is downloaded again, or train with --no-pretrained")
    return SkinCancerError(
        f"the ImageNet weights of {name} are not in the cache and could not be downloaded "
        f"({type(cause).__name__}: {cause}). Put the file at {path} (set TORCH_HOME to use another cache), "
        "or train from random weights with --no-pretrained (pretrained=False).")


# --- metrics and learner ------------------------------------------------------------------------

def auroc_or_nan(targets, scores, **kwargs) -> float:
    """sklearn's roc_auc_score, or NaN while the targets lack a class (undefined: a small validation split)."""
    import sklearn.metrics as skm

    n_classes = 2 if np.ndim(scores) == 1 else np.shape(scores)[1]
    if len(np.unique(targets)) < n_classes:
        return float("nan")
    return float(skm.roc_auc_score(targets, scores, **kwargs))


def metrics_for(task: str) -> list:
    """fastai metrics for a task: accuracy, balanced accuracy, AUROC; sensitivity/specificity for `binary`."""
    import sklearn.metrics as skm
    from fastai.metrics import ActivationType, accuracy, skm_to_fastai

    ms = [accuracy, skm_to_fastai(skm.balanced_accuracy_score, name="balanced_accuracy")]
    if check_task(task) == "binary":
        # classes are (benign, malignant): index 1 is the positive class
        ms += [skm_to_fastai(auroc_or_nan, activation=ActivationType.BinarySoftmax, name="auroc"),
               skm_to_fastai(skm.recall_score, pos_label=1, name="sensitivity"),
               skm_to_fastai(skm.recall_score, pos_label=0, name="specificity")]
    else:
        ms += [skm_to_fastai(auroc_or_nan, activation=ActivationType.Softmax, flatten=False,
                             multi_class="ovr", average="macro", name="macro_auroc")]
    return ms


def monitor_for(task: str) -> str:
    """The validation metric that picks the best epoch: AUROC for `binary`, balanced accuracy for `dx`."""
    return "auroc" if check_task(task) == "binary" else "balanced_accuracy"


def make_loss(task: str, train_labels=None, imbalance: str = "loss", label_smoothing: float = 0.0):
    """Cross-entropy, class-weighted by inverse frequency of `train_labels` when `imbalance == 'loss'`."""
    import torch

    from .losses import OperatingPointLoss

    if imbalance not in IMBALANCE:
        raise SkinCancerError(f"imbalance: {imbalance!r} is not one of {', '.join(IMBALANCE)}")
    weight = None
    if imbalance == "loss":
        if train_labels is None:
            raise SkinCancerError("imbalance='loss' needs the training labels to weigh the classes")
        weight = torch.tensor(class_weights(train_labels, classes_for(task)), dtype=torch.float32)
    return OperatingPointLoss(weight=weight, label_smoothing=label_smoothing)


def fused_adamw():
    """fastai's AdamW (same betas, eps and true weight decay) as PyTorch's fused kernel, for `opt_func`.

    fastai's own Optimizer steps each of ResNet50's 161 parameter tensors in Python. On one H100 at 224 px the
    fused kernel measured within noise of it (README, "Speed"); the speed figures there were taken with it.
    """
    import torch
    from fastai.optimizer import OptimWrapper

    return functools.partial(OptimWrapper, opt=torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, fused=True)


def make_learner(dls, task: str = "binary", arch: str | Callable = "resnet50", pretrained: bool = True,
                 loss_func=None, path: str | Path | None = None, **kwargs):
    """A fastai `vision_learner` with the task's metrics; pretrained weights missing raise SkinCancerError.

    On a GPU it trains in bf16 (fp16 where bf16 is missing) with channels_last and fused AdamW.
    """
    import torch
    from fastai.callback.channelslast import ChannelsLast
    from fastai.vision.all import vision_learner

    fn = resolve_arch(arch)
    if torch.cuda.is_available():
        kwargs.setdefault("opt_func", fused_adamw())
    try:
        learn = vision_learner(dls, fn, pretrained=pretrained, metrics=metrics_for(task), loss_func=loss_func,
                               **kwargs)
    except WEIGHT_ERRORS as e:
        if not pretrained:
            raise
        raise _pretrained_error(arch, e) from e
    if path is not None:
        learn.path = Path(path)
    if torch.cuda.is_available():
        learn = learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
        learn.add_cb(ChannelsLast())
    return learn


# --- the whole run ------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    """Everything that defines a training run; saved in the model card."""

    data: str
    task: str = "binary"
    arch: str = "resnet50"
    pretrained: bool = True
    epochs: int | None = None          # None (here and below): RECIPES[pretrained]
    size: int | None = None
    presize: int | None = None         # None: default_presize(size)
    bs: int | None = None
    lr: float | None = None
    wd: float | None = None            # AdamW's decoupled weight decay; None: fastai's default (0.01)
    freeze_epochs: int = 1
    imbalance: str = "loss"
    target_sensitivity: float = 0.90   # the operating threshold is chosen on valid to reach it
    label_smoothing: float | None = None
    mixup: float | None = None         # MixUp alpha; 0 turns it off
    ema: float | None = None           # decay of an average of the weights that validates and is exported; 0: off
    augment: str = "two-pass"          # skincancer.data.AUGMENTS: how the batch augmentation resamples
    seed: int = 42
    valid_pct: float = 0.15
    test_pct: float = 0.15
    limit: int | None = None
    split_from: str | None = None      # a model's NAME.split.csv: reuse its split (and images) instead of drawing one
    drop_missing: bool = False
    class_map: dict[str, str] | None = None  # folder-per-class sets: class folder name -> diagnosis
    num_workers: int | None = None
    cache: bool = True                 # train from a presized array cache (skincancer.presize), not from files
    cache_dir: str | None = None       # None: skincancer.presize.default_cache_dir()
    compile: bool = False
    loss_on_device: bool = False       # keep the smoothed loss on the GPU (loss_on_device); off until measured there
    reproducible: bool = True          # cuDNN's deterministic algorithms (seed_everything); off: autotuned
    checkpoint_every: float = 60.0     # seconds between resumable checkpoints (0: every epoch)
    out: str = "models/skincancer.pkl"

    def resolved(self) -> "TrainConfig":
        """A copy with every None default filled in and the inputs checked."""
        check_task(self.task)
        if self.imbalance not in IMBALANCE:
            raise SkinCancerError(f"imbalance: {self.imbalance!r} is not one of {', '.join(IMBALANCE)}")
        check_augment(self.augment)
        recipe = {k: v if getattr(self, k) is None else getattr(self, k) for k, v in RECIPES[self.pretrained].items()}
        for name in ("epochs", "size", "bs", "lr"):
            if recipe[name] <= 0:
                raise SkinCancerError(f"{name}: {recipe[name]} must be positive")
        if not 0 <= recipe["label_smoothing"] < 1:
            raise SkinCancerError(f"label_smoothing: {recipe['label_smoothing']} must be in [0, 1)")
        if recipe["mixup"] < 0:
            raise SkinCancerError(f"mixup: {recipe['mixup']} must be 0 (off) or a positive Beta alpha")
        if not 0 <= recipe["ema"] < 1:
            raise SkinCancerError(f"ema: {recipe['ema']} must be 0 (off) or a decay in (0, 1), such as 0.99")
        if not 0 < self.target_sensitivity <= 1:
            raise SkinCancerError(f"target_sensitivity: {self.target_sensitivity} must be in (0, 1]")
        if self.wd is not None and self.wd < 0:
            raise SkinCancerError(f"wd: {self.wd} must be 0 or more")
        if not str(self.out).endswith(".pkl"):
            raise SkinCancerError(f"out: {self.out} must end in .pkl")
        return dataclasses.replace(self, **recipe, presize=self.presize or default_presize(recipe["size"]))


@dataclass
class TrainResult:
    """What a run produced: the learner, the split metadata, metrics and the files written."""

    learn: Any
    df: pd.DataFrame
    card: dict
    files: dict[str, Path] = field(default_factory=dict)


# the settings a resumed run must share with the interrupted one
RESUME_KEYS = ("data", "task", "arch", "pretrained", "epochs", "size", "presize", "bs", "lr", "wd",
               "freeze_epochs", "imbalance", "label_smoothing", "mixup", "ema", "augment", "seed", "valid_pct",
               "test_pct", "limit", "split_from", "drop_missing", "class_map")


def checkpoint_dir(out: str | Path) -> Path:
    """Where a run keeps its per-epoch checkpoints until it exports: models/NAME.checkpoints/."""
    return Path(out).with_suffix(".checkpoints")


def phases(config: TrainConfig) -> list[dict]:
    """The one-cycle fits of a run: fastai's fine_tune schedule (frozen, then unfrozen) or one fit from scratch."""
    assert config.lr is not None, "phases: the config must be resolved (TrainConfig.resolved)"
    if not config.pretrained:
        return [dict(epochs=config.epochs, lr=config.lr, frozen=False, kwargs={})]
    base = config.lr / 2  # as Learner.fine_tune: halve the rate after the frozen epochs, discriminative rates after
    return [dict(epochs=config.freeze_epochs, lr=slice(config.lr), frozen=True, kwargs=dict(pct_start=0.99)),
            dict(epochs=config.epochs, lr=slice(base / 100, base), frozen=False, kwargs=dict(pct_start=0.3, div=5.0))]


def checkpoint_callback(folder: Path, phase: int, config: TrainConfig, tracker, skip_to: int = 0, average=None):
    """A fastai callback saving weights, optimiser, progress (and the `weight_average`) atomically for --resume.

    It saves after an epoch when `config.checkpoint_every` seconds have passed since the last save, and after
    the last epoch: on a GPU an epoch takes seconds, and writing the optimiser state each time would cost more.
    Each save writes files named by its phase and epoch, then `state.json` naming them, then removes the files no
    state names: a crash in between leaves the previous save whole. In a distributed run only the main process writes.
    """
    import time

    import torch
    from fastai.callback.core import Callback
    from fastai.learner import save_model

    class Checkpoint(Callback):
        order = tracker.order + 1  # after the tracker has seen this epoch's metric
        best_epoch: int | None = None
        best_file: str | None = None  # a resumed fit: the interrupted run's best weights until it finds better
        saved_best: dict | None = None

        def before_fit(self):
            self.saved_at = time.monotonic()

        def after_epoch(self):
            if self.epoch < skip_to:  # skipped by a resumed fit: nothing new to save
                return
            if getattr(tracker, "new_best", False):
                self.best_epoch = self.epoch
            if not is_main_process() or (self.epoch + 1 < self.n_epoch
                                          and time.monotonic() - self.saved_at < config.checkpoint_every):
                return
            self.saved_at = time.monotonic()
            tag = f"{phase}-{self.epoch}"
            if tracker.best_state is not None and self.saved_best is not tracker.best_state:
                self.best_file = f"best-{tag}.pth"
                with atomic_path(folder / self.best_file) as tmp:
                    torch.save(tracker.best_state, tmp)
                self.saved_best = tracker.best_state
            files = {"last": f"last-{tag}.pth"}
            with atomic_path(folder / files["last"]) as tmp:
                save_model(tmp, self.learn.model, self.learn.opt, with_opt=True)
            if average is not None:
                files["average"] = f"average-{tag}.pth"
                with atomic_path(folder / files["average"]) as tmp:
                    torch.save(average.checkpoint(), tmp)
            if self.best_file is not None:
                files["best"] = self.best_file
            write_json_atomic(folder / "state.json", {
                "phase": phase, "epoch": self.epoch, "best": float(tracker.best), "best_epoch": self.best_epoch,
                "files": files, "config": {k: getattr(config, k) for k in RESUME_KEYS}})
            for old in folder.glob("*.pth"):
                if old.name not in files.values():
                    old.unlink(missing_ok=True)

    return Checkpoint()


def read_resume_state(folder: Path, config: TrainConfig) -> dict:
    """The interrupted run's progress, after checking that it was run with the same settings."""
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise SkinCancerError(f"{folder}: no checkpoint to resume from (run without --resume to start afresh)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    if "files" not in state:
        raise SkinCancerError(f"{state_file}: written by an older skincancer, which named no checkpoint files; "
                              "run without --resume to start afresh")
    missing = [name for name in state["files"].values() if not (folder / name).is_file()]
    if missing:
        raise SkinCancerError(f"{state_file}: the checkpoint files it names are missing ({', '.join(missing)}); "
                              "run without --resume to start afresh")
    now = {k: getattr(config, k) for k in RESUME_KEYS}
    differ = [f"{k}: {state['config'].get(k)!r} then, {now[k]!r} now" for k in RESUME_KEYS
              if state["config"].get(k) != now[k]]
    if differ:
        raise SkinCancerError(f"{state_file}: the interrupted run used other settings ({'; '.join(differ)})")
    return state


def read_average(folder: Path, state: dict) -> dict:
    """The weight average an interrupted run saved beside its checkpoint (tensors only: nothing runs on loading).

    A run with `ema` saves one at every checkpoint, and `ema` must match to resume, so read_resume_state's check
    that the state's files exist covers it.
    """
    import torch

    return torch.load(folder / state["files"]["average"], map_location="cpu", weights_only=True)


def fit(learn, config: TrainConfig, monitor: str, resume: bool = False) -> int | None:
    """Fine-tune (pretrained) or fit one cycle (scratch), checkpointing each epoch; restore the best epoch.

    Returns the index of the best epoch in the last phase. With `resume`, continue from the checkpoint that an
    interrupted run with the same settings left in checkpoint_dir(config.out).
    """
    folder = checkpoint_dir(config.out)
    # one reading for all processes: a leftover process still writing checkpoints must not make them disagree
    state = from_main_process(lambda: read_resume_state(folder, config)) if resume else None
    if is_main_process():  # the other processes of a distributed run only read checkpoints
        if state is None:
            shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    old_dir = learn.model_dir
    learn.model_dir = folder.resolve()  # the best epoch's weights live beside the checkpoints
    best_epoch = None
    try:
        with distributed_fit(learn) as parallel:
            for i, phase in enumerate(phases(config)):
                if phase["epochs"] == 0 or (state and i < state["phase"]):
                    continue
                resumed = state if state and i == state["phase"] else None  # the phase the run stopped in
                start = resumed["epoch"] + 1 if resumed else 0
                average = None
                if config.ema:
                    average = weight_average(config.ema, read_average(folder, resumed) if resumed else None)
                tracker = best_epoch_tracker(monitor, skip_to=start,
                                             state=None if average is None else average.averaged_state)
                checkpoint = checkpoint_callback(folder, i, config, tracker, skip_to=start, average=average)
                if resumed:
                    learn.freeze() if phase["frozen"] else learn.unfreeze()
                    files = resumed["files"]
                    learn.load(folder / Path(files["last"]).stem, with_opt=True)
                    tracker.best, tracker.reset_on_fit = resumed["best"], False
                    checkpoint.best_epoch, checkpoint.best_file = resumed.get("best_epoch"), files.get("best")
                    if checkpoint.best_file:  # what the tracker restores if the resumed fit finds nothing better
                        tracker.fname = Path(checkpoint.best_file).stem
                    print(f"resuming from {folder}: phase {i + 1}, epoch {start + 1} of {phase['epochs']}")
                    state = None
                    if start >= phase["epochs"]:  # the phase had ended: keep its best epoch and go on
                        if checkpoint.best_file:
                            learn.load(folder / Path(checkpoint.best_file).stem)
                        best_epoch = checkpoint.best_epoch
                        continue
                elif config.pretrained:
                    learn.freeze() if phase["frozen"] else learn.unfreeze()
                guard = loss_on_device() if config.loss_on_device else stop_on_nan()
                cbs = [tracker, checkpoint, guard, *parallel, *([compile_model()] if config.compile else []),
                       *([] if average is None else [average])]
                try:
                    learn.fit_one_cycle(phase["epochs"], phase["lr"], wd=config.wd, start_epoch=start, cbs=cbs,
                                        **phase["kwargs"])
                finally:  # fastai skips after_fit when a fit is interrupted
                    if config.loss_on_device:
                        guard.restore()
                    if average is not None:  # the weights themselves, not the average, if validation was cut short
                        average.restore()
                best_epoch = checkpoint.best_epoch
    finally:
        learn.model_dir = old_dir
    return best_epoch


def evaluate_splits(learn, df: pd.DataFrame, target_sensitivity: float) -> tuple[dict[str, dict], dict]:
    """Calibrate and choose the operating threshold on valid, then metrics of valid and test; return (metrics, card).

    The card part holds the threshold, its rule and the calibration: the threshold is on the calibrated scale. Each
    split's metrics hold `by_lesion` too (`lesion_metrics`), as `evaluate`'s do.
    """
    from .calibration import calibrate, fit_calibration
    from .evaluate import lesion_groups, predict_frame
    from .metrics import choose_threshold, classification_metrics, lesion_metrics, malignant_scores

    classes = [str(c) for c in learn.dls.vocab]
    parts = {s: df[df["split"] == s] for s in ("valid", "test") if (df["split"] == s).any()}
    preds = {s: predict_frame(learn, part) for s, part in parts.items()}
    probs, targets = preds["valid"]
    truth, scores = malignant_scores(probs, targets, classes)
    calibration = fit_calibration(scores, truth)
    threshold = choose_threshold(calibrate(scores, calibration), truth, target_sensitivity)
    metrics = {}
    for s, (p, t) in preds.items():
        groups = lesion_groups(parts[s])
        metrics[s] = classification_metrics(p, t, classes, threshold, dx=parts[s]["dx"].to_numpy(), n_boot=1000,
                                            seed=0, groups=groups, calibration=calibration)
        if groups is not None:
            metrics[s]["by_lesion"] = lesion_metrics(groups, *malignant_scores(p, t, classes, calibration), threshold,
                                                     1000)
    rule = {"target_sensitivity": target_sensitivity, "chosen_on": "valid",
            "how": "the highest calls whose validation sensitivity for malignant reaches the target; the threshold "
                   "halfway between the last malignant photo caught and the next score below",
            "valid_sensitivity": metrics["valid"]["sensitivity"], "valid_specificity": metrics["valid"]["specificity"]}
    return metrics, {"threshold": threshold, "threshold_rule": rule, "calibration": calibration}


def library_versions() -> dict[str, str]:
    """Versions that matter for reproducing or loading a model."""
    import fastai
    import torch
    import torchvision

    return {"skincancer": __version__, "fastai": fastai.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def model_card(config: TrainConfig, df: pd.DataFrame, metrics: dict, best_epoch: int | None,
               decision: dict, processes: int = 1) -> dict:
    """The JSON written beside an exported model; `decision` is evaluate_splits' threshold, rule and calibration."""
    counts = split_table(df)
    return {
        "task": config.task,
        "classes": list(classes_for(config.task)),
        "arch": config.arch,
        "pretrained": config.pretrained,
        "size": config.size,
        "presize": config.presize,
        "seed": config.seed,
        "processes": processes,  # data-parallel processes: the batch per step was bs times this
        **decision,
        "monitor": monitor_for(config.task),
        "best_epoch": best_epoch,
        "split_counts": {s: {lbl: int(n) for lbl, n in counts.loc[s].items()} for s in SPLITS if s in counts.index},
        "split_images": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "split_lesions": {s: int(df.loc[df["split"] == s, "lesion_id"].nunique()) for s in SPLITS},
        "metrics": metrics,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
    }


def save_weights(model, path: str | Path) -> None:
    """The model's weights as safetensors: plain tensors, nothing that runs code when loaded."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}, str(path))


def export(learn, out: str | Path, card: dict, df: pd.DataFrame) -> dict[str, Path]:
    """Export the learner (.pkl), weights (.safetensors), card and split atomically; a failure keeps the old ones."""
    from fastai.vision.all import imagenet_stats

    paths = model_files(out)
    learn = learn.to_fp32() if hasattr(learn, "to_fp32") else learn
    with atomic_path(paths["model"]) as tmp_model, atomic_path(paths["weights"]) as tmp_weights, \
            atomic_path(paths["split"]) as tmp_split:
        learn.export(tmp_model.resolve())
        save_weights(learn.model, tmp_weights)
        df[["image_id", "lesion_id", "split"]].to_csv(tmp_split, index=False)
        card = {**card, "sha256": sha256_file(tmp_model), "weights_sha256": sha256_file(tmp_weights),
                "normalize": {"mean": list(imagenet_stats[0]), "std": list(imagenet_stats[1])},
                "files": {k: v.name for k, v in paths.items()}}
        # the card is written last and names the sha256 of the files beside it: a mismatch exposes a torn export
    write_json_atomic(paths["card"], card)
    return paths


def seed_everything(seed: int, reproducible: bool = True) -> None:
    """fastai's `set_seed`, and cuDNN's algorithms chosen for `reproducible` either way (fastai leaves them as set).

    Reproducible: cuDNN's deterministic algorithms, picked by its heuristics. Not: cuDNN times the candidates for each
    shape (`benchmark`) and may pick ones whose sums run in a varying order, so two runs with one seed can drift
    apart. On a GPU the second may be faster; in one process a later run must not inherit an earlier one's choice.
    """
    import torch
    from fastai.torch_core import set_seed

    set_seed(seed, reproducible=reproducible)
    torch.backends.cudnn.deterministic = reproducible
    torch.backends.cudnn.benchmark = not reproducible


def setup(config: TrainConfig) -> tuple[TrainConfig, pd.DataFrame, Any]:
    """Resolve the config, seed, read and split the data, build DataLoaders and the learner: (config, df, learn)."""
    config = config.resolved()
    assert config.bs and config.size and config.presize and config.label_smoothing is not None  # resolved() set them
    seed_everything(config.seed, config.reproducible)
    df = prepare(config.data, config.task, config.valid_pct, config.test_pct, config.seed, config.limit,
                 config.drop_missing, config.class_map, config.split_from)
    check_no_lesion_leak(df)
    n_train = int((df["split"] == "train").sum())
    if n_train < config.bs:
        raise SkinCancerError(f"bs: {config.bs} is more than the {n_train} training images, so an epoch would have no "
                              "full batch; lower --bs or use more images")
    with local_main_process_first():  # distributed: one process per machine downloads and presizes
        if config.pretrained:  # before the data: a missing checkpoint should not wait for the cache to be built
            ensure_pretrained_weights(config.arch)
        dls = make_dataloaders(df, config.task, config.size, config.bs, config.presize,
                               sampler=config.imbalance == "sampler", num_workers=config.num_workers,
                               cache=(config.cache_dir or True) if config.cache else False, augment=config.augment)
    train_labels = df.loc[df["split"] == "train", "label"]
    loss = make_loss(config.task, train_labels, config.imbalance, config.label_smoothing)
    learn = make_learner(dls, config.task, config.arch, config.pretrained, loss_func=loss,
                         path=Path(config.out).parent)
    if config.mixup:
        from fastai.callback.mixup import MixUp

        learn.add_cb(MixUp(config.mixup))
    return config, df, learn


def finish(learn, config: TrainConfig, df: pd.DataFrame, best_epoch: int | None = None,
           processes: int = 1) -> TrainResult:
    """Calibrate and choose the threshold on valid, measure valid and test, write the card, split and learner."""
    metrics, decision = evaluate_splits(learn, df, config.target_sensitivity)
    calibration = decision["calibration"]
    print("probability of malignancy: " + (
        f"calibrated on valid, sigmoid({calibration['slope']:.3f} * logit(score) {calibration['intercept']:+.3f})"
        if calibration else "the network's score (valid cannot calibrate it: one class only, or ranked backwards)"))
    print(f"operating threshold {decision['threshold']:.4f}: chosen on valid for sensitivity >= "
          f"{config.target_sensitivity:.2f}")
    for split, m in metrics.items():
        print(f"{split}:\n{metrics_table(m)}")
        if m.get("by_lesion"):
            print(lesion_table(m["by_lesion"]))
    if hasattr(learn.loss_func, "set_operating_point"):  # fastai's learn.predict then calls as skincancer's does
        learn.loss_func.set_operating_point(learn.dls.vocab, decision["threshold"], calibration)
    card = model_card(config, df, metrics, best_epoch, decision, processes)
    files = export(learn, config.out, card, df)
    print(f"exported {files['model']} (card {files['card'].name}, split {files['split'].name})")
    return TrainResult(learn=learn, df=df, card=card, files=files)


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Read, split, train, evaluate on valid and test, export; return the learner and what was written.

    Each epoch is checkpointed in checkpoint_dir(config.out); `resume` continues an interrupted run from there.
    The checkpoints are removed once the model is exported. Launched on several processes (`accelerate launch`,
    `torchrun`), each trains on its share of every batch of `config.bs` images per process, and only the main
    process evaluates and exports; the others return a result with an empty card and no files.
    """
    process_state()  # first: it picks this process's device and rank
    with quiet_unless_main():
        config, df, learn = setup(config)
        how = f"the split of {config.split_from}" if config.split_from else f"split by lesion (seed {config.seed})"
        print(f"{len(df)} images of {df['lesion_id'].nunique()} lesions; {how}:")
        print(split_table(df).to_string())
        if world_size() > 1:
            assert config.bs  # setup resolved it
            print(f"data-parallel on {world_size()} processes: {config.bs} images per process, "
                  f"{config.bs * world_size()} per step, lr {config.lr:g} (README: more than one GPU)")
        if config.ema:
            print(f"validating, keeping and exporting an average of the weights (decay {config.ema:g} a step)")
        best_epoch = fit(learn, config, monitor_for(config.task), resume=resume)
    if not is_main_process():
        return TrainResult(learn=learn, df=df, card={})
    processes = world_size()
    with alone():
        result = finish(learn, config, df, best_epoch, processes)
    shutil.rmtree(checkpoint_dir(config.out), ignore_errors=True)
    return result
