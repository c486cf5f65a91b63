"""Results within subgroups of the metadata (sex, age, body site, how the diagnosis was confirmed, photos of the
lesion): a model can fail in one subgroup while its overall numbers look fine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .config import N_BOOT
from .errors import SkinCancerError
from .metrics import bootstrap_intervals, calibration_in_the_large, call_statistics, paired_bootstrap

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


def subgroup_metrics(df: pd.DataFrame, is_malignant, p_malignant, threshold: float, n_boot: int = N_BOOT,
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
                            n_boot: int = N_BOOT, seed: int = 0, groups=None) -> list[dict]:
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
