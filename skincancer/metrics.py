"""The numbers of an honest evaluation: AUROC and the call at a threshold with lesion-bootstrap intervals, paired
differences between models, lesion by lesion, other prevalences and net benefit. No files, no plots."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from .calibration import calibrate
from .config import N_BOOT, TARGET_SENSITIVITY
from .errors import SkinCancerError, first_few
from .labels import DX_CLASSES, MALIGNANT_DX, is_malignant_class, malignant_probability, task_of


def _finite_or_none(x):
    return None if x is None or not math.isfinite(x) else float(x)


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _balanced_accuracy(targets, pred) -> float:
    """Mean recall over the classes present in `targets` (sklearn warns when a prediction names an absent one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="A single label was found")
        return float(balanced_accuracy_score(targets, pred))


def malignant_scores(probs, targets, classes, calibration: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each image's truth (malignant or not) and probability of malignancy (calibrated when given a calibration)."""
    p_mal = calibrate(malignant_probability(np.asarray(probs), classes), calibration)
    return is_malignant_class(classes)[np.asarray(targets)], p_mal


def choose_threshold(p_malignant, is_malignant, target_sensitivity: float = TARGET_SENSITIVITY) -> float:
    """A threshold of the highest calls on these (validation) images whose sensitivity reaches `target_sensitivity`.

    It lies halfway between the last malignant image it must catch and the next score below, not on that image's
    score: the calls on these images are the same, and predicting them again, through the inference copy or on
    another machine (scores that differ in the sixth decimal), does not drop that image below the threshold.
    """
    p, y = _threshold_inputs(p_malignant, is_malignant, target_sensitivity)
    return _halfway_below(p, _last_caught(p, y, target_sensitivity))


def _threshold_inputs(p_malignant, is_malignant, target_sensitivity: float) -> tuple[np.ndarray, np.ndarray]:
    """The scores and truths a threshold is chosen on, checked: a target in (0, 1] and at least one malignant case."""
    p, y = np.asarray(p_malignant, dtype=np.float64), np.asarray(is_malignant, dtype=bool)
    if not 0 < target_sensitivity <= 1:
        raise SkinCancerError(f"target_sensitivity: {target_sensitivity} must be in (0, 1]")
    if not y.any():
        raise SkinCancerError("cannot choose an operating threshold: the validation images hold no malignant case")
    return p, y


def _last_caught(p: np.ndarray, y: np.ndarray, target_sensitivity: float) -> float:
    """The lowest malignant score a threshold must catch for `target_sensitivity` of the malignant images."""
    positives = np.sort(p[y])[::-1]
    k = math.ceil(target_sensitivity * len(positives) - 1e-9)  # the k most confident positives must be caught
    return float(positives[max(k, 1) - 1])


def _halfway_below(p: np.ndarray, last: float) -> float:
    """A threshold halfway between the score `last` and the next score below it among `p`."""
    below = p[p < last]
    lower = below.max() if len(below) else min(last, 0.0)
    halfway = (last + lower) / 2
    return float(halfway if lower < halfway else last)  # scores one float apart have no number between them


def replicate_thresholds(p_malignant, is_malignant, target_sensitivity: float, n_boot: int = N_BOOT, seed: int = 0,
                         groups=None) -> np.ndarray:
    """On each bootstrap replicate (of lesions where `groups` are given), the highest score that still catches
    `target_sensitivity` of its malignant images: a threshold at or below it reaches the target there. NaN where a
    replicate drew no malignant image."""
    p, y = np.asarray(p_malignant, dtype=np.float64), np.asarray(is_malignant, dtype=bool)
    order = np.argsort(-p[y], kind="stable")
    positives = p[y][order]
    out = []
    for w in bootstrap_weights(len(y), n_boot, seed, groups):
        caught = np.cumsum(w[:, y][:, order], axis=1)
        total = caught[:, -1]
        k = np.argmax(caught >= target_sensitivity * total[:, None] - 1e-9, axis=1)
        out.append(np.where(total > 0, positives[k], np.nan))
    return np.concatenate(out) if out else np.empty(0)


def choose_confident_threshold(p_malignant, is_malignant, target_sensitivity: float = TARGET_SENSITIVITY,
                               confidence: float = 0.95, n_boot: int = N_BOOT, seed: int = 0, groups=None) -> float:
    """The highest threshold whose sensitivity on these (validation) images reaches the target on `confidence` of
    their bootstrap replicates: the one-sided lower confidence bound of its sensitivity is the target.

    The plain rule (`choose_threshold`) reaches the target on these images alone, so about half of new samples
    like them fall short; this one leaves the margin that the validation split's own sampling error calls for.
    The threshold lies halfway to the next score below, as `choose_threshold`'s does.
    """
    if not 0 < confidence < 1:
        raise SkinCancerError(f"confidence: {confidence} must be in (0, 1)")
    p, y = _threshold_inputs(p_malignant, is_malignant, target_sensitivity)
    last = _last_caught(p, y, target_sensitivity)
    reps = replicate_thresholds(p, y, target_sensitivity, n_boot, seed, groups)
    reps = reps[np.isfinite(reps)]
    if len(reps):
        last = min(float(np.quantile(reps, 1 - confidence, method="inverted_cdf")), last)
    return _halfway_below(p, last)


def target_met(is_malignant, p_malignant, threshold: float, target_sensitivity: float, n_boot: int = N_BOOT,
               seed: int = 0, groups=None) -> dict:
    """The sensitivity at `threshold` against its target: reached here or not, and the share of bootstrap replicates
    (of lesions where `groups` are given) on which it is reached. None where there is no malignant image."""
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    out: dict[str, Any] = {"target_sensitivity": target_sensitivity, "sensitivity": None, "met": None,
                           "share_of_replicates_met": None, "replicates": 0}
    if not y.any():
        return out
    sens = float((p[y] >= threshold).mean())
    out.update(sensitivity=sens, met=bool(sens >= target_sensitivity - 1e-12))
    if n_boot > 0:  # the replicates' sensitivity alone: their AUROCs are not needed here
        caught = (p >= threshold)[y]
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = np.concatenate([w[:, y] @ caught / w[:, y].sum(axis=1)
                                   for w in bootstrap_weights(len(y), n_boot, seed, groups)])
        reps = reps[np.isfinite(reps)]
        if len(reps):
            out.update(share_of_replicates_met=float((reps >= target_sensitivity - 1e-12).mean()), replicates=len(reps))
    return out


def weighted_aurocs(is_malignant, p_malignant, weights) -> np.ndarray:
    """AUROC under each row of `weights` (replicates, images): the Mann-Whitney statistic, ties counting a half."""
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    p, y, w = p[order], y[order], np.atleast_2d(np.asarray(weights, dtype=np.float64))[:, order]
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])  # runs of tied scores
    pos = np.add.reduceat(w * y, starts, axis=1)
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg  # negative weight scored strictly lower
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def bootstrap_weights(n_images: int, n_boot: int, seed: int = 0, groups=None):
    """Bootstrap replicates as weights, in chunks of (replicates, images): how often each image is drawn.

    Whole `groups` (lesions) are drawn where given, and an image counts as often as its group is drawn; else images.
    """
    codes = np.arange(n_images) if groups is None else np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, 100):  # 100 replicates at a time bound the memory on large sets
        counts = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=min(100, n_boot - start))
        yield counts[:, np.ravel(codes)]


def _percentiles(scores: np.ndarray, level: float) -> tuple[float, float] | None:
    """The percentile interval at `level` of the finite `scores` (replicates that left a statistic defined), or None."""
    scores = scores[np.isfinite(scores)]
    if not len(scores):
        return None
    lo, hi = np.percentile(scores, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


PAIRED = ("auroc", "sensitivity", "specificity", "balanced_accuracy")
LESION_SIDES = ("one photo", "all photos")  # the two counts `lesion_metrics` pairs


def call_statistics(y: np.ndarray, p: np.ndarray, threshold: float, w: np.ndarray) -> dict[str, np.ndarray]:
    """PAIRED's statistics of the malignant call at `threshold` under each row of weights `w` (replicates, images).

    A row of ones gives the plain statistics; bootstrap replicates (`bootstrap_weights`) give theirs, one row each.
    """
    said = p >= threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (w * (said & y)).sum(axis=1) / (w * y).sum(axis=1)
        spec = (w * (~said & ~y)).sum(axis=1) / (w * ~y).sum(axis=1)
    return dict(auroc=weighted_aurocs(y, p, w), sensitivity=sens, specificity=spec, balanced_accuracy=(sens + spec) / 2)


def _bootstrap_statistics(y: np.ndarray, runs: list[tuple[np.ndarray, float]], n_boot: int, seed: int,
                          groups) -> list[dict[str, np.ndarray]]:
    """PAIRED's statistics of each (probabilities, threshold) run on every bootstrap replicate, one dict a run.

    Every run is scored on the same replicates, drawn once, so runs (models) are paired. NaN where a replicate
    leaves a statistic undefined.
    """
    return _replicates(lambda w: [call_statistics(y, p, t, w) for p, t in runs], len(runs),
                       bootstrap_weights(len(y), n_boot, seed, groups))


def _replicates(score, n_results: int, weights) -> list[dict[str, np.ndarray]]:
    """`score` (weights -> n_results dicts of PAIRED's statistics) on every chunk of `weights`, concatenated."""
    chunks = [score(w) for w in weights]
    return [{k: np.concatenate([c[i][k] for c in chunks]) if chunks else np.empty(0) for k in PAIRED}
            for i in range(n_results)]


def bootstrap_intervals(is_malignant, p_malignant, threshold: float = 0.5, n_boot: int = N_BOOT, seed: int = 0,
                        level: float = 0.95, groups=None) -> dict[str, tuple[float, float] | None]:
    """Percentile bootstrap intervals of PAIRED's statistics of the malignant call at `threshold`, one set of draws.

    Whole `groups` (lesions) are resampled where given, else images: photos of one lesion are not independent, and
    resampling them one by one gives too narrow an interval. None where a statistic is undefined (no malignant image,
    say) or n_boot is 0. Replicates that drew a single class are left out of the statistics they leave undefined.
    """
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    if n_boot <= 0 or len(y) == 0:
        return dict.fromkeys(PAIRED)
    out = {}
    for k, scores in _bootstrap_statistics(y, [(p, threshold)], n_boot, seed, groups)[0].items():
        out[k] = _percentiles(scores, level)
    return out


def bootstrap_auroc(is_malignant, p_malignant, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
                    groups=None) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the AUROC, resampling whole `groups` (lesions) or else images.

    Photos of one lesion are not independent: resampling them one by one gives too narrow an interval, so
    pass each image's lesion_id where it is known. (None, None) if the AUROC is undefined.
    """
    return bootstrap_intervals(is_malignant, p_malignant, 0.5, n_boot, seed, level, groups)["auroc"] or (None, None)


def calibration_in_the_large(is_malignant, p_malignant, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
                             groups=None) -> dict:
    """Mean probability of malignancy against the share malignant, and their gap with a bootstrap interval.

    A calibrated model's mean probability matches the share of malignant images in any group it was calibrated on;
    a gap within a subgroup means its probabilities run high (positive) or low there. Whole `groups` (lesions) are
    resampled where given.
    """
    y, p = np.asarray(is_malignant, dtype=np.float64), np.asarray(p_malignant, dtype=np.float64)
    if len(y) == 0 or len(p) != len(y):
        raise SkinCancerError(f"{len(y)} truths and {len(p)} probabilities: calibration needs both, alike")
    out: dict[str, Any] = {"mean_probability": float(p.mean()), "share_malignant": float(y.mean()),
           "calibration_gap": float(p.mean() - y.mean()), "calibration_gap_ci95": None}
    if n_boot > 0:
        gaps = np.concatenate([w @ (p - y) / w.sum(axis=1) for w in bootstrap_weights(len(y), n_boot, seed, groups)])
        interval = _percentiles(gaps, level)  # None where every replicate is undefined (a NaN probability)
        out["calibration_gap_ci95"] = list(interval) if interval else None
    return out


def _mean_over_runs(statistics: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each statistic averaged over the runs (the trainings of one recipe) that `statistics` holds, one dict a run."""
    return {k: np.mean([st[k] for st in statistics], axis=0) for k in PAIRED}


def paired_bootstrap(is_malignant, p_a, p_b, threshold_a=0.5, threshold_b=0.5, n_boot: int = N_BOOT,
                     seed: int = 0, level: float = 0.95, groups=None) -> dict:
    """Model B against model A on the same images: each statistic of PAIRED for both, B - A, and its interval.

    Both models are scored on the same bootstrap replicates (of lesions where `groups` are given): where they err on
    the same images, those errors cancel in the difference, whose interval is then much narrower than the two
    separate intervals suggest. Sensitivity, specificity and balanced accuracy (their mean) are of the malignant
    call at each model's own threshold; `ci` is the percentile interval at `level` and `se` the replicates' standard
    deviation. `p_value` is two-sided, from the share of replicates on the far side of 0 (those at exactly 0 count on
    both sides), as (k + 1) / (replicates + 1) so it is never 0; it falls below 1 - level about when the interval
    excludes 0. Undefined numbers are None.

    A side may be several trainings of one recipe: rows of probabilities (runs, images), with a threshold each or
    one for all. Its statistics are then the mean over its runs, on every replicate alike. The interval still covers
    which images were drawn, not the noise between trainings.
    """
    y = np.asarray(is_malignant, dtype=bool)
    try:
        p_a, p_b = (np.atleast_2d(np.asarray(p, dtype=np.float64)) for p in (p_a, p_b))
    except ValueError as e:  # rows of different lengths
        raise SkinCancerError(f"the runs of one side must each predict the same images ({e})") from None
    if not len(y) == p_a.shape[1] == p_b.shape[1]:
        raise SkinCancerError(f"{len(y)} labels, {p_a.shape[1]} and {p_b.shape[1]} probabilities: a paired comparison "
                              "needs both models' predictions of the same images")
    if groups is not None and len(groups) != len(y):
        raise SkinCancerError(f"{len(groups)} lesion ids do not match {len(y)} images")
    if len(y) == 0:
        raise SkinCancerError("no images to compare")
    runs = [(run, t) for p, thresholds in ((p_a, threshold_a), (p_b, threshold_b))
            for run, t in zip(p, np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (len(p),)))]
    ones = np.ones((1, len(y)))
    points = [call_statistics(y, p, t, ones) for p, t in runs]
    reps = _bootstrap_statistics(y, runs, max(n_boot, 0), seed, groups)  # one set of replicates for every run
    n_a = len(p_a)
    out: dict[str, Any] = _paired_differences(_mean_over_runs(points[:n_a]), _mean_over_runs(points[n_a:]),
                              _mean_over_runs(reps[:n_a]), _mean_over_runs(reps[n_a:]), level)
    out.update(level=level, resampled="lesions" if groups is not None else "images", replicates=int(n_boot),
               runs={"a": len(p_a), "b": len(p_b)})
    return out


def _paired_differences(a: dict, b: dict, reps_a: dict, reps_b: dict, level: float) -> dict[str, dict]:
    """For each statistic of PAIRED: A's and B's values, B - A, its percentile interval, se and two-sided p-value.

    `a` and `b` hold each statistic's value as a 1-element array, `reps_a` and `reps_b` its value on the same
    bootstrap replicates.
    """
    return {k: {"a": _finite_or_none(float(a[k][0])), "b": _finite_or_none(float(b[k][0])),
                **_difference(float(b[k][0] - a[k][0]), reps_b[k] - reps_a[k], level)} for k in PAIRED}


def _difference(point: float, d: np.ndarray, level: float) -> dict:
    """B - A (`point`) with, from its bootstrap replicates `d`, a percentile interval, se and two-sided p-value.

    The p-value is the share of replicates on the far side of 0 (those at 0 count on both sides), as
    (k + 1) / (replicates + 1) so it is never 0. Replicates where B - A is undefined (a single class drawn) are
    left out; None where no replicate or no point is defined.
    """
    d = d[np.isfinite(d)]
    interval = _percentiles(d, level) if math.isfinite(point) else None
    ci = list(interval) if interval else None
    far = min((d <= 0).sum(), (d >= 0).sum())
    return {"difference": _finite_or_none(point), "ci": ci, "se": float(d.std(ddof=1)) if ci and len(d) > 1 else None,
            "p_value": float(min(1.0, 2 * (far + 1) / (len(d) + 1))) if ci else None}


def lesion_scores(groups, is_malignant, p_malignant) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each lesion's truth and mean probability of malignancy over its photos, and each photo's lesion index.

    Lesions are numbered in the order of their sorted ids (as `bootstrap_weights` numbers them). A lesion whose
    photos disagree on the truth is an error in the labels.
    """
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    ids, codes = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    if not len(ids) or not len(codes) == len(y) == len(p):
        raise SkinCancerError(f"{len(codes)} lesion ids, {len(y)} truths and {len(p)} probabilities: lesion scores "
                              "need one of each per photo")
    photos = np.bincount(codes)
    malignant_photos = np.bincount(codes, weights=y)
    mixed = ids[(malignant_photos > 0) & (malignant_photos < photos)]
    if len(mixed):
        raise SkinCancerError(f"{len(mixed)} lesions have both benign and malignant photos, e.g. {first_few(mixed)}: "
                              "each lesion has one diagnosis")
    return malignant_photos > 0, np.bincount(codes, weights=p) / photos, codes


def lesion_metrics(groups, is_malignant, p_malignant, threshold: float, n_boot: int = N_BOOT, seed: int = 0,
                   level: float = 0.95) -> dict:
    """The malignant call lesion by lesion: one photo of each lesion against the mean of all its photos, paired.

    Image-level metrics count a lesion once per photo, and HAM10000's malignant lesions have more photos than its
    benign ones. `one_photo` counts each lesion once, through one of its photos drawn at random: the expectation over
    that draw, in which each photo weighs 1 / its lesion's photos. `all_photos` calls each lesion on the mean
    probability of its photos, at the same threshold. `difference` is all photos - one photo (`paired_bootstrap`'s
    shape, B - A). `each_photo` is the usual count, photo by photo. All three are scored on the same replicates of
    resampled lesions (those `classification_metrics` draws with the same seed), each with its own `*_ci95`.
    """
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    y_lesion, p_lesion, codes = lesion_scores(groups, y, p)
    photos = np.bincount(codes)

    def scored(w):  # lesion weights (replicates, lesions) -> (each photo, one photo, all photos)
        return (call_statistics(y, p, threshold, w[:, codes]),
                call_statistics(y, p, threshold, w[:, codes] / photos[codes]),
                call_statistics(y_lesion, p_lesion, threshold, w))

    points = scored(np.ones((1, len(photos))))
    reps = _replicates(scored, 3, bootstrap_weights(len(photos), max(n_boot, 0), seed))
    difference: dict[str, Any] = _paired_differences(points[1], points[2], reps[1], reps[2], level)
    difference.update(level=level, resampled="lesions", replicates=int(max(n_boot, 0)))
    sides = {}
    for name, point, rep in zip(("each_photo", "one_photo", "all_photos"), points, reps):
        side = {}
        for k in PAIRED:
            side[k], ci = _finite_or_none(float(point[k][0])), _percentiles(rep[k], level)
            side[f"{k}_ci95"] = list(ci) if ci and side[k] is not None else None
        sides[name] = side
    return {"n_lesions": len(photos), "n_malignant": int(y_lesion.sum()), "n_photos": len(y),
            "lesions_with_several_photos": int((photos > 1).sum()), "threshold": float(threshold), **sides,
            "difference": difference}


def check_prevalences(prevalences) -> list[float]:
    """`prevalences` as floats, or SkinCancerError naming one that is not strictly between 0 and 1."""
    out = []
    for v in prevalences:
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise SkinCancerError(f"prevalence: {v!r} is not a number") from None
        if not 0 < v < 1:
            raise SkinCancerError(f"prevalence: {v} must be strictly between 0 and 1 (0.05 for 5% malignant)")
        out.append(v)
    return out


def at_prevalence(is_malignant, p_malignant, threshold: float, prevalences, n_boot: int = N_BOOT, seed: int = 0,
                  level: float = 0.95, groups=None) -> list[dict]:
    """PPV and NPV of the malignant call at `threshold` for each share of lesions malignant in `prevalences`.

    Sensitivity and specificity do not depend on prevalence, PPV and NPV do (Bayes' rule): the test split's 20%
    malignant is not a clinic's. With `groups` (each photo's lesion) the rates are of lesions, each called on the
    mean probability of its photos, as a clinic's prevalence counts lesions; without, of photos. Each row gives them
    with bootstrap intervals (the replicates' sensitivity and specificity carried through), and per 1,000 of that
    unit (`unit`): malignancies found and missed, benign ones called malignant. It assumes the lesions of each class
    are like the clinic's, which a prevalence cannot check.
    """
    prevalences = check_prevalences(prevalences)
    y, p = np.asarray(is_malignant, dtype=bool), np.asarray(p_malignant, dtype=np.float64)
    unit = "photos"
    if groups is not None and len(y):
        y, p, _ = lesion_scores(groups, y, p)
        groups, unit = None, "lesions"  # each lesion now one row: resampled as it is
    if not y.any() or y.all():
        return []  # sensitivity or specificity undefined
    point = call_statistics(y, p, threshold, np.ones((1, len(y))))
    reps = _bootstrap_statistics(y, [(p, threshold)], max(n_boot, 0), seed, groups)[0]
    rows = []
    for prevalence in prevalences:
        (ppv,), (npv,) = _predictive_values(point, prevalence)
        row = {"prevalence": prevalence, "unit": unit, "ppv": _finite_or_none(ppv), "npv": _finite_or_none(npv)}
        for k, scores in zip(("ppv", "npv"), _predictive_values(reps, prevalence)):
            ci = _percentiles(scores, level)
            row[f"{k}_ci95"] = list(ci) if ci and row[k] is not None else None
        sens, spec = float(point["sensitivity"][0]), float(point["specificity"][0])
        row["per_1000"] = {"malignant": 1000 * prevalence, "found": 1000 * prevalence * sens,
                           "missed": 1000 * prevalence * (1 - sens),
                           "benign_called_malignant": 1000 * (1 - prevalence) * (1 - spec)}
        rows.append(row)
    return rows


def _predictive_values(statistics: dict[str, np.ndarray], prevalence: float) -> tuple[np.ndarray, np.ndarray]:
    """PPV and NPV from arrays of sensitivity and specificity, at `prevalence` (NaN where undefined)."""
    sens, spec = statistics["sensitivity"], statistics["specificity"]
    found, false_alarm = sens * prevalence, (1 - spec) * (1 - prevalence)
    cleared, missed = spec * (1 - prevalence), (1 - sens) * prevalence
    with np.errstate(invalid="ignore", divide="ignore"):
        return found / (found + false_alarm), cleared / (cleared + missed)


def predicted_classes(probs, classes, threshold: float = 0.5, calibration: dict | None = None) -> np.ndarray:
    """Each image's predicted class index: the call at `threshold` for a binary model, the most likely class else."""
    probs = np.asarray(probs)
    if task_of(classes) == "binary":  # (benign, malignant)
        return (calibrate(malignant_probability(probs, classes), calibration) >= threshold).astype(int)
    return probs.argmax(axis=1)


def classification_metrics(probs, targets, classes, threshold: float = 0.5, dx=None, n_boot: int = 0,
                           seed: int = 0, groups=None, calibration: dict | None = None) -> dict:
    """Metrics for class probabilities `probs` (n, k) and integer `targets` (n,); undefined ones are None.

    auroc and everything at the threshold are about malignant vs benign, with malignant predicted when its
    probability reaches `threshold`. accuracy and balanced_accuracy score `predicted_classes`: for a binary model
    the same call at the threshold (so balanced_accuracy is the mean of sensitivity and specificity), for a `dx`
    model the most likely of the 7 diagnoses. With `dx` (each image's diagnosis), per-diagnosis recall says how
    often each diagnosis got the right benign/malignant call.
    With `n_boot`, AUROC, sensitivity, specificity and (binary) balanced accuracy get 95% bootstrap intervals
    (`*_ci95`), from one set of replicates that resamples lesions, not images, when `groups` (each image's
    lesion_id) are given.
    With a `calibration` (the model card's), the probability of malignancy is the calibrated one, and `threshold`
    is on its scale; `brier` scores that probability, and `brier_uncalibrated` the network's own.
    """
    probs, targets, classes = np.asarray(probs, dtype=np.float64), np.asarray(targets), list(classes)
    if probs.ndim != 2 or probs.shape != (len(targets), len(classes)):
        raise SkinCancerError(f"probabilities of shape {probs.shape} do not match {len(targets)} targets "
                              f"and {len(classes)} classes")
    if len(targets) == 0:
        raise SkinCancerError("no images to evaluate")
    pred = predicted_classes(probs, classes, threshold, calibration)
    truth, scores = malignant_scores(probs, targets, classes)
    p_mal = calibrate(scores, calibration)
    said = p_mal >= threshold
    tp, fn = int((said & truth).sum()), int((~said & truth).sum())
    tn, fp = int((~said & ~truth).sum()), int((said & ~truth).sum())
    n_pos, n_neg = tp + fn, tn + fp
    ppv = _ratio(tp, tp + fp)
    sens = _ratio(tp, n_pos)
    if groups is not None and len(groups) != len(targets):
        raise SkinCancerError(f"{len(groups)} lesion ids do not match {len(targets)} targets")
    ci = bootstrap_intervals(truth, p_mal, threshold, n_boot, seed, groups=groups)
    if len(classes) > 2:  # balanced accuracy is 7-class there, not the mean of sensitivity and specificity
        ci["balanced_accuracy"] = None
    out: dict[str, Any] = {
        "n": int(len(targets)),
        "n_malignant": n_pos,
        "accuracy": float((pred == targets).mean()),
        "balanced_accuracy": _balanced_accuracy(targets, pred),
        "auroc": float(roc_auc_score(truth, p_mal)) if n_pos and n_neg else None,
        **{f"{k}_ci95": list(v) if v else None for k, v in ci.items()},
        "ci95_resampled": ("lesions" if groups is not None else "images") if any(ci.values()) else None,
        "threshold": float(threshold),
        "sensitivity": sens,
        "specificity": _ratio(tn, n_neg),
        "ppv": ppv,
        "npv": _ratio(tn, tn + fn),
        "f1": (2 * ppv * sens / (ppv + sens)) if ppv and sens else (0.0 if n_pos else None),
        "confusion_at_threshold": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        # calibration in the large (the mean probability against the share malignant) and the Brier score
        "mean_probability": float(p_mal.mean()),
        "brier": float(np.mean((p_mal - truth) ** 2)),
        "brier_uncalibrated": float(np.mean((scores - truth) ** 2)) if calibration is not None else None,
    }
    if len(classes) > 2:
        present = set(np.unique(targets))
        out["macro_auroc"] = (float(roc_auc_score(targets, probs, multi_class="ovr", average="macro",
                                                  labels=list(range(len(classes)))))
                              if len(present) == len(classes) else None)  # undefined while a class has no example
        out["per_class_recall"] = {c: _ratio(int(((pred == i) & (targets == i)).sum()), int((targets == i).sum()))
                                   for i, c in enumerate(classes)}
    if dx is not None:
        dx = np.asarray(dx)
        out["per_diagnosis_recall"] = {
            d: float((said[dx == d] == (d in MALIGNANT_DX)).mean()) for d in DX_CLASSES if (dx == d).any()}
        out["melanoma"] = melanoma_metrics(dx, p_mal, threshold, n_boot, seed, groups)
    if n_pos and n_neg:
        out["calibration_fit"] = calibration_fit(truth, p_mal, n_boot, seed, groups=groups)
    return {k: _finite_or_none(v) if isinstance(v, float) else v for k, v in out.items()}


def melanoma_metrics(dx, p_malignant, threshold: float, n_boot: int = N_BOOT, seed: int = 0, groups=None) -> dict:
    """Melanoma on its own beside the composite malignant outcome: its photos caught at `threshold`, and the AUROC of
    melanoma against every benign photo (bcc and akiec left out), with intervals; None where either is missing."""
    dx, p = np.asarray(dx), np.asarray(p_malignant, dtype=np.float64)
    keep = (dx == "mel") | ~np.isin(dx, list(MALIGNANT_DX))
    y = dx[keep] == "mel"
    out: dict[str, Any] = {"n_melanoma": int(y.sum()), "sensitivity": None, "sensitivity_ci95": None,
                           "auroc": None, "auroc_ci95": None}
    if not y.any():
        return out
    out["sensitivity"] = float((p[keep][y] >= threshold).mean())
    if not y.all():
        out["auroc"] = float(roc_auc_score(y, p[keep]))
    ci = bootstrap_intervals(y, p[keep], threshold, n_boot, seed, groups=None if groups is None
                             else np.asarray(groups)[keep])
    for k in ("auroc", "sensitivity"):
        interval = ci[k]
        out[f"{k}_ci95"] = list(interval) if interval and out[k] is not None else None
    return out


def _logistic_fit(x: np.ndarray, y: np.ndarray, w: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """Weighted logistic regression of y on the columns of x (with an optional offset), by Newton's method."""
    beta = np.zeros(x.shape[1])
    base = np.zeros(len(y)) if offset is None else offset
    for _ in range(25):
        mu = np.exp(-np.logaddexp(0.0, -(x @ beta + base)))  # the logistic function, without overflow
        grad = x.T @ (w * (y - mu))
        hess = (x * (w * mu * (1 - mu))[:, None]).T @ x
        try:
            step = np.linalg.solve(hess + 1e-9 * np.eye(len(beta)), grad)
        except np.linalg.LinAlgError:
            return np.full(len(beta), np.nan)
        beta += step
        if np.abs(step).max() < 1e-8:
            break
    return beta


def calibration_fit(is_malignant, p_malignant, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
                    groups=None) -> dict:
    """Calibration slope and intercept (logistic recalibration on the logit of the probability), with intervals.

    The slope is b in logit P(malignant) = a + b logit(p): 1 when the probabilities spread as the truth does, under 1
    when they are too extreme. The intercept is a with b fixed at 1 (calibration in the large on the logit scale):
    0 when they are right on average, negative when too high. Whole `groups` (lesions) are resampled where given.
    """
    y = np.asarray(is_malignant, dtype=np.float64)
    p = np.clip(np.asarray(p_malignant, dtype=np.float64), 1e-6, 1 - 1e-6)
    z = np.log(p / (1 - p))
    x = np.stack([np.ones_like(z), z], axis=1)
    ones = np.ones(len(y))

    def fit(w):
        return _logistic_fit(x, y, w)[1], _logistic_fit(x[:, :1], y, w, offset=z)[0]

    slope, intercept = fit(ones)
    out: dict[str, Any] = {"slope": _finite_or_none(slope), "intercept": _finite_or_none(intercept),
                           "slope_ci95": None, "intercept_ci95": None}
    if n_boot > 0:
        reps = np.array([fit(w) for chunk in bootstrap_weights(len(y), n_boot, seed, groups) for w in chunk])
        for i, k in enumerate(("slope", "intercept")):
            ci = _percentiles(reps[:, i], level)
            out[f"{k}_ci95"] = list(ci) if ci else None
    return out


def net_benefit(is_malignant, p_malignant, thresholds) -> np.ndarray:
    """Net benefit of biopsying every lesion whose probability of malignancy reaches each threshold.

    Decision curve analysis (Vickers and Elkin, 2006): true positives per person tested, less false positives
    weighted by the odds of the threshold, t / (1 - t), which a threshold t implies (biopsying 1/t - 1 benign
    lesions is worth finding one malignancy). It reads in malignancies found per person, at the images' prevalence.
    """
    y = np.asarray(is_malignant, dtype=bool)
    return _net_benefits(y, p_malignant, thresholds, np.ones((1, len(y))))[0]


def _net_benefits(y: np.ndarray, p, thresholds, w: np.ndarray) -> np.ndarray:
    """`net_benefit` under each row of weights `w` (replicates, images): an array (replicates, thresholds)."""
    p, t = np.asarray(p, dtype=np.float64), np.asarray(thresholds, dtype=np.float64)
    if len(y) == 0 or not ((t > 0) & (t < 1)).all():
        raise SkinCancerError("net benefit needs images, and thresholds strictly between 0 and 1")
    said = p[None, :] >= t[:, None]  # (thresholds, images)
    tp, fp = w @ (said & y).T, w @ (said & ~y).T  # weighted counts, (replicates, thresholds)
    return (tp - fp * t / (1 - t)) / w.sum(axis=1, keepdims=True)


def paired_net_benefit(is_malignant, p_a, p_b, thresholds, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95,
                       groups=None) -> list[dict]:
    """Model B against model A in net benefit at each threshold probability: both, B - A, and its paired interval.

    At one threshold probability t both models are judged by the same exchange (one malignancy found is worth
    1/t - 1 benign biopsies), so the one with the larger net benefit is the better to act on there, whatever their
    AUROCs. The replicates resample lesions where `groups` are given, the same draws for both models.
    """
    y = np.asarray(is_malignant, dtype=bool)
    p_a, p_b = np.asarray(p_a, dtype=np.float64), np.asarray(p_b, dtype=np.float64)
    if not len(y) == len(p_a) == len(p_b):
        raise SkinCancerError(f"{len(y)} labels, {len(p_a)} and {len(p_b)} probabilities: a paired comparison needs "
                              "both models' predictions of the same images")
    t = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    ones = np.ones((1, len(y)))
    a, b = (_net_benefits(y, p, t, ones)[0] for p in (p_a, p_b))
    reps = [_net_benefits(y, p_b, t, w) - _net_benefits(y, p_a, t, w)
            for w in bootstrap_weights(len(y), max(n_boot, 0), seed, groups)]
    d = np.concatenate(reps) if reps else np.empty((0, len(t)))
    return [{"threshold": float(threshold), "benign_per_malignancy": float(1 / threshold - 1), "a": float(a[i]),
             "b": float(b[i]), **_difference(float(b[i] - a[i]), d[:, i], level)} for i, threshold in enumerate(t)]
