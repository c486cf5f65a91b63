"""A training run: read and split the data, build the learner, fine-tune (or train from scratch) with resumable
checkpoints, calibrate and choose the operating threshold on valid, measure valid and test, export."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastai
import pandas as pd
import torch
import torchvision
from fastai.torch_core import set_seed

from . import DISCLAIMER, __version__
from .calibration import calibrate, fit_calibration
from .card import ModelCard, describe_export
from .callbacks import BestEpochTracker, Checkpoint, CompileModel, StopOnNaN, epoch_lines
from .classifier import predict_frame
from .inference import inference_model
from .config import N_BOOT, THRESHOLD_CONFIDENCE, TrainConfig
from .data import SPLITS, check_no_lesion_leak, lesion_groups, prepare, split_table
from .datablock import make_dataloaders
from .distributed import (alone, distributed_fit, from_main_process, is_main_process, local_main_process_first,
                          process_state, quiet_unless_main, world_size)
from .errors import SkinCancerError
from .dermoscopy import fit_dermoscopy_check
from .export import export
from .files import model_files, write_text_atomic
from .labels import classes_for
from .losses import make_loss
from .metrics import (choose_confident_threshold, choose_threshold, classification_metrics, lesion_metrics,
                      malignant_scores, target_met)
from .arch import arch_name, normalization
from .model import make_learner, monitor_for
from .pretrained import ensure_pretrained_weights, pretrained_source
from .model import auroc_or_nan  # noqa: F401  (learners exported by 0.1 pickled the metric by this module's name)
from .tables import interval, lesion_table, metrics_table, target_line, threshold_rule_line


@dataclass
class TrainResult:
    """What a run produced: the learner, the split metadata, the model card and the files written."""

    learn: Any
    df: pd.DataFrame
    card: ModelCard | None  # None in the other processes of a distributed run, which export nothing
    files: dict[str, Path] = field(default_factory=dict)
    scores: dict[str, tuple] = field(default_factory=dict)  # valid and test: (truth, calibrated probability)


def seed_everything(seed: int) -> None:
    """fastai's `set_seed` with cuDNN's deterministic algorithms: one seed, one training, in any process."""
    set_seed(seed, reproducible=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def setup(config: TrainConfig) -> tuple[TrainConfig, pd.DataFrame, Any]:
    """Resolve the config, seed, read and split the data, build DataLoaders and the learner: (config, df, learn)."""
    config = config.resolved()
    assert config.bs and config.size and config.arch  # resolved() filled them
    if Path(config.out).exists() and not config.overwrite:  # before the data and the hours of training
        raise SkinCancerError(f"{config.out}: a model is already exported there ({describe_export(config.out)}); "
                              "pass --overwrite (overwrite=True) to replace it, or --out another file")
    seed_everything(config.seed)
    df = prepare(config.data, config.task, config.valid_pct, config.test_pct, config.seed, config.limit,
                 config.drop_missing, config.class_map, config.split_from, config.test_source)
    check_no_lesion_leak(df)
    n_train = int((df["split"] == "train").sum())
    if n_train < config.bs:
        raise SkinCancerError(f"bs: {config.bs} is more than the {n_train} training images, so an epoch would have no "
                              "full batch; lower --bs or use more images")
    with local_main_process_first():  # distributed: one process per machine downloads and presizes
        if config.pretrained and config.weights is None:  # before the data: a missing checkpoint fails at once
            ensure_pretrained_weights(config.arch)
        dls = make_dataloaders(df, config.task, config.size, config.bs, config.presize,
                               sampler=config.imbalance == "sampler", num_workers=config.num_workers,
                               cache=(config.cache_dir or True) if config.cache else False,
                               stats=normalization(config.arch))
    loss = make_loss(config.task, df.loc[df["split"] == "train", "label"], config.imbalance)
    learn = make_learner(dls, config.task, config.arch, bool(config.pretrained), weights=config.weights,
                         loss_func=loss, path=Path(config.out).parent)
    return config, df, learn


# --- fitting, resumably ---------------------------------------------------------------------------

def checkpoint_dir(out: str | Path) -> Path:
    """Where a run keeps its checkpoints until it exports: models/NAME.checkpoints/."""
    return Path(out).with_suffix(".checkpoints")


def phases(config: TrainConfig) -> list[dict]:
    """The one-cycle fits of a run: fastai's fine_tune schedule (frozen, then unfrozen) or one fit from scratch."""
    assert config.lr is not None and config.lr_mult is not None, "phases: resolve the config first"
    if not config.pretrained:
        return [dict(epochs=config.epochs, lr=config.lr, frozen=False, kwargs={})]
    base = config.lr / 2  # as Learner.fine_tune: halve the rate after the frozen epochs, discriminative rates after
    return [dict(epochs=config.freeze_epochs, lr=slice(config.lr), frozen=True, kwargs=dict(pct_start=0.99)),
            dict(epochs=config.epochs, lr=slice(base / config.lr_mult, base), frozen=False,
                 kwargs=dict(pct_start=0.3, div=5.0))]


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
    now = config.identity()
    differ = [f"{k}: {state['config'].get(k)!r} then, {v!r} now" for k, v in now.items()
              if state["config"].get(k) != v]
    if differ:
        raise SkinCancerError(f"{state_file}: the interrupted run used other settings ({'; '.join(differ)})")
    return state


def _restore(learn, folder: Path, state: dict, tracker: BestEpochTracker, checkpoint: Checkpoint) -> None:
    """Load an interrupted phase's weights, optimiser and best epoch so far into `learn` and its callbacks."""
    files = state["files"]
    learn.load(folder / Path(files["last"]).stem, with_opt=True)
    tracker.best, tracker.reset_on_fit = state["best"], False
    checkpoint.best_epoch, checkpoint.best_file = state.get("best_epoch"), files.get("best")
    if checkpoint.best_file:  # what the tracker restores if the resumed fit finds nothing better
        tracker.fname = Path(checkpoint.best_file).stem


def fit(learn, config: TrainConfig, resume: bool = False) -> int | None:
    """Fine-tune (pretrained) or fit one cycle (scratch), checkpointing as it goes; restore the best epoch.

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
    old_dir, learn.model_dir = learn.model_dir, folder.resolve()  # the best epoch's weights live beside checkpoints
    best_epoch = None
    try:
        with distributed_fit(learn) as parallel, epoch_lines():
            for i, phase in enumerate(phases(config)):
                if phase["epochs"] == 0 or (state and i < state["phase"]):
                    continue
                resumed, state = (state, None) if state else (None, None)  # the phase the run stopped in
                best_epoch = _fit_phase(learn, config, i, phase, folder, resumed, parallel)
    finally:
        learn.model_dir = old_dir
    return best_epoch


def _fit_phase(learn, config: TrainConfig, i: int, phase: dict, folder: Path, resumed: dict | None,
               parallel: list) -> int | None:
    """One one-cycle fit of `phases`, from its start or from where `resumed` stopped; its best epoch."""
    start = resumed["epoch"] + 1 if resumed else 0
    tracker = BestEpochTracker(monitor_for(config.task), skip_to=start)
    checkpoint = Checkpoint(folder, i, config.identity(), tracker, config.checkpoint_every, skip_to=start)
    if config.pretrained:
        learn.freeze() if phase["frozen"] else learn.unfreeze()
    if resumed:
        _restore(learn, folder, resumed, tracker, checkpoint)
        print(f"resuming from {folder}: phase {i + 1}, epoch {start + 1} of {phase['epochs']}")
        if start >= phase["epochs"]:  # the phase had ended: keep its best epoch and go on
            if checkpoint.best_file:
                learn.load(folder / Path(checkpoint.best_file).stem)
            return checkpoint.best_epoch
    cbs = [tracker, checkpoint, StopOnNaN(), *parallel, *([CompileModel()] if config.compile else [])]
    learn.fit_one_cycle(phase["epochs"], phase["lr"], wd=config.wd, start_epoch=start, cbs=cbs, **phase["kwargs"])
    return checkpoint.best_epoch


# --- the held-out numbers, the card and the export -----------------------------------------------

def evaluate_splits(learn, df: pd.DataFrame, target_sensitivity: float,
                    confidence: float = THRESHOLD_CONFIDENCE) -> tuple[dict[str, dict], dict, dict]:
    """Calibrate and choose the operating threshold on valid, then metrics of valid and test.

    Returns (metrics, card part, scores): scores holds each split's truth and calibrated probability of malignancy.
    The card part holds the threshold, its rule and the calibration: the threshold is on the calibrated scale. Each
    split's metrics hold `by_lesion` too (`lesion_metrics`), as `evaluate`'s do, and `target`: the sensitivity
    reached against the target, and on what share of its resampled lesions (`target_met`).
    """
    classes = [str(c) for c in learn.dls.vocab]
    parts = {s: df[df["split"] == s] for s in ("valid", "test") if (df["split"] == s).any()}
    # through the fp32 inference copy, outside fastai's mixed precision: the scores the export serves, so the
    # threshold and calibration fitted on valid are those `evaluate` and `predict` reproduce
    model = inference_model(learn.model)
    preds = {s: predict_frame(learn, part, model=model) for s, part in parts.items()}
    probs, targets = preds["valid"]
    truth, scores = malignant_scores(probs, targets, classes)
    calibration = fit_calibration(scores, truth)
    threshold = operating_threshold(calibrate(scores, calibration), truth, target_sensitivity, confidence,
                                    lesion_groups(parts["valid"]))
    metrics, scored = {}, {}
    for s, (p, t) in preds.items():
        scored[s] = malignant_scores(p, t, classes, calibration)
        groups = lesion_groups(parts[s])
        metrics[s] = classification_metrics(p, t, classes, threshold, dx=parts[s]["dx"].to_numpy(), n_boot=N_BOOT,
                                            seed=0, groups=groups, calibration=calibration)
        metrics[s]["target"] = target_met(*scored[s], threshold, target_sensitivity, N_BOOT, groups=groups)
        if groups is not None:
            metrics[s]["by_lesion"] = lesion_metrics(groups, *scored[s], threshold, N_BOOT)
    rule = {"target_sensitivity": target_sensitivity, "confidence": confidence, "chosen_on": "valid",
            "how": THRESHOLD_RULES["confident" if confidence else "plain"],
            "valid_sensitivity": metrics["valid"]["sensitivity"], "valid_specificity": metrics["valid"]["specificity"]}
    return metrics, {"threshold": threshold, "threshold_rule": rule, "calibration": calibration}, scored


THRESHOLD_RULES = {
    "plain": "the highest calls whose validation sensitivity for malignant reaches the target; the threshold "
             "halfway between the last malignant photo caught and the next score below",
    "confident": "the highest calls whose validation sensitivity for malignant reaches the target on the confidence "
                 "share of resampled validation lesions (its one-sided lower bound is the target); the threshold "
                 "halfway between the last malignant photo caught and the next score below"}


def operating_threshold(p_malignant, is_malignant, target_sensitivity: float, confidence: float,
                        groups=None) -> float:
    """The threshold the card records: `choose_confident_threshold` at `confidence`, or `choose_threshold` at 0."""
    if not confidence:
        return choose_threshold(p_malignant, is_malignant, target_sensitivity)
    return choose_confident_threshold(p_malignant, is_malignant, target_sensitivity, confidence, N_BOOT,
                                      groups=groups)


def library_versions() -> dict[str, str]:
    """Versions that matter for reproducing or loading a model."""
    return {"skincancer": __version__, "fastai": fastai.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "python": platform.python_version()}


def model_card(config: TrainConfig, df: pd.DataFrame, metrics: dict, best_epoch: int | None,
               decision: dict, learn=None, processes: int = 1) -> ModelCard:
    """The JSON written beside an exported model; `decision` is evaluate_splits' threshold, rule and calibration."""
    assert config.arch is not None  # the config is resolved
    counts = split_table(df)
    lesions_known = lesion_groups(df) is not None  # a folder-per-class set has photos only: no lesion counts
    mean, std = normalization(config.arch)
    start: dict | None
    if config.weights:
        start = {"file": Path(config.weights).name, "sha256": getattr(learn, "weights_sha256", None)}
    else:
        start = {"source": pretrained_source(config.arch)} if config.pretrained else None
    return ModelCard.from_dict({
        "task": config.task,
        "classes": list(classes_for(config.task)),
        "arch": config.arch,
        "pretrained": config.pretrained,
        "pretrained_weights": start,
        "recipe": config.recipe,
        "size": config.size,
        "presize": config.presize,
        "normalize": {"mean": list(mean), "std": list(std)},
        "seed": config.seed,
        "test_source": config.test_source,  # a source held out as the test split, or None: a random lesion split
        "processes": processes,  # data-parallel processes: the batch per step was bs times this
        **decision,
        "monitor": monitor_for(config.task),
        "best_epoch": best_epoch,
        "split_counts": {s: {lbl: int(n) for lbl, n in counts.loc[s].items()} for s in SPLITS if s in counts.index},
        "split_images": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "lesion_ids": lesions_known,
        "split_lesions": ({s: int(df.loc[df["split"] == s, "lesion_id"].nunique()) for s in SPLITS}
                          if lesions_known else None),
        "metrics": metrics,
        "config": dataclasses.asdict(config),
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "disclaimer": DISCLAIMER,
    })


def summary(config: TrainConfig, card: ModelCard, files: dict[str, Path], report: Path) -> str:
    """The lines a run ends with: what was trained, the held-out numbers that matter, the files, what to run next."""
    assert config.arch is not None  # the config is resolved
    start = card.pretrained_weights or {}
    how = ("fine-tuned from " + (start.get("file") or start.get("source", "pretrained weights"))
           if config.pretrained else "trained from random weights")
    n_train, best = (card.split_images or {}).get("train", 0), card.best_epoch
    monitor = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy"}.get(card.monitor or "", card.monitor)
    lines = [f"{arch_name(config.arch)} {how}, {config.size} px (recipe {config.recipe}), on {n_train:,} photos"
             + (f"; best epoch {best + 1} of {config.epochs} by validation {monitor}" if best is not None else ""),
             "probability of malignancy " + ("calibrated on valid" if card.calibration else
                                             "uncalibrated (valid could not calibrate it)") + "; "
             + threshold_rule_line(card.threshold_rule, card.threshold),
             f"  {'split':<14}{'AUROC (95% CI)':<22}{'sensitivity':>12}{'specificity':>12}{'balanced acc.':>15}"
             f"{'accuracy':>10}"]
    for split, m in card.metrics.items():
        auroc = "undefined" if m["auroc"] is None else interval(m["auroc"], m.get("auroc_ci95"))
        cells = [f"{m[k]:.3f}" if m[k] is not None else "-" for k in ("sensitivity", "specificity",
                                                                       "balanced_accuracy", "accuracy")]
        name = f"{split} ({m['n']:,})"
        lines.append(f"  {name:<14}{auroc:<22}{cells[0]:>12}{cells[1]:>12}{cells[2]:>15}{cells[3]:>10}")
    seven = len(card.classes) > 2
    lines.append("  (sensitivity and specificity of malignant at the threshold; balanced accuracy and accuracy "
                 + ("of the 7 diagnoses, by the most likely one" if seven else "at the threshold too")
                 + "; the epoch table counted at a score of 0.5)")
    if card.metrics.get("test", {}).get("target"):
        lines.append("  " + target_line(card.metrics["test"]["target"])
                     + (f" (every lesion from {config.test_source}, a source training never saw)"
                        if config.test_source else ""))
    if card.check:
        lines.append("  dermoscopy check (photos unlike the training photos get no call): passes "
                     + ", ".join(f"{share:.1%} of {split}" for split, share in card.check["passed"].items())
                     + (f" (from {config.test_source})" if config.test_source else ""))
    by_lesion = card.metrics.get("test", {}).get("by_lesion")
    if by_lesion and by_lesion["all_photos"]["auroc"] is not None:
        lines.append(f"  test, lesion by lesion ({by_lesion['n_lesions']:,} lesions, each on the mean of its photos): "
                     f"AUROC {interval(by_lesion['all_photos']['auroc'], by_lesion['all_photos']['auroc_ci95'])}")
    lines += [f"wrote {files['model']} (the fastai learner), {files['weights'].name} (its weights: what loading "
              f"reads), {files['card'].name} (the model card), {files['split'].name}"
              + (f" and {files['check'].name} (the dermoscopy check)" if "check" in files else "")
              + f"; every table: {report}",
              f"next: python -m skincancer evaluate --model {files['model']} --data {config.data} "
              f"--out reports/{files['model'].stem}",
              f"      python -m skincancer predict --model {files['model']} PHOTO.jpg",
              DISCLAIMER]
    return "\n".join(lines)


def report(card: ModelCard) -> str:
    """Every table of a run's held-out numbers, for NAME.report.txt."""
    parts = [threshold_rule_line(card.threshold_rule, card.threshold)]
    for split, m in card.metrics.items():
        parts.append(f"{split}:\n{metrics_table(m)}")
        if m.get("by_lesion"):
            parts.append(lesion_table(m["by_lesion"]))
    return "\n\n".join(parts) + "\n"


def finish(learn, config: TrainConfig, df: pd.DataFrame, best_epoch: int | None = None,
           processes: int = 1) -> TrainResult:
    """Calibrate and choose the threshold on valid, measure valid and test, write the card, split and learner."""
    metrics, decision, scores = evaluate_splits(learn, df, config.target_sensitivity, config.threshold_confidence)
    if hasattr(learn.loss_func, "set_operating_point"):  # fastai's learn.predict then calls as skincancer's does
        learn.loss_func.set_operating_point(learn.dls.vocab, decision["threshold"], decision["calibration"])
    card = model_card(config, df, metrics, best_epoch, decision, learn, processes)
    assert config.size is not None  # the config is resolved
    files, card = export(learn, config.out, card, df, fit_dermoscopy_check(learn, df, config.size))
    report_file = write_text_atomic(model_files(config.out)["report"], report(card))
    print(summary(config, card, files, report_file))
    return TrainResult(learn=learn, df=df, card=card, files=files, scores=scores)


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
        how = (f"the split of {config.split_from}" if config.split_from else
               f"test: every lesion from {config.test_source}; the rest split by lesion (seed {config.seed})"
               if config.test_source else f"split by lesion (seed {config.seed})")
        lesions = f"{df['lesion_id'].nunique():,} lesions" if lesion_groups(df) is not None else "no lesion ids"
        print(f"{len(df):,} images of {lesions}; {how}:")
        print(split_table(df).to_string())
        if not torch.cuda.is_available() and config.recipe != "cpu" and config.size and config.size >= 160:
            print(f"no GPU: recipe {config.recipe} at {config.size} px may take hours on a CPU; --recipe cpu "
                  "fine-tunes EfficientNet-Lite0 in about half an hour (docs/training.md)")
        if world_size() > 1:
            assert config.bs  # setup resolved it
            print(f"data-parallel on {world_size()} processes: {config.bs} images per process, "
                  f"{config.bs * world_size()} per step, lr {config.lr:g} (docs/distributed.md)")
        best_epoch = fit(learn, config, resume=resume)
    if not is_main_process():
        return TrainResult(learn=learn, df=df, card=None)
    processes = world_size()
    with alone():
        result = finish(learn, config, df, best_epoch, processes)
    shutil.rmtree(checkpoint_dir(config.out), ignore_errors=True)
    return result
