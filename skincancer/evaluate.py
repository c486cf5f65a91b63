"""Honest evaluation of exported models on labelled images: each model scored (`metrics`), by subgroup and lesion by
lesion, then drawn and written; and two models compared, paired. Each step is a function: score, figures, write."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from .calibration import calibrate
from .data import attach_paths, index_files, is_onehot, lesion_groups, onehot_to_dx, read_metadata, read_table, \
    validate_metadata
from .config import N_BOOT
from .errors import SkinCancerError, first_few
from .files import model_files, write_json_atomic
from .labels import task_of
from .metrics import (PAIRED, at_prevalence, calibration_in_the_large, check_prevalences, classification_metrics,
                      lesion_metrics, lesion_scores, malignant_scores, net_benefit, paired_bootstrap,
                      paired_net_benefit, predicted_classes, target_met)
from .plotting import (plot_confusion, plot_decision_curve, plot_gradcam_grid, plot_lesions, plot_paired_differences,
                       plot_pr, plot_reliability, plot_roc, plot_subgroups, plot_threshold, plot_top_losses,
                       save_figure)
from .subgroups import paired_subgroup_metrics, subgroup_metrics


# --- labelled images ------------------------------------------------------------------------------

def read_labels(labels_csv: str | Path, images_dir: str | Path) -> pd.DataFrame:
    """A labelled set: ISIC one-hot CSV (image, MEL, ...) or `image_id,dx`, with its images found in `images_dir`."""
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise SkinCancerError(f"{labels_csv}: no such labels file")
    df = read_table(labels_csv)
    if is_onehot(df):
        df = onehot_to_dx(df, labels_csv)
    elif not {"image_id", "dx"} <= set(df.columns):
        raise SkinCancerError(f"{labels_csv}: expected columns image,MEL,NV,BCC,AKIEC,BKL,DF,VASC (ISIC one-hot) "
                              f"or image_id,dx; found {', '.join(df.columns)}")
    df = validate_metadata(df, labels_csv, required=("image_id", "dx"))
    images, _ = index_files(images_dir)
    unknown = df.loc[~df["image_id"].isin(images), "image_id"]
    if len(unknown):
        raise SkinCancerError(f"{labels_csv}: {len(unknown)} of {len(df)} image id(s) have no image in {images_dir}: "
                              f"{first_few(unknown)}")
    return attach_paths(df, images, Path(images_dir))


def read_test_split(model_path: str | Path, data_dir: str | Path) -> pd.DataFrame:
    """The test split recorded beside a model (NAME.split.csv), resolved against a HAM10000 folder."""
    split_csv = model_files(model_path)["split"]
    if not split_csv.is_file():
        raise SkinCancerError(f"{split_csv}: no split file beside the model; evaluate with --images and --labels")
    split = read_table(split_csv)
    if not {"image_id", "split"} <= set(split.columns):
        raise SkinCancerError(f"{split_csv}: expected columns image_id,lesion_id,split")
    test_ids = split.loc[split["split"] == "test", "image_id"]
    if test_ids.empty:
        raise SkinCancerError(f"{split_csv}: no image is in the test split")
    meta = read_metadata(data_dir).set_index("image_id")
    unknown = test_ids[~test_ids.isin(meta.index)]
    if len(unknown):
        raise SkinCancerError(f"{data_dir}: {len(unknown)} test image id(s) of {split_csv.name} are not in this "
                              f"data set: {first_few(unknown)}")
    return meta.loc[test_ids].reset_index()



# --- one model ------------------------------------------------------------------------------------

def _net_benefit_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict | None:
    """The model's net benefit at its operating threshold beside biopsying all lesions, or None out of (0, 1)."""
    if not 0 < threshold < 1:
        return None
    return {"threshold": threshold, "benign_per_malignancy": 1 / threshold - 1,
            "model": float(net_benefit(y, p, [threshold])[0]),
            "biopsy_all": float(net_benefit(y, np.ones(len(y)), [threshold])[0])}


def check_metrics(check, scores: np.ndarray, truth: np.ndarray, p_mal: np.ndarray, image_ids) -> dict:
    """The dermoscopy check on labelled photos: the share that pass, the AUROC of those, and the ones refused."""
    passed = check.passes(scores)
    both = passed.any() and 0 < truth[passed].sum() < passed.sum()
    return {"threshold": check.threshold, "n": int(len(scores)), "passed": float(passed.mean()),
            "auroc_of_passed": float(roc_auc_score(truth[passed], p_mal[passed])) if both else None,
            "refused": [{"image_id": str(i), "check_score": float(s)}
                        for i, s in zip(np.asarray(image_ids)[~passed], scores[~passed])]}


@dataclass
class Scored:
    """A model's predictions of a labelled frame, and what the figures draw from them."""

    probs: np.ndarray
    targets: np.ndarray
    truth: np.ndarray  # malignant or not
    scores: np.ndarray  # the network's probability of malignancy
    p_malignant: np.ndarray  # calibrated


def score(clf, df: pd.DataFrame, tta: bool = False, bs: int | None = None, n_boot: int = N_BOOT,
          prevalences=()) -> tuple[dict, Scored]:
    """Predict a labelled frame with a loaded model and measure it: (metrics, predictions)."""
    prevalences = check_prevalences(prevalences)  # before the long prediction
    probs, targets, check_scores = clf.predict_checked(df, tta=tta, bs=bs)
    calibration, threshold, groups = clf.calibration, clf.threshold, lesion_groups(df)
    metrics = classification_metrics(probs, targets, clf.classes, threshold, dx=df["dx"].to_numpy(), n_boot=n_boot,
                                     groups=groups, calibration=calibration)
    rule = clf.card.threshold_rule or f"{clf.threshold} (no rule recorded in the model card)"
    metrics.update(threshold_rule=rule, tta=tta, model=str(clf.path), calibration=calibration,
                   test_source=clf.card.test_source)
    truth, scores = malignant_scores(probs, targets, clf.classes)
    p_mal = calibrate(scores, calibration)
    if isinstance(rule, dict) and "target_sensitivity" in rule:
        metrics["target"] = target_met(truth, p_mal, threshold, rule["target_sensitivity"], n_boot, groups=groups)
    if metrics["auroc"] is not None:
        metrics["net_benefit"] = _net_benefit_at(truth, p_mal, threshold)
    if groups is not None:
        metrics["by_lesion"] = lesion_metrics(groups, truth, p_mal, threshold, n_boot)
    if prevalences:
        metrics["at_prevalence"] = at_prevalence(truth, p_mal, threshold, prevalences, n_boot, groups=groups)
    if check_scores is not None:
        metrics["dermoscopy_check"] = check_metrics(clf.check, check_scores, truth, p_mal, df["image_id"])
    subgroups = subgroup_metrics(df, truth, p_mal, threshold, n_boot=n_boot, groups=groups)
    if subgroups:
        metrics["subgroups"] = subgroups
    return metrics, Scored(probs, targets, truth, scores, p_mal)


def figures(clf, df: pd.DataFrame, metrics: dict, scored: Scored, gradcam_images: int = 8) -> dict:
    """The figures of `score`'s results, by file name."""
    classes, threshold, calibration = clf.classes, clf.threshold, clf.calibration
    truth, p_mal = scored.truth, scored.p_malignant
    preds = predicted_classes(scored.probs, classes, threshold, calibration)
    rule = f"at threshold {threshold:.3f}" if task_of(classes) == "binary" else "most likely diagnosis"
    out = {"confusion.png": plot_confusion(scored.targets, preds, classes, title=f"Confusion matrix, {rule}"),
           "top_losses.png": plot_top_losses(df, scored.probs, scored.targets, classes, preds=preds)}
    if metrics["auroc"] is not None:  # curves need both classes
        out.update({"roc.png": plot_roc(truth, p_mal, threshold), "pr.png": plot_pr(truth, p_mal),
                    "reliability.png": plot_reliability(truth, p_mal,
                                                        uncalibrated=None if calibration is None else scored.scores),
                    "threshold.png": plot_threshold(truth, p_mal, threshold),
                    "decision_curve.png": plot_decision_curve(truth, p_mal, threshold)})
    if metrics.get("by_lesion"):
        out["lesions.png"] = plot_lesions(metrics["by_lesion"])
    if metrics.get("subgroups"):
        overall_gap = calibration_in_the_large(truth, p_mal, n_boot=0)["calibration_gap"]
        out["subgroups.png"] = plot_subgroups(metrics["subgroups"], {**metrics, "calibration_gap": overall_gap})
    if gradcam_images:
        picks = np.argsort(-p_mal)[:gradcam_images]  # the images the model finds most malignant
        out["gradcam.png"] = plot_gradcam_grid(
            clf.learn, [df.iloc[i]["path"] for i in picks],
            [f"{df.iloc[i]['image_id']} ({df.iloc[i]['dx']}), p {p_mal[i]:.2f}" for i in picks], model=clf.model)
    return out


def write(out_dir: str | Path, result: dict, figs: dict, name: str) -> dict:
    """Save `figs` as PNG and `result` (with the plots' names) as OUT/`name`, each atomically; return `result`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for file, fig in figs.items():
        save_figure(fig, out_dir / file)
    result["plots"] = sorted(figs)
    write_json_atomic(out_dir / name, result)
    return result


def evaluate(clf, df: pd.DataFrame, out_dir: str | Path, tta: bool = False, bs: int | None = None, n_boot: int = N_BOOT,
             gradcam_images: int = 8, prevalences=()) -> dict:
    """Predict a labelled frame with a loaded model, write OUT/metrics.json and the PNG plots, return the metrics.

    Given `prevalences`, the metrics also hold PPV and NPV at each (`at_prevalence`).
    """
    metrics, scored = score(clf, df, tta, bs, n_boot, prevalences)
    return write(out_dir, metrics, figures(clf, df, metrics, scored, gradcam_images), "metrics.json")


# --- two models -----------------------------------------------------------------------------------

def read_paired_test_split(model_a: str | Path, model_b: str | Path, data_dir: str | Path) -> pd.DataFrame:
    """The test split two models share (recorded beside each), or SkinCancerError naming how they differ."""
    a, b = read_test_split(model_a, data_dir), read_test_split(model_b, data_dir)
    only_a, only_b = set(a["image_id"]) - set(b["image_id"]), set(b["image_id"]) - set(a["image_id"])
    if only_a or only_b:
        split_a, split_b = model_files(model_a)["split"], model_files(model_b)["split"]
        raise SkinCancerError(
            f"{split_a.name} and {split_b.name} test different images ({len(only_a)} only in the first, "
            f"{len(only_b)} only in the second, e.g. {first_few(sorted(only_a or only_b))}): a paired comparison "
            f"needs one test set, and an image tested by one model may have trained the other. Train the second "
            f"with --split-from {split_a}, or compare on other labelled images with --images and --labels.")
    return a


def model_names(clf_a, clf_b) -> tuple[str, str]:
    """What tables and figures call two models: their file names, told apart where they are the same."""
    names = (Path(clf_a.path).stem, Path(clf_b.path).stem)
    return (f"A ({names[0]})", f"B ({names[1]})") if names[0] == names[1] else names


def score_pair(clf_a, clf_b, df: pd.DataFrame, tta: bool = False, bs: int | None = None,
               n_boot: int = N_BOOT) -> tuple[dict, list]:
    """Both models on one labelled frame, B against A, paired: (comparison, each model's truth, p and threshold)."""
    groups, dx = lesion_groups(df), df["dx"].to_numpy()
    scored = []
    for clf in (clf_a, clf_b):
        probs, targets = clf.predict_frame(df, tta=tta, bs=bs)
        metrics = classification_metrics(probs, targets, clf.classes, clf.threshold, dx=dx, n_boot=n_boot,
                                         groups=groups, calibration=clf.calibration)
        metrics.update(model=str(clf.path), task=task_of(clf.classes))
        scored.append((*malignant_scores(probs, targets, clf.classes, clf.calibration), clf.threshold, metrics))
    (truth, p_a, t_a, m_a), (_, p_b, t_b, m_b) = scored
    paired = paired_bootstrap(truth, p_a, p_b, t_a, t_b, n_boot=n_boot, groups=groups)
    result = {"a": m_a, "b": m_b, "difference": paired, "n": int(len(df)), "n_malignant": int(truth.sum()),
              "tta": tta, "names": list(model_names(clf_a, clf_b))}
    if groups is not None:  # each lesion called once, on the mean probability of its photos, by each model
        (y_lesion, pa_lesion, _), (_, pb_lesion, _) = (lesion_scores(groups, truth, p) for p in (p_a, p_b))
        lesions = np.unique(groups)  # one id a lesion, in lesion_scores' order: each lesion its own group
        result["by_lesion"] = {"n_lesions": len(y_lesion), "n_malignant": int(y_lesion.sum()),
                               "difference": paired_bootstrap(y_lesion, pa_lesion, pb_lesion, t_a, t_b, n_boot,
                                                              groups=lesions)}
    exchanges = sorted({t for t in (t_a, t_b) if 0 < t < 1})  # the exchange each model's threshold implies
    if exchanges and truth.any():
        result["net_benefit"] = paired_net_benefit(truth, p_a, p_b, exchanges, n_boot=n_boot, groups=groups)
    subgroups = paired_subgroup_metrics(df, truth, p_a, p_b, t_a, t_b, n_boot=n_boot, groups=groups)
    if subgroups:
        result["subgroups"] = subgroups
    return result, [(truth, p_a, t_a), (truth, p_b, t_b)]


def comparison_figures(result: dict, curves: list) -> dict:
    """The figures of `score_pair`'s result: ROC and decision curves with the differences; B - A by subgroup."""
    names = tuple(result["names"])
    fig, axes = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw=dict(width_ratios=[1, 1.2, 1.3]))
    if result["a"]["auroc"] is not None:
        for name, (truth, p, t) in zip(names, curves):
            plot_roc(truth, p, t, ax=axes[0], name=name)
            plot_decision_curve(truth, p, t, ax=axes[1], name=name)
    else:
        for ax in axes[:2]:
            ax.set_axis_off()
            ax.set_title("no curves: the images hold one class only")
    plot_paired_differences(result["difference"], names, ax=axes[2])
    fig.tight_layout()
    out = {"comparison.png": fig}
    if result.get("subgroups"):
        out["comparison_subgroups.png"] = plot_subgroups(
            result["subgroups"], {k: result["difference"][k]["difference"] for k in PAIRED}, names=names)
    return out


def compare(clf_a, clf_b, df: pd.DataFrame, out_dir: str | Path, tta: bool = False, bs: int | None = None,
            n_boot: int = N_BOOT) -> dict:
    """Two loaded models on one labelled frame: OUT/comparison.json and its plots, B against A, paired.

    Where the images carry HAM10000's metadata, the difference is also given by subgroup (`paired_subgroup_metrics`).
    """
    result, curves = score_pair(clf_a, clf_b, df, tta, bs, n_boot)
    return write(out_dir, result, comparison_figures(result, curves), "comparison.json")
