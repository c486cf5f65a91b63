"""Honest evaluation of exported models on labelled images: predict, score (`metrics`), by subgroup and lesion by
lesion, plot, write metrics.json; and two models compared, paired."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .calibration import calibrate
from .data import (MALIGNANT_DX, add_labels, attach_paths, index_files, is_onehot, onehot_to_dx, read_metadata,
                   read_table, task_of, validate_metadata)
from .errors import SkinCancerError, first_few
from .files import model_files, write_json_atomic
from .metrics import (PAIRED, at_prevalence, bootstrap_intervals, calibration_in_the_large, call_statistics,
                      check_prevalences, classification_metrics, lesion_metrics, lesion_scores, malignant_scores,
                      net_benefit, paired_bootstrap, paired_net_benefit, predicted_classes)
from .plotting import pyplot, save_figure


# --- subgroups -----------------------------------------------------------------------------------

# Metadata describing the patient, the lesion or how its diagnosis was made (HAM10000's columns, where a set has
# them): a model can fail in one subgroup while its overall numbers look fine, which is why the ISIC AI working
# group's reporting checklist (CLEAR Derm, Daneshjou et al., JAMA Dermatology 2022) asks for results by subgroup.
# `photos` is not a column of the metadata but how many of the evaluated images show the image's lesion (from
# `lesion_id`): HAM10000 photographed some lesions several times, and not at random (more often the malignant ones).
SUBGROUPS = {"sex": "sex", "age": "age", "localization": "site", "dx_type": "confirmed by", "dataset": "source",
             "photos": "photos of lesion"}
AGE_BANDS = (0, 30, 45, 60, 75)  # HAM10000 records ages in steps of 5 years
AGE_BAND_NAMES = [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_BANDS, AGE_BANDS[1:])] + [f"{AGE_BANDS[-1]}+"]
PHOTO_COUNTS = ["1", "2", "3+"]
DERIVED_FROM = {"photos": "lesion_id"}  # subgroups not read from a column of their own name
ORDERED = {"age": AGE_BAND_NAMES, "photos": PHOTO_COUNTS}  # subgroups listed in this order, not by size
# Fewer cases than this make a rate or an AUROC, and a bootstrap interval of it, meaningless: 2 of 3 malignant
# caught is not a sensitivity of 0.67, and resampling 3 cases gives degenerate intervals.
MIN_CASES = 10
CALIBRATION_KEYS = ("mean_probability", "share_malignant", "calibration_gap", "calibration_gap_ci95")


def subgroup_labels(df: pd.DataFrame, column: str) -> pd.Series:
    """Each image's subgroup under a SUBGROUPS column, as text: ages in bands of 15 years, 'unknown' where missing.

    For `photos`, the number of images in `df` of the image's lesion: 1, 2 or 3+.
    """
    if column == "photos":
        ids = df["lesion_id"].astype(str).str.strip().where(df["lesion_id"].notna(), "")
        counts = ids.map(ids.value_counts())
        return counts.map(lambda n: PHOTO_COUNTS[min(n, 3) - 1]).where(ids != "", "unknown")
    if column != "age":
        return df[column].astype(str).str.strip().replace({"": "unknown", "nan": "unknown"})
    age = pd.to_numeric(df[column], errors="coerce")
    bands = pd.cut(age, [*AGE_BANDS, np.inf], right=False, labels=AGE_BAND_NAMES)
    return bands.astype(object).where(bands.notna(), "unknown")


def _subgroup_order(labels: np.ndarray, column: str) -> list[str]:
    """Ages and photo counts in order, other subgroups from the largest; 'unknown' last."""
    values, counts = np.unique(labels, return_counts=True)
    if column in ORDERED:
        known = [v for v in ORDERED[column] if v in values]
    else:
        known = [v for _, v in sorted(zip(-counts, values)) if v != "unknown"]
    return known + (["unknown"] if "unknown" in values else [])


def subgroup_metrics(df: pd.DataFrame, is_malignant, p_malignant, threshold: float, n_boot: int = 1000,
                     seed: int = 0, groups=None) -> list[dict]:
    """AUROC, sensitivity and specificity at `threshold`, and calibration, within each subgroup of SUBGROUPS' columns.

    One row a subgroup, with 95% bootstrap intervals from draws within it (whole lesions where `groups` are given).
    A statistic is None where its subgroup holds fewer than MIN_CASES of the images it counts: sensitivity needs
    malignant ones, specificity benign ones, AUROC both, calibration (`calibration_in_the_large`) any. Columns with
    fewer than two known subgroups are left out.
    """
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    _check_lengths(df, y, p)
    groups = None if groups is None else np.asarray(groups)
    rows = []
    for row, inside, enough in _subgroups(df, y):
        yk, pk = y[inside], p[inside]
        stat = call_statistics(yk, pk, threshold, np.ones((1, len(yk))))
        within = None if groups is None else groups[inside]
        ci: dict[str, Any] = (bootstrap_intervals(yk, pk, threshold, n_boot, seed, groups=within)
                              if any(enough.values()) else {})
        calibration = dict.fromkeys(CALIBRATION_KEYS)
        if row["n"] >= MIN_CASES:
            calibration = calibration_in_the_large(yk, pk, n_boot, seed, groups=within)
        rows.append({**row, **{k: float(stat[k][0]) if ok else None for k, ok in enough.items()},
                     **{f"{k}_ci95": list(ci[k]) if ok and ci[k] else None for k, ok in enough.items()},
                     **calibration})
    return rows


def paired_subgroup_metrics(df: pd.DataFrame, is_malignant, p_a, p_b, threshold_a: float, threshold_b: float,
                            n_boot: int = 1000, seed: int = 0, groups=None) -> list[dict]:
    """Model B against model A within each subgroup of `subgroup_metrics`: B - A and its paired interval.

    One row a subgroup, with the `paired_bootstrap` of its images (whole lesions where `groups` are given): AUROC,
    and sensitivity and specificity at each model's own threshold, as B - A with its 95% interval under the
    statistic's name and each model's value under `NAME_a` and `NAME_b`. None where the subgroup has too few cases.
    """
    y = np.asarray(is_malignant, dtype=bool)
    p_a, p_b = (np.asarray(p, dtype=np.float64) for p in (p_a, p_b))
    _check_lengths(df, y, p_a, p_b)
    groups = None if groups is None else np.asarray(groups)
    rows = []
    for row, inside, enough in _subgroups(df, y):
        paired = {}
        if any(enough.values()):
            paired = paired_bootstrap(y[inside], p_a[inside], p_b[inside], threshold_a, threshold_b, n_boot, seed,
                                      groups=None if groups is None else groups[inside])
        for k, ok in enough.items():
            r = paired[k] if ok else dict.fromkeys(("difference", "ci", "a", "b"))
            row.update({k: r["difference"], f"{k}_ci95": r["ci"], f"{k}_a": r["a"], f"{k}_b": r["b"]})
        rows.append(row)
    return rows


def _check_lengths(df: pd.DataFrame, y: np.ndarray, *probabilities: np.ndarray) -> None:
    if any(len(v) != len(df) for v in (y, *probabilities)):
        raise SkinCancerError(f"{len(df)} images, {len(y)} truths and "
                              f"{' and '.join(str(len(p)) for p in probabilities)} probabilities do not match")


def _subgroups(df: pd.DataFrame, y: np.ndarray):
    """(row, mask, enough) for each subgroup of the SUBGROUPS columns `df` has, in order.

    `row` starts a result row (column, subgroup, n, n_malignant); `enough` says which of AUROC, sensitivity and
    specificity have MIN_CASES of the cases they count. Columns with fewer than two known subgroups are left out.
    """
    for column in [c for c in SUBGROUPS if DERIVED_FROM.get(c, c) in df.columns]:
        labels = subgroup_labels(df, column).to_numpy(dtype=str)
        order = _subgroup_order(labels, column)
        if len([v for v in order if v != "unknown"]) < 2:
            continue
        for name in order:
            inside = labels == name
            n_pos, n_neg = int(y[inside].sum()), int((~y[inside]).sum())
            enough = {"auroc": min(n_pos, n_neg) >= MIN_CASES, "sensitivity": n_pos >= MIN_CASES,
                      "specificity": n_neg >= MIN_CASES}
            yield {"column": column, "subgroup": name, "n": int(inside.sum()), "n_malignant": n_pos}, inside, enough


def subgroup_table(rows: list[dict], difference: bool = False) -> str:
    """A short text table of `subgroup_metrics` (or, with `difference`, of `paired_subgroup_metrics`), a line each."""
    def cell(row, k, signed=difference, digits=3 if difference else 2):
        v, ci = row[k], row[f"{k}_ci95"]
        if v is None:
            return "too few"
        form, to = (f"+.{digits}f", " to ") if signed else (f".{digits}f", "-")
        return f"{v:{form}} ({ci[0]:{form}}{to}{ci[1]:{form}})" if ci else f"{v:{form}}"

    width, of = (26, " (B - A)") if difference else (18, "")
    gap = not difference and any("calibration_gap" in row for row in rows)
    lines = [f"  {'':<30}{'n':>5} {'mal.':>5}  {'AUROC' + of:<{width}}{'sensitivity' + of:<{width}}"
             + (f"{'specificity':<{width}}mean p - share malignant" if gap else f"specificity{of}")]
    for row in rows:
        name = f"{SUBGROUPS[row['column']]}: {row['subgroup']}"
        lines.append(f"  {name[:30]:<30}{row['n']:>5} {row['n_malignant']:>5}  {cell(row, 'auroc'):<{width}}"
                     f"{cell(row, 'sensitivity'):<{width}}"
                     + (f"{cell(row, 'specificity'):<{width}}{cell(row, 'calibration_gap', signed=True)}" if gap
                        else cell(row, "specificity")))
    where = "at each model's own threshold" if difference else "at the threshold"
    lines.append(f"  ({where}; 95% intervals; 'too few': under {MIN_CASES} of the cases a statistic counts)")
    return "\n".join(lines)


# --- labelled images -----------------------------------------------------------------------------

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


# --- predictions ---------------------------------------------------------------------------------

def predict_frame(learn, df: pd.DataFrame, tta: bool = False, bs: int = 64,
                  model=None) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and targets for a frame with `path` and `dx`, through the learner's validation pipeline.

    With `model` (a loaded model's `Classifier.model`), the batches go through it, not `learn.model`; with `tta`,
    fastai's `learn.tta` does (its augmented passes and their mix with the plain one).
    """
    from .predict import batch_preds, lent_model

    dl = learn.dls.test_dl(add_labels(df, task_of(learn.dls.vocab)), with_labels=True, bs=bs)
    metrics, learn.metrics = learn.metrics, []  # computed here from the predictions, not by fastai per pass
    try:
        if tta:
            with lent_model(learn, learn.model if model is None else model):
                probs, targets = learn.tta(dl=dl)
        elif model is not None:
            probs, targets = batch_preds(learn, dl, model, show_progress=True)
        else:
            with learn.no_bar():
                probs, targets = learn.get_preds(dl=dl)
    finally:
        learn.metrics = metrics
    return probs.float().numpy(), targets.numpy()


def predict_loaded(clf, df: pd.DataFrame, tta: bool = False, bs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`predict_frame` for a loaded model: through its inference copy, at its batch size unless `bs` is given."""
    return predict_frame(clf.learn, df, tta=tta, bs=bs or clf.batch_size, model=clf.model)


# --- plots ---------------------------------------------------------------------------------------

def plot_roc(is_malignant, p_malignant, threshold: float | None = None, ax=None, name: str | None = None):
    """ROC curve of malignant vs benign, with the operating point marked; `name` labels it among others on `ax`."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 5))
    fpr, tpr, _ = roc_curve(is_malignant, p_malignant)
    if not ax.lines:  # the chance line, once
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    prefix = f"{name}: " if name else ""
    line, = ax.plot(fpr, tpr, label=f"{prefix}AUROC {roc_auc_score(is_malignant, p_malignant):.3f}")
    if threshold is not None:
        said = np.asarray(p_malignant) >= threshold
        y = np.asarray(is_malignant, dtype=bool)
        ax.plot(said[~y].mean(), said[y].mean(), "o", color=line.get_color() if name else "crimson",
                label=f"{prefix}threshold {threshold:.3f}")
    ax.set(xlabel="1 - specificity (false positive rate)", ylabel="sensitivity (true positive rate)",
           title="ROC: malignant vs benign")
    ax.legend(loc="lower right")
    return fig


def plot_pr(is_malignant, p_malignant, ax=None):
    """Precision-recall curve of malignant, with the prevalence as the chance line."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 5))
    prec, rec, _ = precision_recall_curve(is_malignant, p_malignant)
    ax.plot(rec, prec, label=f"AP {average_precision_score(is_malignant, p_malignant):.3f}")
    ax.axhline(np.mean(is_malignant), ls="--", color="grey", lw=1, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall: malignant",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right")
    return fig


def plot_confusion(targets, preds, classes, ax=None, title: str = "Confusion matrix"):
    """Confusion matrix, rows the truth: counts, coloured by the share of each row (classes are far from balanced)."""
    from sklearn.metrics import confusion_matrix

    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(1.2 * len(classes) + 2,) * 2)
    cm = confusion_matrix(targets, preds, labels=list(range(len(classes))))
    # coloured by counts, nv's 1,000 images would wash out every other row
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="actual", title=f"{title}\n(count and share of the actual class)")
    return fig


def _reliability_curve(y: np.ndarray, p: np.ndarray, bins: int) -> tuple[list, list, list]:
    """(mean probability, share malignant, count) of each non-empty bin of equal width."""
    which = np.clip(np.digitize(p, np.linspace(0, 1, bins + 1)[1:-1]), 0, bins - 1)
    kept = [b for b in range(bins) if (which == b).any()]
    return ([p[which == b].mean() for b in kept], [y[which == b].mean() for b in kept],
            [int((which == b).sum()) for b in kept])


def plot_reliability(is_malignant, p_malignant, bins: int = 10, ax=None, uncalibrated=None):
    """Calibration: observed frequency of malignancy against predicted probability, by bin (and before calibration)."""
    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 5))
    y, p = np.asarray(is_malignant, dtype=float), np.asarray(p_malignant, dtype=float)
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    if uncalibrated is not None:
        raw = np.asarray(uncalibrated, dtype=float)
        mean_p, freq, _ = _reliability_curve(y, raw, bins)
        ax.plot(mean_p, freq, "s:", color="darkorange", alpha=0.8,
                label=f"network's scores (Brier {np.mean((raw - y) ** 2):.3f})")
    mean_p, freq, count = _reliability_curve(y, p, bins)
    name = "calibrated on valid" if uncalibrated is not None else "model"
    ax.plot(mean_p, freq, "o-", color="tab:blue", label=f"{name} (Brier {np.mean((p - y) ** 2):.3f})")
    for x, f, c in zip(mean_p, freq, count):
        # counts below their points, but above those near the axis, where they would sit on its tick labels
        ax.annotate(str(c), (x, f), textcoords="offset points", xytext=(4, 4 if f < 0.08 else -10), fontsize=7)
    ax.set(xlabel="predicted probability of malignancy", ylabel="observed fraction malignant",
           title="Reliability (n per bin)", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_threshold(is_malignant, p_malignant, threshold: float | None = None, ax=None):
    """Sensitivity and specificity as the threshold moves, with the operating threshold marked."""
    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=float)
    ts = np.linspace(0, 1, 201)
    ax.plot(ts, [(p[y] >= t).mean() if y.any() else np.nan for t in ts], label="sensitivity")
    ax.plot(ts, [(p[~y] < t).mean() if (~y).any() else np.nan for t in ts], label="specificity")
    if threshold is not None:
        ax.axvline(threshold, color="crimson", ls="--", lw=1, label=f"operating threshold {threshold:.3f}")
    ax.set(xlabel="threshold on the probability of malignancy", ylabel="rate", ylim=(0, 1.02),
           title="Sensitivity and specificity against threshold")
    ax.legend(loc="lower left")
    return fig


def plot_decision_curve(is_malignant, p_malignant, threshold: float | None = None, ax=None, name: str | None = None):
    """Net benefit against the threshold probability, beside biopsying all lesions and none (a decision curve).

    Drawn on an `ax` that holds one already, a second model's curve (`name`) joins it.
    """
    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 4))
    y = np.asarray(is_malignant, dtype=bool)
    ts = np.linspace(0.01, 0.6, 119)
    prevalence = y.mean()
    model = net_benefit(y, p_malignant, ts)
    first = not any(line.get_label() == "biopsy all" for line in ax.get_lines())
    line, = ax.plot(ts, model, label=name or "biopsy where the model's probability reaches the threshold")
    if first:
        ax.plot(ts, net_benefit(y, np.ones(len(y)), ts), color="grey", label="biopsy all")
        ax.axhline(0, color="black", lw=1, label="biopsy none")
    if threshold is not None and 0 < threshold < 1:
        ax.axvline(threshold, color="crimson" if name is None else line.get_color(), ls="--", lw=1,
                   label=f"{'operating' if name is None else 'its'} threshold {threshold:.3f} "
                         f"(1 malignancy = {1 / threshold - 1:.1f} benign)")
    ax.set(xlabel="threshold probability (the risk at which a biopsy is worth it)",
           ylabel="net benefit (malignancies found per person)", ylim=(-0.05, max(prevalence, 0.01) * 1.15),
           title=f"Decision curve (at this set's prevalence, {prevalence:.1%})")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_paired_differences(paired: dict, names: tuple[str, str] = ("A", "B"), ax=None):
    """B - A for each statistic of a `paired_bootstrap`, with its interval, against the line of no difference."""
    plt = pyplot()
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6, 3.5))
    rows = [k for k in PAIRED if paired[k]["ci"] is not None]
    labels = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy"}
    for i, k in enumerate(rows):
        d, (lo, hi) = paired[k]["difference"], paired[k]["ci"]
        colour = "grey" if lo <= 0 <= hi else "seagreen" if lo > 0 else "crimson"
        ax.errorbar(d, i, xerr=[[d - lo], [hi - d]], fmt="o", color=colour, capsize=4)
        ax.annotate(f"{d:+.3f} ({lo:+.3f} to {hi:+.3f})", (d, i), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [labels.get(k, k) for k in rows])
    ax.set_ylim(len(rows) - 0.3, -0.6)  # AUROC on top
    ax.set(xlabel=f"{names[1]} - {names[0]}",
           title=f"Paired differences, {round(100 * paired['level'])}% interval ({paired['resampled']} resampled)")
    return fig


LESION_SIDES = ("one photo", "all photos")
LESION_COUNTS = {"each_photo": "each photo (the usual count)", "one_photo": "one photo of each lesion",
                 "all_photos": "each lesion on all its photos"}


def plot_lesions(by_lesion: dict):
    """`lesion_metrics` drawn: each statistic counted photo by photo and lesion by lesion, and all photos - one."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[1.2, 1]))
    names = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy"}
    for j, (side, label) in enumerate(LESION_COUNTS.items()):
        values = by_lesion[side]
        for i, k in enumerate(PAIRED):
            v, ci = values[k], values[f"{k}_ci95"]
            if v is None:
                continue
            xerr = [[v - ci[0]], [ci[1] - v]] if ci else None
            axes[0].errorbar(v, i + 0.22 * (j - 1), xerr=xerr, fmt="o", color=f"C{j}", capsize=3,
                             label=label if i == 0 else None)
    axes[0].set_yticks(range(len(PAIRED)), [names.get(k, k) for k in PAIRED])
    axes[0].set_ylim(len(PAIRED) - 0.5, -0.5)
    axes[0].legend(loc="lower left", fontsize=8)
    axes[0].set(xlabel="value (95% interval, lesions resampled)",
                title=f"{by_lesion['n_photos']} photos of {by_lesion['n_lesions']} lesions, counted three ways")
    plot_paired_differences(by_lesion["difference"], LESION_SIDES, ax=axes[1])
    axes[1].set_title("Each lesion on all its photos - on one")
    fig.tight_layout()
    return fig


def plot_subgroups(rows: list[dict], overall: dict | None = None, names: tuple[str, str] | None = None):
    """A forest plot of `subgroup_metrics`: AUROC, sensitivity and specificity with their intervals, by subgroup.

    Dashed lines mark the `overall` values (a dict of them) each subgroup is read against. Given the two models'
    `names`, the rows are a `paired_subgroup_metrics` and the plot shows B - A against the line of no difference.
    """
    plt = pyplot()
    stats = {"auroc": "AUROC", "sensitivity": "sensitivity at the threshold",
             "specificity": "specificity at the threshold"}
    gap = names is None and any("calibration_gap" in row for row in rows)
    if gap:
        stats["calibration_gap"] = "mean probability - share malignant"
    # a header line for each column, then a line for each of its subgroups
    labels: list[str] = []
    where: list[int] = []
    headers: list[int] = []
    for i, row in enumerate(rows):
        if i == 0 or row["column"] != rows[i - 1]["column"]:
            headers.append(len(labels))
            labels.append(SUBGROUPS[row["column"]])
        where.append(len(labels))
        labels.append(f"{row['subgroup']}  (n {row['n']}, {row['n_malignant']} malignant)")
    y = len(labels)

    def reach(keys):  # a symmetric scale about 0 that holds every value and interval of `keys`
        ends = [abs(x) for row in rows for k in keys for x in [row[k], *(row[f"{k}_ci95"] or [])] if x is not None]
        return 1.1 * max(ends, default=0.1)

    differences = reach([k for k in stats if k != "calibration_gap"])
    fig, axes = plt.subplots(1, len(stats), figsize=(5 * len(stats), 1.0 + 0.24 * y), sharey=True)
    for ax, (k, title) in zip(axes, stats.items()):
        centred = names is not None or k == "calibration_gap"  # differences, read against 0
        for row, row_y in zip(rows, where):
            v, ci = row[k], row[f"{k}_ci95"]
            if v is None:
                continue
            colour = "tab:blue"
            if centred and ci:
                colour = "grey" if ci[0] <= 0 <= ci[1] else "seagreen" if ci[0] > 0 else "crimson"
                if k == "calibration_gap" and colour != "grey":
                    colour = "darkorange"  # probabilities off in either direction: neither is good
            err = [[v - ci[0]], [ci[1] - v]] if ci else None
            ax.errorbar(v, row_y, xerr=err, fmt="o", ms=4, color=colour, ecolor=colour, capsize=2, lw=1)
        if overall is not None and overall.get(k) is not None:
            ax.axvline(overall[k], color="grey", ls="--", lw=1,
                       label=f"all images {overall[k]:{'+' if centred else ''}.3f}")
            ax.legend(loc="lower left", fontsize=8)
        if not centred:
            ax.set(xlim=(0, 1.02), title=title)
        else:
            ax.axvline(0, color="black", lw=1)
            scale = reach([k]) if k == "calibration_gap" else differences
            ax.set(xlim=(-scale, scale), title=title if k == "calibration_gap" else f"{title}: B - A")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(y), labels, fontsize=8)
    for i in headers:
        axes[0].get_yticklabels()[i].set_fontweight("bold")
    axes[0].set_ylim(y - 0.5, -0.5)
    fig.suptitle("By subgroup: the malignant call, with 95% intervals (wide where a subgroup is small)" if names is None
                 else f"By subgroup: {names[1]} - {names[0]}, paired, with 95% intervals")
    fig.tight_layout()
    return fig


def _thumb(path: str, size: int = 160):
    from PIL import Image

    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    return img


def plot_top_losses(df: pd.DataFrame, probs, targets, classes, k: int = 9, preds=None):
    """The `k` images with the highest cross-entropy, with truth and prediction (`preds`, else the top class)."""
    plt = pyplot()
    probs, targets = np.asarray(probs), np.asarray(targets)
    preds = probs.argmax(axis=1) if preds is None else np.asarray(preds)
    losses = -np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, 1))
    order = np.argsort(-losses)[:k]
    cols = 3
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order):
        row = df.iloc[i]
        ax.imshow(_thumb(row["path"]))
        pred = int(preds[i])
        ax.set_title(f"{row['image_id']} ({row['dx']})\nactual {classes[targets[i]]}, predicted {classes[pred]}\n"
                     f"loss {losses[i]:.2f}, p(actual) {probs[i, targets[i]]:.2f}", fontsize=8)
    fig.suptitle("Top losses")
    fig.tight_layout()
    return fig


# --- the whole evaluation ------------------------------------------------------------------------

def lesion_groups(df: pd.DataFrame):
    """Each image's lesion_id for a lesion-level bootstrap, or None where the frame has no usable lesion ids."""
    if "lesion_id" not in df.columns or df["lesion_id"].isna().any():
        return None
    return df["lesion_id"].astype(str).to_numpy()


def _net_benefit_at(y: np.ndarray, p: np.ndarray, threshold: float) -> dict | None:
    """The model's net benefit at its operating threshold beside biopsying all lesions, or None out of (0, 1)."""
    if not 0 < threshold < 1:
        return None
    return {"threshold": threshold, "benign_per_malignancy": 1 / threshold - 1,
            "model": float(net_benefit(y, p, [threshold])[0]),
            "biopsy_all": float(net_benefit(y, np.ones(len(y)), [threshold])[0])}


def evaluate(clf, df: pd.DataFrame, out_dir: str | Path, tta: bool = False, bs: int | None = None, n_boot: int = 1000,
             gradcam_images: int = 8, prevalences=()) -> dict:
    """Predict a labelled frame with a loaded model, write OUT/metrics.json and the PNG plots, return the metrics.

    Given `prevalences`, the metrics also hold PPV and NPV at each (`at_prevalence`).
    """
    from .gradcam import plot_gradcam_grid

    prevalences = check_prevalences(prevalences)  # before the long prediction
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classes = clf.classes
    probs, targets = predict_loaded(clf, df, tta=tta, bs=bs)
    calibration = clf.calibration
    groups = lesion_groups(df)
    metrics = classification_metrics(probs, targets, classes, clf.threshold, dx=df["dx"].to_numpy(), n_boot=n_boot,
                                     groups=groups, calibration=calibration)
    card = clf.card
    metrics["threshold_rule"] = card.get("threshold_rule", "0.5 (no rule recorded in the model card)")
    metrics["tta"] = tta
    metrics["model"] = str(clf.path)
    metrics["calibration"] = calibration
    truth, scores = malignant_scores(probs, targets, classes)
    p_mal = calibrate(scores, calibration)
    preds = predicted_classes(probs, classes, clf.threshold, calibration)
    rule = f"at threshold {clf.threshold:.3f}" if task_of(classes) == "binary" else "most likely diagnosis"
    figures = {"confusion.png": plot_confusion(targets, preds, classes, title=f"Confusion matrix, {rule}"),
               "top_losses.png": plot_top_losses(df, probs, targets, classes, preds=preds)}
    if metrics["auroc"] is not None:  # curves need both classes
        figures.update({"roc.png": plot_roc(truth, p_mal, clf.threshold), "pr.png": plot_pr(truth, p_mal),
                        "reliability.png": plot_reliability(
                            truth, p_mal, uncalibrated=None if calibration is None else scores),
                        "threshold.png": plot_threshold(truth, p_mal, clf.threshold),
                        "decision_curve.png": plot_decision_curve(truth, p_mal, clf.threshold)})
        metrics["net_benefit"] = _net_benefit_at(truth, p_mal, clf.threshold)
    if groups is not None:
        metrics["by_lesion"] = lesion_metrics(groups, truth, p_mal, clf.threshold, n_boot)
        figures["lesions.png"] = plot_lesions(metrics["by_lesion"])
    if prevalences:
        metrics["at_prevalence"] = at_prevalence(truth, p_mal, clf.threshold, prevalences, n_boot, groups=groups)
    subgroups = subgroup_metrics(df, truth, p_mal, clf.threshold, n_boot=n_boot, groups=groups)
    if subgroups:
        metrics["subgroups"] = subgroups
        overall_gap = calibration_in_the_large(truth, p_mal, n_boot=0)["calibration_gap"]
        figures["subgroups.png"] = plot_subgroups(subgroups, {**metrics, "calibration_gap": overall_gap})
    if gradcam_images:
        picks = np.argsort(-p_mal)[:gradcam_images]  # the images the model finds most malignant
        figures["gradcam.png"] = plot_gradcam_grid(clf.learn, [df.iloc[i]["path"] for i in picks],
                                                   [f"{df.iloc[i]['image_id']} ({df.iloc[i]['dx']})" for i in picks])
    for name, fig in figures.items():
        save_figure(fig, out_dir / name)
    metrics["plots"] = sorted(figures)
    write_json_atomic(out_dir / "metrics.json", metrics)
    return metrics


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


def compare(clf_a, clf_b, df: pd.DataFrame, out_dir: str | Path, tta: bool = False, bs: int | None = None,
            n_boot: int = 1000) -> dict:
    """Two loaded models on one labelled frame: OUT/comparison.json and its plots, B against A, paired.

    Where the images carry HAM10000's metadata, the difference is also given by subgroup (`paired_subgroup_metrics`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = (Path(clf_a.path).stem, Path(clf_b.path).stem)
    if names[0] == names[1]:
        names = (f"A ({names[0]})", f"B ({names[1]})")
    groups, dx = lesion_groups(df), df["dx"].to_numpy()
    scored = []
    for clf in (clf_a, clf_b):
        probs, targets = predict_loaded(clf, df, tta=tta, bs=bs)
        metrics = classification_metrics(probs, targets, clf.classes, clf.threshold, dx=dx, n_boot=n_boot,
                                         groups=groups, calibration=clf.calibration)
        metrics.update(model=str(clf.path), task=task_of(clf.classes))
        scored.append((*malignant_scores(probs, targets, clf.classes, clf.calibration), clf.threshold, metrics))
    (truth, p_a, t_a, m_a), (_, p_b, t_b, m_b) = scored
    paired = paired_bootstrap(truth, p_a, p_b, t_a, t_b, n_boot=n_boot, groups=groups)
    result = {"a": m_a, "b": m_b, "difference": paired, "n": int(len(df)), "n_malignant": int(truth.sum()),
              "tta": tta, "names": list(names)}
    if groups is not None:  # each lesion called once, on the mean probability of its photos, by each model
        (y_lesion, pa_lesion, _), (_, pb_lesion, _) = (lesion_scores(groups, truth, p) for p in (p_a, p_b))
        lesions = np.unique(groups)  # one id a lesion, in lesion_scores' order: each lesion its own group
        result["by_lesion"] = {"n_lesions": len(y_lesion), "n_malignant": int(y_lesion.sum()),
                               "difference": paired_bootstrap(y_lesion, pa_lesion, pb_lesion, t_a, t_b, n_boot,
                                                              groups=lesions)}
    exchanges = sorted({t for t in (t_a, t_b) if 0 < t < 1})  # the exchange each model's threshold implies
    if exchanges and truth.any():
        result["net_benefit"] = paired_net_benefit(truth, p_a, p_b, exchanges, n_boot=n_boot, groups=groups)
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(19, 5), gridspec_kw=dict(width_ratios=[1, 1.2, 1.3]))
    if m_a["auroc"] is not None:
        for name, p, t in ((names[0], p_a, t_a), (names[1], p_b, t_b)):
            plot_roc(truth, p, t, ax=axes[0], name=name)
            plot_decision_curve(truth, p, t, ax=axes[1], name=name)
    else:
        for ax in axes[:2]:
            ax.set_axis_off()
            ax.set_title("no curves: the images hold one class only")
    plot_paired_differences(paired, names, ax=axes[2])
    fig.tight_layout()
    figures = {"comparison.png": fig}
    subgroups = paired_subgroup_metrics(df, truth, p_a, p_b, t_a, t_b, n_boot=n_boot, groups=groups)
    if subgroups:
        result["subgroups"] = subgroups
        figures["comparison_subgroups.png"] = plot_subgroups(
            subgroups, {k: paired[k]["difference"] for k in PAIRED}, names=names)
    for name, figure in figures.items():
        save_figure(figure, out_dir / name)
    result["plots"] = sorted(figures)
    write_json_atomic(out_dir / "comparison.json", result)
    return result


# --- printed tables ------------------------------------------------------------------------------

def prevalence_table(rows: list[dict]) -> str:
    """A short text table of `at_prevalence`: PPV and NPV with intervals, and what the call does per 1,000 tested."""
    def cell(row, k):
        v, ci = row[k], row[f"{k}_ci95"]
        return "undefined" if v is None else f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if ci else f"{v:.3f}"

    lines = [f"  {'prevalence':<12}{'PPV':<22}{'NPV':<22}per 1,000 tested"]
    for row in rows:
        n = row["per_1000"]
        lines.append(f"  {row['prevalence']:<12.3g}{cell(row, 'ppv'):<22}{cell(row, 'npv'):<22}"
                     f"{n['found']:.0f} of {n['malignant']:.0f} malignant found, "
                     f"{n['benign_called_malignant']:.0f} benign called malignant")
    return "\n".join(lines)


def metrics_table(metrics: dict) -> str:
    """A short text table of the headline numbers."""
    keys = ["n", "n_malignant", "auroc", "balanced_accuracy", "accuracy", "sensitivity", "specificity", "ppv",
            "npv", "f1", "macro_auroc", "mean_probability", "brier"]
    rows = []
    for k in keys:
        if k not in metrics:
            continue
        v = metrics[k]
        text = "null (undefined)" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
        notes = []
        if k in ("balanced_accuracy", "accuracy") and v is not None:
            notes.append("7 classes, most likely diagnosis" if "macro_auroc" in metrics else "at the threshold")
        if k == "mean_probability" and metrics.get("n"):
            notes.append(f"share malignant {metrics['n_malignant'] / metrics['n']:.4f}")
        if k == "brier" and metrics.get("brier_uncalibrated") is not None:
            notes.append(f"{metrics['brier_uncalibrated']:.4f} before calibration")
        if metrics.get(f"{k}_ci95"):
            by = f", resampling {metrics['ci95_resampled']}" if k == "auroc" and metrics.get("ci95_resampled") else ""
            notes.append(f"95% CI {metrics[f'{k}_ci95'][0]:.4f}-{metrics[f'{k}_ci95'][1]:.4f}{by}")
        rows.append(f"  {k:<18}{text}" + (f"  ({'; '.join(notes)})" if notes else ""))
    rows.append(f"  {'threshold':<18}{metrics['threshold']:.4f} (probability of malignancy)")
    if metrics.get("per_class_recall"):
        rows.append("  recall per class (the predicted class is the true one):")
        rows += [f"    {c:<16}{'null' if r is None else f'{r:.4f}'}" for c, r in metrics["per_class_recall"].items()]
    if metrics.get("per_diagnosis_recall"):
        rows.append("  recall per diagnosis (called malignant or benign rightly at the threshold):")
        rows += [f"    {d:<16}{r:.4f}{'  (malignant)' if d in MALIGNANT_DX else ''}"
                 for d, r in metrics["per_diagnosis_recall"].items()]
    return "\n".join(rows)


def paired_table(paired: dict, names: tuple[str, str] = ("A", "B")) -> list[str]:
    """The lines of a text table of a `paired_bootstrap`: each statistic for A and B, and B - A with its interval."""
    name_a, name_b = names
    width = max(len(name_a), len(name_b), 8)
    level = round(100 * paired["level"])
    how = f" ({level}% CI, {paired['resampled']} resampled), p" if paired["replicates"] > 0 else " (no bootstrap)"
    rows = [f"  {'':<18}{name_a:>{width}} {name_b:>{width}}  B - A{how}"]
    for k in PAIRED:
        r = paired[k]
        if r["difference"] is None:
            rows.append(f"  {k:<18}{'null (undefined)':>{2 * width + 1}}")
            continue
        ci = f" ({r['ci'][0]:+.4f} to {r['ci'][1]:+.4f}), p {r['p_value']:.3f}" if r["ci"] else ""
        rows.append(f"  {k:<18}{r['a']:>{width}.4f} {r['b']:>{width}.4f}  {r['difference']:+.4f}{ci}")
    return rows


def comparison_table(result: dict) -> str:
    """A short text table of a `compare` result: each statistic for A and B, and B - A with its interval."""
    names = tuple(result["names"])
    rows = paired_table(result["difference"], names)
    rows.append(f"  (sensitivity and specificity at each model's own threshold: {result['a']['threshold']:.4f} "
                f"and {result['b']['threshold']:.4f}; n {result['n']}, {result['n_malignant']} malignant)")
    for row in result.get("net_benefit", []):
        ci = f" ({row['ci'][0]:+.4f} to {row['ci'][1]:+.4f}), p {row['p_value']:.3f}" if row["ci"] else ""
        rows.append(f"  net benefit at threshold probability {row['threshold']:.4f} (1 malignancy = "
                    f"{row['benign_per_malignancy']:.1f} benign biopsies): {row['a']:.4f} and {row['b']:.4f}, "
                    f"B - A {row['difference']:+.4f}{ci}")
    if result.get("by_lesion"):
        lesions = result["by_lesion"]
        rows.append(f"  lesion by lesion (each called on the mean probability of its photos; {lesions['n_lesions']} "
                    f"lesions, {lesions['n_malignant']} malignant):")
        rows += paired_table(lesions["difference"], names)
    return "\n".join(rows)



def lesion_table(by_lesion: dict) -> str:
    """A short text table of `lesion_metrics`: one photo of each lesion against all its photos averaged."""
    rows = ["lesion by lesion (one photo of each, drawn at random, against the mean probability of all its photos):"]
    rows += paired_table(by_lesion["difference"], LESION_SIDES)
    each, ci = by_lesion["each_photo"]["auroc"], by_lesion["all_photos"]["auroc_ci95"]
    rows.append(f"  ({by_lesion['n_photos']} photos of {by_lesion['n_lesions']} lesions, {by_lesion['n_malignant']} "
                f"malignant, {by_lesion['lesions_with_several_photos']} with several photos; the call at the "
                f"threshold {by_lesion['threshold']:.4f}"
                + (f"; AUROC photo by photo {each:.4f}" if each is not None else "")
                + (f"; all photos' AUROC 95% CI {ci[0]:.4f}-{ci[1]:.4f})" if ci else ")"))
    return "\n".join(rows)
