"""Figures for people: the data set, training history; shared pyplot access and atomic PNG saving."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import DX_CLASSES, DX_NAMES, MALIGNANT_DX, SPLITS, is_malignant_class
from .files import atomic_path


def pyplot():
    """matplotlib.pyplot, imported on first use (the command line picks the Agg backend; notebooks keep theirs)."""
    import matplotlib.pyplot as plt

    return plt


def class_chart_title(clf) -> str:
    """What a chart of `predict`'s class probabilities shows: a calibrated dx model's diagnoses are raw scores."""
    return "diagnosis scores (not calibrated)" if clf.calibration and len(clf.classes) > 2 else "class probabilities"


def save_figure(fig, path: str | Path, close: bool = True) -> Path:
    """Save a figure as PNG atomically (and close it unless told not to, e.g. to show it in a notebook)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    if close:
        pyplot().close(fig)
    return Path(path)


def plot_diagnoses(df: pd.DataFrame):
    """Images and lesions per diagnosis, malignant ones in red."""
    plt = pyplot()
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
    plt = pyplot()
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
    from PIL import Image

    plt = pyplot()
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
    plt = pyplot()
    crossing = int((df.groupby("lesion_id")["split"].nunique() > 1).sum())
    table = df.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(SPLITS)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    table.plot.bar(stacked=True, ax=ax, rot=0)
    ax.set(ylabel="images", title=f"Lesion-grouped split: {crossing} lesion(s) in more than one split")
    return fig


def plot_history(recorder):
    """Training and validation loss, and every validation metric, per epoch of the last fit."""
    plt = pyplot()
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


def plot_prediction(clf, image, result: dict | None = None):
    """The photo, its Grad-CAM overlay and the class probabilities, titled with the call and the disclaimer."""
    from .gradcam import gradcam
    from .predict import DISCLAIMER, open_image

    plt = pyplot()
    if result is None:
        result, _, overlay = clf.explain(image)  # one pass for both
    else:
        _, overlay = gradcam(clf.learn, image, model=clf.model)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [4, 4, 3]})
    axes[0].imshow(open_image(image))
    axes[1].imshow(overlay)
    for ax, title in zip(axes[:2], ["photo", "Grad-CAM: what raised the malignant score"]):
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    probs = pd.Series(result["probabilities"]).sort_values()
    probs.plot.barh(ax=axes[2], color=["crimson" if m else "steelblue" for m in is_malignant_class(probs.index)])
    axes[2].set(xlim=(0, 1), title=class_chart_title(clf))
    call, label = result["call"], result["label"]
    head = call if label == call else f"{call} (most likely diagnosis: {label})"  # dx models name the diagnosis
    fig.suptitle(f"{head}: probability of malignancy {result['malignant_probability']:.2f} "
                 f"(operating threshold {clf.threshold:.2f})\n{DISCLAIMER}", fontsize=10)
    fig.tight_layout()
    return fig
