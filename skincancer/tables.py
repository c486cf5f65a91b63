"""Text tables of the numbers, for the command line and notebooks: each row says what it counts."""

from __future__ import annotations

from .labels import MALIGNANT_DX
from .metrics import LESION_SIDES, PAIRED
from .subgroups import MIN_CASES, SUBGROUPS


def interval(value: float, ci=None, digits: int = 3, signed: bool = False) -> str:
    """'value (low-high)', or for a signed difference 'value (low to high)'; the value alone without an interval."""
    form = f"{'+' if signed else ''}.{digits}f"
    text = f"{value:{form}}"
    if ci:
        text += f" ({ci[0]:{form}}{' to ' if signed else '-'}{ci[1]:{form}})"
    return text


def metrics_table(metrics: dict) -> str:
    """A short text table of the headline numbers, each with what it is measured at."""
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
            lo, hi = metrics[f"{k}_ci95"]
            by = f", resampling {metrics['ci95_resampled']}" if k == "auroc" and metrics.get("ci95_resampled") else ""
            notes.append(f"95% CI {lo:.4f}-{hi:.4f}{by}")
        rows.append(f"  {k:<18}{text}" + (f"  ({'; '.join(notes)})" if notes else ""))
    rows.append(f"  {'threshold':<18}{metrics['threshold']:.4f} (probability of malignancy)")
    mel = metrics.get("melanoma")
    if mel and mel["sensitivity"] is not None:
        rows.append(f"  {'melanoma alone':<18}sensitivity {interval(mel['sensitivity'], mel['sensitivity_ci95'])} "
                    f"of {mel['n_melanoma']} melanoma photos at the threshold"
                    + (f"; AUROC against the benign {interval(mel['auroc'], mel['auroc_ci95'])}"
                       if mel["auroc"] is not None else ""))
    fit = metrics.get("calibration_fit")
    if fit and fit["slope"] is not None and fit["intercept"] is not None:
        rows.append(f"  {'calibration':<18}slope {interval(fit['slope'], fit['slope_ci95'])}, intercept "
                    f"{interval(fit['intercept'], fit['intercept_ci95'], signed=True)} (1 and 0 when calibrated)")
    if metrics.get("per_class_recall"):
        rows.append("  recall per class (the predicted class is the true one):")
        rows += [f"    {c:<16}{'null' if r is None else f'{r:.4f}'}" for c, r in metrics["per_class_recall"].items()]
    if metrics.get("per_diagnosis_recall"):
        rows.append("  recall per diagnosis (called malignant or benign rightly at the threshold):")
        rows += [f"    {d:<16}{r:.4f}{'  (malignant)' if d in MALIGNANT_DX else ''}"
                 for d, r in metrics["per_diagnosis_recall"].items()]
    return "\n".join(rows)


def threshold_rule_line(rule, threshold: float) -> str:
    """How the operating threshold was chosen, in a sentence."""
    if isinstance(rule, dict) and "target_sensitivity" in rule:
        confident = (f" on {rule['confidence']:.0%} of its resampled lesions" if rule.get("confidence") else "")
        return (f"threshold {threshold:.4f}: chosen on the {rule.get('chosen_on', 'validation')} split for "
                f"sensitivity >= {rule['target_sensitivity']:.2f}{confident} (valid: sensitivity "
                f"{rule.get('valid_sensitivity', float('nan')):.3f}, specificity "
                f"{rule.get('valid_specificity', float('nan')):.3f})")
    return f"threshold {threshold:.4f}: {rule}"


def target_line(target: dict, split: str = "test") -> str:
    """`target_met` in a sentence: the sensitivity reached against its target, and how often it is met."""
    if target["sensitivity"] is None:
        return f"{split}: no malignant image, so the sensitivity target cannot be checked"
    line = (f"{split}: sensitivity {target['sensitivity']:.3f} against the target {target['target_sensitivity']:.2f}"
            f" ({'met' if target['met'] else 'missed'})")
    if target["share_of_replicates_met"] is not None:
        line += f"; met on {target['share_of_replicates_met']:.0%} of {target['replicates']:,} resampled {split} sets"
    return line


def paired_table(paired: dict, names: tuple[str, str] = ("A", "B")) -> list[str]:
    """The lines of a text table of a `paired_bootstrap`: each statistic for both sides, and their difference."""
    name_a, name_b = names
    width = max(len(name_a), len(name_b), 8)
    level = round(100 * paired["level"])
    how = f" ({level}% CI, {paired['resampled']} resampled), p" if paired["replicates"] > 0 else " (no bootstrap)"
    rows = [f"  {'':<18}{name_a:>{width}} {name_b:>{width}}  {name_b} - {name_a}{how}"]
    for k in PAIRED:
        r = paired[k]
        if r["difference"] is None:
            rows.append(f"  {k:<18}{'null (undefined)':>{2 * width + 1}}")
            continue
        p = f", p {r['p_value']:.3f}" if r["ci"] else ""
        rows.append(f"  {k:<18}{r['a']:>{width}.4f} {r['b']:>{width}.4f}  "
                    f"{interval(r['difference'], r['ci'], 4, signed=True)}{p}")
    return rows


def comparison_table(result: dict) -> str:
    """A short text table of a `compare` result: each statistic for both models, and B - A with its interval."""
    names = tuple(result["names"])
    rows = paired_table(result["difference"], names)
    rows.append(f"  (sensitivity and specificity at each model's own threshold: {result['a']['threshold']:.4f} "
                f"and {result['b']['threshold']:.4f}; n {result['n']}, {result['n_malignant']} malignant)")
    for row in result.get("net_benefit", []):
        p = f", p {row['p_value']:.3f}" if row["ci"] else ""
        rows.append(f"  net benefit at threshold probability {row['threshold']:.4f} (1 malignancy = "
                    f"{row['benign_per_malignancy']:.1f} benign biopsies): {row['a']:.4f} and {row['b']:.4f}, "
                    f"{names[1]} - {names[0]} {interval(row['difference'], row['ci'], 4, signed=True)}{p}")
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


def prevalence_table(rows: list[dict]) -> str:
    """A short text table of `at_prevalence`: PPV and NPV with intervals, and what the call does per 1,000 lesions."""
    def cell(row, k):
        return "undefined" if row[k] is None else interval(row[k], row[f"{k}_ci95"])

    unit = rows[0]["unit"] if rows else "lesions"
    lines = [f"  {'prevalence':<12}{'PPV':<22}{'NPV':<22}per 1,000 {unit} (rates of {unit})"]
    for row in rows:
        n = row["per_1000"]
        lines.append(f"  {row['prevalence']:<12.3g}{cell(row, 'ppv'):<22}{cell(row, 'npv'):<22}"
                     f"{n['found']:.0f} of {n['malignant']:.0f} malignant found, "
                     f"{n['benign_called_malignant']:.0f} benign called malignant")
    return "\n".join(lines)


def subgroup_table(rows: list[dict], names: tuple[str, str] | None = None) -> str:
    """A short text table of `subgroup_metrics` (or, given two models' `names`, `paired_subgroup_metrics`)."""
    difference = names is not None

    def cell(row, k, signed=difference):
        if row[k] is None:
            return "too few"
        return interval(row[k], row[f"{k}_ci95"], 3 if signed else 2, signed)

    width, of = (26, f" ({names[1]} - {names[0]})") if names else (18, "")
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
