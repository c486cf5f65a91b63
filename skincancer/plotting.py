"""Figures for people, each returned for a notebook to show and saved as PNG by `save_figure`: the data set,
training, the evaluation's curves and tables drawn, Grad-CAM, a prediction."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics import average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score, roc_curve

from . import DISCLAIMER
from .data import SPLITS
from .files import atomic_path
from .gradcam import gradcam
from .images import open_image
from .labels import DX_CLASSES, DX_NAMES, MALIGNANT_DX, is_malignant_class
from .metrics import LESION_SIDES, PAIRED, net_benefit
from .subgroups import MIN_CASES, SUBGROUPS
from .tables import interval


def _axes(ax, figsize):
    """(figure, axes): the given axes' figure, or a new figure of `figsize`."""
    return (ax.figure, ax) if ax is not None else plt.subplots(figsize=figsize)


def save_figure(fig, path: str | Path, close: bool = True) -> Path:
    """Save a figure as PNG atomically (and close it unless told not to, e.g. to show it in a notebook)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    if close:
        plt.close(fig)
    return Path(path)


# --- the data set and training ---------------------------------------------------------------------

def plot_diagnoses(df: pd.DataFrame):
    """Images and lesions per diagnosis, malignant ones in red."""
    fig, ax = plt.subplots(figsize=(8, 4))
    images = df["dx"].value_counts().reindex(DX_CLASSES).fillna(0)
    lesions = df.drop_duplicates("lesion_id")["dx"].value_counts().reindex(DX_CLASSES).fillna(0)
    x = np.arange(len(DX_CLASSES))
    colours = ["crimson" if d in MALIGNANT_DX else "steelblue" for d in DX_CLASSES]
    ax.bar(x - 0.2, images, 0.4, color=colours, label="images")
    ax.bar(x + 0.2, lesions, 0.4, color=colours, alpha=0.45, label="lesions")
    for i, n_img in enumerate(images):
        ax.text(i - 0.2, n_img, f"{int(n_img)}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{d}\n{DX_NAMES[d].split(' /')[0]}" for d in DX_CLASSES], fontsize=7)
    ax.set(ylabel="count", yscale="log",
           title=f"{len(df)} images of {df['lesion_id'].nunique()} lesions (red: malignant)")
    ax.legend()
    return fig


def plot_demographics(df: pd.DataFrame):
    """Age, sex and body site of benign and malignant lesions."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    lesions = df.drop_duplicates("lesion_id")
    malignant = lesions["dx"].isin(MALIGNANT_DX)
    age = pd.to_numeric(lesions.get("age", pd.Series(dtype=float)), errors="coerce")
    axes[0].hist([age[~malignant].dropna(), age[malignant].dropna()], bins=range(0, 95, 5), stacked=True,
                 color=["steelblue", "crimson"], label=["benign", "malignant"])
    axes[0].set(xlabel="age (years)", ylabel="lesions", title="Age")
    axes[0].legend()
    for ax, col in zip(axes[1:], ["sex", "localization"]):
        if col not in lesions.columns:
            ax.set_title(f"{col}: not in the metadata")
            continue
        table = pd.crosstab(lesions[col], malignant).rename(columns={False: "benign", True: "malignant"})
        table = table.loc[table.sum(axis=1).sort_values().index]
        table.plot.barh(stacked=True, ax=ax, color=["steelblue", "crimson"])
        ax.set(xlabel="lesions", ylabel="", title=col.capitalize())
    fig.tight_layout()
    return fig


def plot_examples(df: pd.DataFrame, per_dx: int = 4, seed: int = 0):
    """A grid of example images: one row per diagnosis."""
    dxs = [d for d in DX_CLASSES if (df["dx"] == d).any()]
    fig, axes = plt.subplots(len(dxs), per_dx, figsize=(2.2 * per_dx, 1.8 * len(dxs)), squeeze=False)
    for row, d in zip(axes, dxs):
        sample = df[df["dx"] == d].sample(min(per_dx, int((df["dx"] == d).sum())), random_state=seed)
        for ax in row:
            ax.axis("off")
        for ax, path in zip(row, sample["path"]):
            ax.imshow(Image.open(path).convert("RGB"))
        row[0].set_title(f"{d}: {DX_NAMES[d]}", fontsize=8, loc="left",
                         color="crimson" if d in MALIGNANT_DX else "black")
    fig.tight_layout()
    return fig


def plot_split(df: pd.DataFrame):
    """Images per split and label, with how many lesions cross splits (it must be 0)."""
    crossing = int((df.groupby("lesion_id")["split"].nunique() > 1).sum())
    table = df.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(SPLITS)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    table.plot.bar(stacked=True, ax=ax, rot=0)
    ax.set(ylabel="images", title=f"Lesion-grouped split: {crossing} lesion(s) in more than one split")
    return fig


def plot_history(recorder):
    """Training and validation loss, and every validation metric, per epoch of the last fit."""
    names = list(recorder.metric_names[1:-1])  # drop 'epoch' and 'time'
    values = np.array([[np.nan if v is None else float(v) for v in row] for row in recorder.values])
    metric_names = [n for n in names if n not in ("train_loss", "valid_loss")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    epochs = np.arange(1, len(values) + 1)
    for n in ("train_loss", "valid_loss"):
        axes[0].plot(epochs, values[:, names.index(n)], "o-", label=n)
    axes[0].set(xlabel="epoch", title="Loss")
    axes[0].legend()
    for n in metric_names:
        axes[1].plot(epochs, values[:, names.index(n)], "o-", label=n)
    axes[1].set(xlabel="epoch", ylim=(0, 1), title="Validation metrics")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    return fig


# --- an evaluation's curves and tables drawn --------------------------------------------------------

def plot_roc(is_malignant, p_malignant, threshold: float | None = None, ax=None, name: str | None = None):
    """ROC curve of malignant vs benign, with the operating point marked; `name` labels it among others on `ax`."""
    fig, ax = _axes(ax, (5, 5))
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
    fig, ax = _axes(ax, (5, 5))
    prec, rec, _ = precision_recall_curve(is_malignant, p_malignant)
    ax.plot(rec, prec, label=f"AP {average_precision_score(is_malignant, p_malignant):.3f}")
    ax.axhline(np.mean(is_malignant), ls="--", color="grey", lw=1, label="prevalence")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall: malignant",
           xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="upper right")
    return fig


def plot_confusion(targets, preds, classes, ax=None, title: str = "Confusion matrix"):
    """Confusion matrix, rows the truth: counts, coloured by the share of each row (classes are far from balanced)."""
    fig, ax = _axes(ax, (1.2 * len(classes) + 2,) * 2)
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
    fig, ax = _axes(ax, (5, 5))
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
    fig, ax = _axes(ax, (6, 4))
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
    fig, ax = _axes(ax, (6, 4))
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
    fig, ax = _axes(ax, (6, 3.5))
    rows = [k for k in PAIRED if paired[k]["ci"] is not None]
    labels = {"auroc": "AUROC", "balanced_accuracy": "balanced accuracy"}
    for i, k in enumerate(rows):
        d, (lo, hi) = paired[k]["difference"], paired[k]["ci"]
        colour = "grey" if lo <= 0 <= hi else "seagreen" if lo > 0 else "crimson"
        ax.errorbar(d, i, xerr=[[d - lo], [hi - d]], fmt="o", color=colour, capsize=4)
        ax.annotate(interval(d, (lo, hi), signed=True), (d, i), textcoords="offset points", xytext=(0, 8),
                    ha="center", fontsize=8)
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(range(len(rows)), [labels.get(k, k) for k in rows])
    ax.set_ylim(len(rows) - 0.3, -0.6)  # AUROC on top
    ax.set(xlabel=f"{names[1]} - {names[0]}",
           title=f"Paired differences, {round(100 * paired['level'])}% interval ({paired['resampled']} resampled)")
    return fig


LESION_COUNTS = {"each_photo": "each photo (the usual count)", "one_photo": "one photo of each lesion",
                 "all_photos": "each lesion on all its photos"}


def plot_lesions(by_lesion: dict):
    """`lesion_metrics` drawn: each statistic counted photo by photo and lesion by lesion, and all photos - one."""
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


def subgroup_key(paired: bool, gap: bool) -> str:
    """The footnote of `plot_subgroups`: what its colours and its 'too few' rows mean."""
    parts = [f"'too few': under {MIN_CASES} of the cases a statistic counts (malignant for sensitivity, benign for "
             "specificity, each for AUROC), so it is not estimated"]
    if paired:
        parts.append("green: B better (interval above 0); red: B worse; grey: interval holds 0")
    if gap:
        parts.append("orange: probabilities off in this subgroup (interval of mean probability - share malignant "
                     "excludes 0); grey: within chance")
    return "Exploratory, many subgroups looked at. " + ". ".join(parts) + "."


def plot_subgroups(rows: list[dict], overall: dict | None = None, names: tuple[str, str] | None = None):
    """A forest plot of `subgroup_metrics`: AUROC, sensitivity and specificity with their intervals, by subgroup.

    Dashed lines mark the `overall` values (a dict of them) each subgroup is read against. Given the two models'
    `names`, the rows are a `paired_subgroup_metrics` and the plot shows B - A against the line of no difference.
    """
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
            if v is None:  # said on the row, so a blank row is not read as missing data
                ax.text(0.5, row_y, "too few", transform=ax.get_yaxis_transform(), ha="center", va="center",
                        fontsize=7, color="grey", style="italic")
                continue
            colour = "tab:blue"
            if centred and ci:
                colour = "grey" if ci[0] <= 0 <= ci[1] else "seagreen" if ci[0] > 0 else "crimson"
                if k == "calibration_gap" and colour != "grey":
                    colour = "darkorange"  # probabilities off in either direction: neither is good
            err = [[v - ci[0]], [ci[1] - v]] if ci else None
            ax.errorbar(v, row_y, xerr=err, fmt="o", ms=4, color=colour, ecolor=colour, capsize=2, lw=1)
        if names is not None and k != "calibration_gap":
            title = f"{title}: {names[1]} - {names[0]}"
        if overall is not None and overall.get(k) is not None:  # named in the title: a legend would cover points
            ax.axvline(overall[k], color="grey", ls="--", lw=1)
            title += f"\n(dashed: all images, {overall[k]:{'+' if centred else ''}.3f})"
        if not centred:
            ax.set(xlim=(0, 1.02), title=title)
        else:
            ax.axvline(0, color="black", lw=1)
            scale = reach([k]) if k == "calibration_gap" else differences
            ax.set(xlim=(-scale, scale), title=title)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(y), labels, fontsize=8)
    for i in headers:
        axes[0].get_yticklabels()[i].set_fontweight("bold")
    axes[0].set_ylim(y - 0.5, -0.5)
    fig.suptitle("By subgroup: the malignant call, with 95% intervals (wide where a subgroup is small)" if names is None
                 else f"By subgroup: {names[1]} - {names[0]}, paired, with 95% intervals")
    fig.text(0.01, 0.005, subgroup_key(names is not None, gap), fontsize=8, color="dimgrey", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.5 / (1.0 + 0.24 * y), 1, 1))
    return fig


def _thumb(path: str, size: int = 160):
    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    return img


def plot_top_losses(df: pd.DataFrame, probs, targets, classes, k: int = 9, preds=None):
    """The `k` images with the highest cross-entropy, with truth and prediction (`preds`, else the top class)."""
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

# --- Grad-CAM and a prediction -----------------------------------------------------------------------

def gradcam_title(heat: np.ndarray) -> str:
    """A Grad-CAM panel's title: what the map shows, or that nothing in the photo raised the score."""
    if not np.asarray(heat).max() > 0:
        return "Grad-CAM: nothing raised the malignant score (an empty map)"
    return "Grad-CAM: what raised the malignant score"


def plot_gradcam_grid(learn, images, titles=None, cols: int = 4, target: str | int | None = None, model=None):
    """A figure of Grad-CAM overlays, one per image; an empty map says so under its title."""
    images = list(images)
    rows = max(1, math.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.flat, images)):
        heat, overlay = gradcam(learn, image, target=target, model=model)
        ax.imshow(overlay)
        title = titles[i] if titles else str(i)
        if not heat.max() > 0:
            title += "\n(empty map: nothing raised the score)"
        ax.set_title(title, fontsize=8)
    fig.suptitle("Grad-CAM (red: regions that raised the score)")
    fig.tight_layout()
    return fig


def plot_prediction(clf, image, result: dict | None = None):
    """The photo, its Grad-CAM overlay and the class probabilities, titled with the call and the disclaimer; a photo
    the dermoscopy check refused, titled with why it gets no call."""
    if result is None:
        result, heat, overlay = clf.explain(image)  # one pass for both
    elif "reason" not in result:
        heat, overlay = gradcam(clf.learn, image, model=clf.model)
    if "reason" in result:  # the dermoscopy check refused it: the photo and why, no call and no map
        fig, ax = plt.subplots(figsize=(6, 4.5))
        ax.imshow(open_image(image))
        ax.axis("off")
        fig.suptitle(f"Not judged: does not look like a dermoscopy photo (check score {result['check_score']:.2f}, "
                     f"above {result['check_threshold']:.2f})\n{DISCLAIMER}", fontsize=9)
        fig.tight_layout()
        return fig
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [4, 4, 3]})
    axes[0].imshow(open_image(image))
    axes[1].imshow(overlay)
    for ax, title in zip(axes[:2], ["photo", gradcam_title(heat)]):
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    probs = pd.Series(result["probabilities"]).sort_values()
    probs.plot.barh(ax=axes[2], color=["crimson" if m else "steelblue" for m in is_malignant_class(probs.index)])
    axes[2].set(xlim=(0, 1), title=clf.scores_title)
    call, label = result["call"], result["label"]
    head = call if label == call else f"{call} (most likely diagnosis: {label})"  # dx models name the diagnosis
    fig.suptitle(f"{head}: probability of malignancy {result['malignant_probability']:.2f} "
                 f"(operating threshold {clf.threshold:.2f})\n{DISCLAIMER}", fontsize=10)
    fig.tight_layout()
    return fig
