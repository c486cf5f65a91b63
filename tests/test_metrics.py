"""The numbers: the operating threshold, metrics against sklearn, bootstrap intervals over lesions, paired
differences, lesion by lesion, other prevalences, net benefit, calibration in the large."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import subgroup_frame
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_score, roc_auc_score

from skincancer import SkinCancerError
from skincancer.labels import DX_CLASSES
from skincancer.metrics import (
    at_prevalence,
    bootstrap_auroc,
    bootstrap_intervals,
    calibration_in_the_large,
    choose_threshold,
    classification_metrics,
    lesion_metrics,
    lesion_scores,
    net_benefit,
    paired_bootstrap,
    paired_net_benefit,
    predicted_classes,
    weighted_aurocs,
)
from skincancer.plotting import plot_decision_curve, plot_lesions
from skincancer.tables import lesion_table, metrics_table, prevalence_table


@settings(max_examples=80, deadline=None)
@given(p=st.lists(st.floats(0, 1), min_size=2, max_size=60), y=st.lists(st.booleans(), min_size=2, max_size=60),
       target=st.floats(0.05, 1.0))
def test_threshold_makes_the_fewest_calls_that_reach_the_target_and_sits_between_scores(p, y, target):
    n = min(len(p), len(y))
    p, y = np.array(p[:n]), np.array(y[:n])
    if not y.any():
        with pytest.raises(SkinCancerError, match="no malignant case"):
            choose_threshold(p, y, target)
        return
    t = choose_threshold(p, y, target)
    assert (p[y] >= t).mean() >= target - 1e-9
    last = p[y][p[y] >= t].min()  # the last malignant image caught
    higher = p[y][p[y] > last]
    if len(higher):
        assert (p[y] >= higher.min()).mean() < target  # any stricter threshold misses the target
    assert ((p >= t) == (p >= last)).all()  # the calls of a threshold on its score
    below = p[p < last]
    if len(below) and below.max() < (last + below.max()) / 2:  # halfway to the next score: a nudge changes no call
        assert t == (last + below.max()) / 2


def _binary_case():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.2
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return np.stack([1 - p, p], axis=1), y.astype(int)


def test_metrics_at_the_threshold_agree_with_sklearn():
    probs, targets = _binary_case()
    m = classification_metrics(probs, targets, ["benign", "malignant"], threshold=0.55, n_boot=300)
    said = probs[:, 1] >= 0.55
    assert m["sensitivity"] == pytest.approx(said[targets == 1].mean())
    assert m["specificity"] == pytest.approx((~said[targets == 0]).mean())
    assert m["ppv"] == pytest.approx(precision_score(targets, said))
    assert m["f1"] == pytest.approx(f1_score(targets, said))
    # accuracy and balanced accuracy make the same call, not the most likely class (which is the call at 0.5)
    assert m["accuracy"] == pytest.approx((said == targets).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, said))
    assert m["balanced_accuracy"] == pytest.approx((m["sensitivity"] + m["specificity"]) / 2)
    assert m["balanced_accuracy"] != pytest.approx(balanced_accuracy_score(targets, probs.argmax(axis=1)))
    assert m["auroc"] == pytest.approx(roc_auc_score(targets, probs[:, 1]))
    lo, hi = m["auroc_ci95"]
    assert lo < m["auroc"] < hi and hi - lo < 0.2
    c = m["confusion_at_threshold"]
    assert c["tp"] + c["fn"] == m["n_malignant"] and sum(c.values()) == m["n"] == 400


def test_sensitivity_and_specificity_intervals_have_the_binomial_width_and_resample_lesions():
    rng = np.random.default_rng(2)
    y = rng.random(2000) < 0.2
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    probs, targets = np.stack([1 - p, p], axis=1), y.astype(int)
    m = classification_metrics(probs, targets, ["benign", "malignant"], threshold=0.5, n_boot=1000)
    for k, n in (("sensitivity", y.sum()), ("specificity", (~y).sum())):
        lo, hi = m[f"{k}_ci95"]
        binomial = 2 * 1.96 * np.sqrt(m[k] * (1 - m[k]) / n)  # the normal approximation, fine at these counts
        assert lo < m[k] < hi and hi - lo == pytest.approx(binomial, rel=0.15), k
    lo, hi = m["balanced_accuracy_ci95"]
    assert lo < m["balanced_accuracy"] < hi
    # three photos of each lesion: the intervals are those of one photo each, not narrower
    lesions = np.repeat([f"lesion{i:04d}" for i in range(len(y))], 3)
    tripled = classification_metrics(np.repeat(probs, 3, axis=0), np.repeat(targets, 3), ["benign", "malignant"],
                                     threshold=0.5, n_boot=1000, groups=lesions)
    for k in ("auroc", "sensitivity", "specificity", "balanced_accuracy"):
        assert tripled[f"{k}_ci95"] == pytest.approx(m[f"{k}_ci95"]), k
    seven = classification_metrics(rng.dirichlet(np.ones(7), size=70), np.tile(np.arange(7), 10), DX_CLASSES,
                                   n_boot=100)
    assert seven["balanced_accuracy_ci95"] is None and seven["sensitivity_ci95"] is not None  # 7-class: not the mean


def test_weighted_aurocs_are_sklearns_with_sample_weights_ties_included():
    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    p = np.round(rng.normal(0.4 + 0.2 * y, 0.2), 1)  # rounded: many tied scores
    w = rng.integers(0, 4, size=(5, 300))
    expected = [roc_auc_score(y, p, sample_weight=row) for row in w]
    assert weighted_aurocs(y, p, w) == pytest.approx(expected, abs=1e-12)
    assert weighted_aurocs(y, p, np.ones(300))[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_the_auroc_interval_resamples_lesions_not_their_photos():
    probs, targets = _binary_case()
    y, p = targets.astype(bool), probs[:, 1]
    one_each = bootstrap_auroc(y, p, n_boot=500, seed=3)
    # every lesion photographed three times: three copies of each image, one lesion id for each triple
    lesions = np.repeat([f"lesion{i:04d}" for i in range(len(y))], 3)  # ids sort in image order: same draws
    y3, p3 = np.repeat(y, 3), np.repeat(p, 3)
    by_lesion = bootstrap_auroc(y3, p3, n_boot=500, seed=3, groups=lesions)
    by_image = bootstrap_auroc(y3, p3, n_boot=500, seed=3)
    assert by_lesion == pytest.approx(one_each)  # copies add no information, so no precision
    assert by_image[1] - by_image[0] < 0.7 * (by_lesion[1] - by_lesion[0])  # resampling photos overstates it
    m = classification_metrics(probs, targets, ["benign", "malignant"], n_boot=100, groups=np.arange(len(y)))
    assert m["ci95_resampled"] == "lesions"
    assert classification_metrics(probs, targets, ["benign", "malignant"], n_boot=100)["ci95_resampled"] \
        == "images"
    with pytest.raises(SkinCancerError, match="3 lesion ids do not match 400 targets"):
        classification_metrics(probs, targets, ["benign", "malignant"], n_boot=100, groups=["a", "b", "c"])


def _two_models(n: int = 1500, seed: int = 0):
    """Labels and two models' probabilities that share most of their errors (as two trainings on one split do)."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.2
    hard = rng.normal(0, 1, n)  # what makes an image hard, for both models alike
    p_a = 1 / (1 + np.exp(-(1.5 * y + hard + 0.4 * rng.normal(0, 1, n))))
    p_b = 1 / (1 + np.exp(-(1.7 * y + hard + 0.4 * rng.normal(0, 1, n))))
    return y, p_a, p_b


def test_a_paired_comparison_sees_a_difference_that_two_separate_intervals_hide():
    y, p_a, p_b = _two_models()
    paired = paired_bootstrap(y, p_a, p_b, n_boot=1000)
    auroc = paired["auroc"]
    assert auroc["a"] == pytest.approx(roc_auc_score(y, p_a)) and auroc["b"] == pytest.approx(roc_auc_score(y, p_b))
    assert auroc["difference"] == pytest.approx(roc_auc_score(y, p_b) - roc_auc_score(y, p_a))
    (lo_a, hi_a), (lo_b, hi_b) = bootstrap_auroc(y, p_a, n_boot=1000), bootstrap_auroc(y, p_b, n_boot=1000)
    assert lo_b < hi_a  # one at a time, the two intervals overlap ...
    lo, hi = auroc["ci"]
    assert 0 < lo < auroc["difference"] < hi and auroc["p_value"] < 0.05  # ... paired, B is better
    # the shared errors cancel: the interval is much narrower than for two independent estimates
    assert hi - lo < 0.6 * np.hypot(hi_a - lo_a, hi_b - lo_b)
    same = paired_bootstrap(y, p_a, p_a, 0.3, 0.3, n_boot=200)
    for k in ("auroc", "sensitivity", "specificity", "balanced_accuracy"):
        assert same[k]["difference"] == 0 and same[k]["ci"] == [0, 0] and same[k]["p_value"] == 1


def test_paired_call_statistics_are_at_each_models_own_threshold_and_lesions_are_resampled_whole():
    y, p_a, p_b = _two_models(n=400, seed=1)
    paired = paired_bootstrap(y, p_a, p_b, 0.3, 0.6, n_boot=300)
    probs = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731
    for key, p, t in (("a", p_a, 0.3), ("b", p_b, 0.6)):
        m = classification_metrics(probs(p), y.astype(int), ["benign", "malignant"], threshold=t)
        for k in ("sensitivity", "specificity", "balanced_accuracy"):
            assert paired[k][key] == pytest.approx(m[k])
    assert paired["sensitivity"]["difference"] < 0 < paired["specificity"]["difference"]  # B's threshold is higher
    # every lesion photographed three times: copies add no precision, so the interval is the one of single photos
    lesions = np.repeat([f"lesion{i:04d}" for i in range(len(y))], 3)
    tripled = paired_bootstrap(np.repeat(y, 3), np.repeat(p_a, 3), np.repeat(p_b, 3), 0.3, 0.6, n_boot=300,
                               groups=lesions)
    assert tripled["resampled"] == "lesions" and paired["resampled"] == "images"
    assert tripled["auroc"]["ci"] == pytest.approx(paired["auroc"]["ci"])
    with pytest.raises(SkinCancerError, match="400 labels, 400 and 399 probabilities"):
        paired_bootstrap(y, p_a, p_b[:-1])
    with pytest.raises(SkinCancerError, match="2 lesion ids do not match 400 images"):
        paired_bootstrap(y, p_a, p_b, groups=["a", "b"])


def test_a_side_of_several_trainings_is_their_mean_on_the_same_replicates():
    y, p_a, p_b = _two_models(n=600, seed=2)
    rng = np.random.default_rng(3)
    p_a2, p_b2 = (np.clip(p + rng.normal(0, 0.05, len(p)), 0, 1) for p in (p_a, p_b))  # second trainings
    arms = paired_bootstrap(y, [p_a, p_a2], [p_b, p_b2], [0.3, 0.35], 0.6, n_boot=300)
    assert arms["runs"] == {"a": 2, "b": 2}
    assert arms["auroc"]["a"] == pytest.approx((roc_auc_score(y, p_a) + roc_auc_score(y, p_a2)) / 2)
    assert arms["auroc"]["b"] == pytest.approx((roc_auc_score(y, p_b) + roc_auc_score(y, p_b2)) / 2)
    sens = [((p >= t) & y).sum() / y.sum() for p, t in ((p_a, 0.3), (p_a2, 0.35))]  # each run at its own threshold
    assert arms["sensitivity"]["a"] == pytest.approx(np.mean(sens))
    # a side repeated adds nothing: the same replicates give the one-run result exactly
    once, twice = paired_bootstrap(y, p_a, p_b, n_boot=300), paired_bootstrap(y, [p_a, p_a], [p_b], n_boot=300)
    assert twice["auroc"]["ci"] == pytest.approx(once["auroc"]["ci"])
    assert twice["auroc"]["se"] == pytest.approx(once["auroc"]["se"])
    lo, hi = once["auroc"]["ci"]
    assert once["auroc"]["se"] == pytest.approx((hi - lo) / (2 * 1.96), rel=0.2)
    with pytest.raises(SkinCancerError, match="the runs of one side must each predict the same images"):
        paired_bootstrap(y, [p_a, p_a[:-1]], p_b)


def test_undefined_metrics_are_null_not_misleading():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    m = classification_metrics(probs, np.zeros(3, int), ["benign", "malignant"], n_boot=100)
    assert m["auroc"] is None and m["auroc_ci95"] is None and m["sensitivity"] is None and m["f1"] is None
    assert m["sensitivity_ci95"] is None and m["balanced_accuracy_ci95"] is None
    assert m["specificity"] == 1.0 and m["specificity_ci95"] == [1.0, 1.0]
    assert bootstrap_auroc([1, 1, 1], [0.2, 0.5, 0.9]) == (None, None)


def test_seven_class_metrics_sum_the_malignant_diagnoses():
    rng = np.random.default_rng(1)
    targets = np.tile(np.arange(7), 10)
    probs = rng.dirichlet(np.ones(7), size=len(targets))
    dx = np.array(DX_CLASSES)[targets]
    m = classification_metrics(probs, targets, DX_CLASSES, dx=dx)
    assert 0 <= m["macro_auroc"] <= 1 and set(m["per_class_recall"]) == set(DX_CLASSES)
    mal = np.isin(dx, ["mel", "bcc", "akiec"])
    p_mal = probs[:, [DX_CLASSES.index(d) for d in ("akiec", "bcc", "mel")]].sum(1)
    assert m["auroc"] == pytest.approx(roc_auc_score(mal, p_mal))
    assert m["per_diagnosis_recall"]["mel"] == pytest.approx((p_mal[dx == "mel"] >= 0.5).mean())
    # 7-class accuracy is by the most likely diagnosis, whatever the malignancy threshold
    low = classification_metrics(probs, targets, DX_CLASSES, threshold=0.1)
    for m_ in (m, low):
        assert m_["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, probs.argmax(axis=1)))
    assert low["sensitivity"] > m["sensitivity"]
    missing_class = classification_metrics(probs[targets != 3], targets[targets != 3], DX_CLASSES)
    assert missing_class["macro_auroc"] is None


def test_lesion_scores_average_a_lesions_photos_and_refuse_a_lesion_with_two_truths():
    lesions, y, p = np.array(["b", "a", "b", "c"]), np.array([1, 0, 1, 0], bool), np.array([0.2, 0.5, 0.6, 0.1])
    y_lesion, p_lesion, codes = lesion_scores(lesions, y, p)
    assert list(y_lesion) == [False, True, False] and p_lesion == pytest.approx([0.5, 0.4, 0.1])  # a, b, c
    assert list(codes) == [1, 0, 1, 2]
    with pytest.raises(SkinCancerError, match="1 lesions have both benign and malignant photos, e.g. b"):
        lesion_scores(lesions, np.array([1, 0, 0, 0], bool), p)
    with pytest.raises(SkinCancerError, match="3 lesion ids, 4 truths"):
        lesion_scores(lesions[:3], y, p)


def test_with_one_photo_a_lesion_the_three_counts_agree():
    rng = np.random.default_rng(1)
    y, p = rng.random(200) < 0.3, rng.random(200)
    m = lesion_metrics([f"L{i}" for i in range(200)], y, p, 0.5, n_boot=100)
    for k in ("auroc", "sensitivity", "specificity", "auroc_ci95"):
        assert m["one_photo"][k] == pytest.approx(m["each_photo"][k])
        assert m["all_photos"][k] == pytest.approx(m["each_photo"][k])
    assert m["difference"]["auroc"]["difference"] == 0 and m["lesions_with_several_photos"] == 0


def test_paired_net_benefit_judges_both_models_by_one_exchange_on_the_same_lesions():
    rng = np.random.default_rng(2)
    n = 600
    lesions = np.array([f"L{i // 2}" for i in range(n)])
    y = np.repeat(rng.random(n // 2) < 0.25, 2)
    p_a = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    p_b = p_a.copy()
    spared = np.flatnonzero(~y & (p_a >= 0.2))[:30]  # B clears 30 benign photos that A would biopsy at 0.2
    p_b[spared] = 0.01
    rows = paired_net_benefit(y, p_a, p_b, [0.2, 0.5], n_boot=300, groups=lesions)
    assert [r["threshold"] for r in rows] == [0.2, 0.5]
    for r in rows:
        assert r["a"] == pytest.approx(net_benefit(y, p_a, [r["threshold"]])[0])
        assert r["b"] == pytest.approx(net_benefit(y, p_b, [r["threshold"]])[0])
    at_02 = rows[0]
    assert at_02["difference"] == pytest.approx(30 / n * 0.2 / 0.8)  # 30 false positives less, at odds 1:4
    assert at_02["ci"][0] > 0 and at_02["p_value"] < 0.05 and at_02["benign_per_malignancy"] == pytest.approx(4)
    same = paired_net_benefit(y, p_a, p_a, [0.2], n_boot=100)[0]
    assert same["difference"] == 0 and same["ci"] == [0, 0]
    with pytest.raises(SkinCancerError, match="same images"):
        paired_net_benefit(y, p_a, p_b[:-1], [0.2])
    with pytest.raises(SkinCancerError, match="strictly between 0 and 1"):
        paired_net_benefit(y, p_a, p_b, [0.0])


def test_calibration_in_the_large_is_the_mean_gap_and_its_interval_resamples_lesions():
    rng = np.random.default_rng(1)
    y = rng.random(400) < 0.2
    p = np.clip(0.1 + 0.5 * y + rng.normal(0, 0.1, 400), 0, 1)
    one_each = calibration_in_the_large(y, p, n_boot=1000, seed=3)
    assert one_each["calibration_gap"] == pytest.approx(p.mean() - y.mean())
    assert one_each["mean_probability"] == pytest.approx(p.mean()) and one_each["share_malignant"] == y.mean()
    lo, hi = one_each["calibration_gap_ci95"]
    se = (p - y).std(ddof=1) / np.sqrt(len(y))  # a mean's standard error: the bootstrap should agree
    assert lo == pytest.approx(one_each["calibration_gap"] - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(one_each["calibration_gap"] + 1.96 * se, abs=0.3 * se)
    lesions = np.repeat([f"lesion{i:04d}" for i in range(len(y))], 3)  # three photos of every lesion
    y3, p3 = np.repeat(y, 3), np.repeat(p, 3)
    by_lesion = calibration_in_the_large(y3, p3, n_boot=1000, seed=3, groups=lesions)["calibration_gap_ci95"]
    by_image = calibration_in_the_large(y3, p3, n_boot=1000, seed=3)["calibration_gap_ci95"]
    assert by_lesion == pytest.approx([lo, hi])  # copies add no information
    assert by_image[1] - by_image[0] < 0.7 * (by_lesion[1] - by_lesion[0])
    assert calibration_in_the_large(y, p, n_boot=0)["calibration_gap_ci95"] is None


def test_predicted_classes_follow_the_threshold_for_binary_and_the_top_class_for_dx():
    probs = np.array([[0.65, 0.35], [0.8, 0.2], [0.45, 0.55]])
    # 0.35 is malignant at a 0.3 threshold although benign is the more likely class
    assert predicted_classes(probs, ["benign", "malignant"], threshold=0.3).tolist() == [1, 0, 1]
    assert predicted_classes(probs, ["benign", "malignant"], threshold=0.6).tolist() == [0, 0, 0]
    m = classification_metrics(probs, np.array([1, 0, 1]), ["benign", "malignant"], threshold=0.3)
    assert m["confusion_at_threshold"] == {"tp": 2, "fn": 0, "tn": 1, "fp": 0}  # the same call as the plots'
    seven = np.eye(7)[[5, 4]] * 0.5 + 0.5 / 7
    assert predicted_classes(seven, DX_CLASSES, threshold=0.01).tolist() == [5, 4]  # dx: most likely diagnosis


def _lesion_case(n_lesions: int = 9, seed: int = 3):
    """Lesions of 1 to 3 photos, one truth each, and photo probabilities that vary within a lesion."""
    rng = np.random.default_rng(seed)
    photos = rng.integers(1, 4, n_lesions)
    photos[:2] = (3, 1)
    truth = np.arange(n_lesions) % 3 == 0
    lesions = np.repeat([f"L{i}" for i in range(n_lesions)], photos)
    y = np.repeat(truth, photos)
    return lesions, y, np.clip(0.3 * y + rng.random(len(y)), 0, 1)


def test_one_photo_a_lesion_is_the_expectation_over_which_photo_and_all_photos_are_averaged():
    import itertools

    lesions, y, p = _lesion_case()
    m = lesion_metrics(lesions, y, p, 0.6, n_boot=300)
    assert (m["n_lesions"], m["n_photos"], m["n_malignant"]) == (9, len(y), 3)
    draws = []  # every way of picking one photo of each lesion, scored as a set of 9 images
    for pick in itertools.product(*[np.flatnonzero(lesions == f"L{i}") for i in range(9)]):
        yk, pk = y[list(pick)], p[list(pick)]
        draws.append((roc_auc_score(yk, pk), (pk[yk] >= 0.6).mean(), (pk[~yk] < 0.6).mean()))
    expected = np.mean(draws, axis=0)
    one = m["one_photo"]
    assert [one["auroc"], one["sensitivity"], one["specificity"]] == pytest.approx(expected)
    y_lesion, p_lesion, _ = lesion_scores(lesions, y, p)
    every = m["all_photos"]
    assert every["auroc"] == pytest.approx(roc_auc_score(y_lesion, p_lesion))
    assert every["specificity"] == pytest.approx((p_lesion[~y_lesion] < 0.6).mean())
    d = m["difference"]
    assert d["auroc"]["difference"] == pytest.approx(every["auroc"] - one["auroc"]) and d["resampled"] == "lesions"
    # photo by photo is the usual count, on the same lesion replicates as classification_metrics' intervals
    each = bootstrap_intervals(y, p, 0.6, 300, groups=lesions)
    assert m["each_photo"]["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert m["each_photo"]["auroc_ci95"] == pytest.approx(list(each["auroc"]))
    assert m["each_photo"]["specificity_ci95"] == pytest.approx(list(each["specificity"]))
    table = lesion_table(m)
    assert "one photo" in table and "all photos" in table and "9 lesions, 3 malignant" in table
    fig = plot_lesions(m)
    assert len(fig.axes) == 2 and len(fig.axes[0].get_legend().get_texts()) == 3


def test_ppv_and_npv_at_a_prevalence_follow_bayes_and_at_the_samples_own_are_the_counted_ones():
    df, y_photo, p_photo = subgroup_frame()
    lesions = df["lesion_id"].to_numpy()
    y_photo = np.array([y_photo[lesions == lesion].any() for lesion in lesions])  # one diagnosis a lesion
    # a clinic's prevalence counts lesions: the rates are lesions', each on the mean of its photos
    y, p, _ = lesion_scores(df["lesion_id"], y_photo, p_photo)
    assert len(y) < len(y_photo)
    said = p >= 0.6
    sens, spec = (said & y).sum() / y.sum(), (~said & ~y).sum() / (~y).sum()
    own = y.mean()
    rows = at_prevalence(y_photo, p_photo, 0.6, [own, 0.05, 0.01], n_boot=300, groups=df["lesion_id"])
    assert {r["unit"] for r in rows} == {"lesions"}
    assert "per 1,000 lesions" in prevalence_table(rows)
    photos = at_prevalence(y_photo, p_photo, 0.6, [0.05], n_boot=0)
    assert photos[0]["unit"] == "photos" and "per 1,000 photos" in prevalence_table(photos)
    assert rows[0]["ppv"] == pytest.approx((said & y).sum() / said.sum())  # the images' own prevalence: counted
    assert rows[0]["npv"] == pytest.approx((~said & ~y).sum() / (~said).sum())
    for row, prevalence in zip(rows, [own, 0.05, 0.01]):
        assert row["ppv"] == pytest.approx(sens * prevalence / (sens * prevalence + (1 - spec) * (1 - prevalence)))
        assert row["ppv_ci95"][0] < row["ppv"] < row["ppv_ci95"][1] and row["npv_ci95"][0] <= row["npv"]
        n = row["per_1000"]
        assert n["found"] + n["missed"] == pytest.approx(n["malignant"]) == pytest.approx(1000 * prevalence)
        assert n["benign_called_malignant"] == pytest.approx(1000 * (1 - prevalence) * (1 - spec))
    assert rows[0]["ppv"] > rows[1]["ppv"] > rows[2]["ppv"] and rows[0]["npv"] < rows[1]["npv"] < rows[2]["npv"]
    table = prevalence_table(rows)
    assert len(table.splitlines()) == 4 and f"{1000 * 0.05 * sens:.0f} of 50 malignant found" in table
    assert at_prevalence(y, p, 0.6, [0.05], n_boot=0)[0]["ppv_ci95"] is None
    assert at_prevalence(np.zeros(5, bool), p[:5], 0.6, [0.05]) == []  # no sensitivity without a malignant case
    for bad in (0, 1, 1.5, "five"):
        with pytest.raises(SkinCancerError, match="prevalence"):
            at_prevalence(y, p, 0.6, [bad])


def test_net_benefit_is_true_positives_less_weighted_false_positives_and_bounded_by_the_prevalence():
    _, y, p = subgroup_frame()
    thresholds = np.array([0.05, 0.3, 0.6, 0.9])
    got = net_benefit(y, p, thresholds)
    for t, value in zip(thresholds, got):
        tp, fp = ((p >= t) & y).sum(), ((p >= t) & ~y).sum()
        assert value == pytest.approx(tp / len(y) - fp / len(y) * t / (1 - t))
    assert net_benefit(y, y.astype(float), thresholds) == pytest.approx(np.full(4, y.mean()))  # a perfect model
    biopsy_all = net_benefit(y, np.ones(len(y)), thresholds)  # calls everything malignant
    assert biopsy_all == pytest.approx(y.mean() - (1 - y.mean()) * thresholds / (1 - thresholds))
    for bad in ([0.0], [1.0]):
        with pytest.raises(SkinCancerError, match="strictly between 0 and 1"):
            net_benefit(y, p, bad)
    fig = plot_decision_curve(y, p, 0.25)
    assert "1 malignancy = 3.0 benign" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()][-1]


def test_the_confident_threshold_keeps_its_promise_on_new_samples_and_the_plain_one_half_the_time():
    from skincancer.metrics import choose_confident_threshold

    # malignant scores uniform on (0, 1): a threshold t catches 1 - t of new malignant photos, exactly
    rng = np.random.default_rng(0)
    met = {"plain": [], "confident": []}
    for _ in range(120):
        p = np.r_[rng.uniform(size=150), rng.uniform(size=600) ** 3]
        y = np.r_[np.ones(150, bool), np.zeros(600, bool)]
        met["plain"].append(1 - choose_threshold(p, y, 0.9) >= 0.9)
        met["confident"].append(1 - choose_confident_threshold(p, y, 0.9, 0.95, n_boot=300) >= 0.9)
    assert 0.3 < np.mean(met["plain"]) < 0.75
    assert np.mean(met["confident"]) > 0.88


def test_the_confident_threshold_resamples_lesions_and_lies_between_scores():
    from skincancer.metrics import choose_confident_threshold, replicate_thresholds

    rng = np.random.default_rng(1)
    p = np.r_[rng.uniform(size=60), rng.uniform(size=200) ** 2]
    y = np.r_[np.ones(60, bool), np.zeros(200, bool)]
    t = choose_confident_threshold(p, y, 0.9, 0.95, n_boot=500)
    assert t <= choose_threshold(p, y, 0.9) and t not in set(p)
    assert (p[y] >= t).mean() >= 0.9
    # each malignant photo four times over (as one lesion): resampled as lesions, the margin is the same as for
    # the 60 photos; resampled as photos, it would shrink as if there were 240 independent ones
    lesions = np.r_[np.repeat(np.arange(60), 4), 100 + np.arange(200)]
    p4, y4 = np.r_[np.repeat(p[:60], 4), p[60:]], np.r_[np.ones(240, bool), np.zeros(200, bool)]
    by_lesion = replicate_thresholds(p4, y4, 0.9, 500, groups=lesions)
    by_photo = replicate_thresholds(p4, y4, 0.9, 500)
    assert np.std(by_lesion) > 1.5 * np.std(by_photo)
    assert choose_confident_threshold(p4, y4, 0.9, 0.95, 500, groups=lesions) < \
        choose_confident_threshold(p4, y4, 0.9, 0.95, 500)
    with pytest.raises(SkinCancerError, match="confidence"):
        choose_confident_threshold(p, y, 0.9, 1.0)


def test_target_met_counts_the_replicates_that_reach_the_target():
    from skincancer.metrics import target_met

    p = np.r_[np.linspace(0.05, 1, 100), np.zeros(50)]
    y = np.r_[np.ones(100, bool), np.zeros(50, bool)]
    exact = target_met(y, p, threshold=0.145, target_sensitivity=0.9, n_boot=400)  # 90 of 100 caught
    assert exact["sensitivity"] == pytest.approx(0.9) and exact["met"] is True
    assert 0.35 < exact["share_of_replicates_met"] < 0.7 and exact["replicates"] == 400
    assert target_met(y, p, 0.01, 0.9, n_boot=200)["share_of_replicates_met"] == 1.0
    assert target_met(y, p, 0.5, 0.9, n_boot=200)["met"] is False
    assert target_met(~y & y, p, 0.5, 0.9)["sensitivity"] is None


def test_calibration_slope_and_intercept_recover_a_known_miscalibration():
    from skincancer.metrics import calibration_fit

    rng = np.random.default_rng(0)
    z = rng.normal(size=3000) * 2 - 1.5
    y = rng.uniform(size=3000) < 1 / (1 + np.exp(-z))
    right = calibration_fit(y, 1 / (1 + np.exp(-z)), n_boot=200)
    assert right["slope_ci95"][0] < 1 < right["slope_ci95"][1]
    assert right["intercept_ci95"][0] < 0 < right["intercept_ci95"][1]
    extreme = calibration_fit(y, 1 / (1 + np.exp(-2 * z)), n_boot=200)  # twice too steep: slope about a half
    assert extreme["slope"] == pytest.approx(0.5, abs=0.07) and extreme["slope_ci95"][1] < 1
    high = calibration_fit(y, 1 / (1 + np.exp(-(z + 1))), n_boot=200)  # one logit too high: intercept about -1
    assert high["intercept"] == pytest.approx(-1, abs=0.15) and high["slope"] == pytest.approx(1, abs=0.1)


def test_melanoma_alone_is_scored_against_the_benign_only():
    from skincancer.metrics import melanoma_metrics

    dx = np.array(["mel"] * 4 + ["bcc"] * 3 + ["nv"] * 5)
    p = np.array([0.9, 0.8, 0.3, 0.7, 0.05, 0.05, 0.05, 0.1, 0.2, 0.4, 0.6, 0.1])
    m = melanoma_metrics(dx, p, threshold=0.5, n_boot=200)
    assert m["n_melanoma"] == 4 and m["sensitivity"] == 0.75
    assert m["auroc"] == pytest.approx(roc_auc_score([1] * 4 + [0] * 5, np.r_[p[:4], p[7:]]))  # bcc left out
    assert m["auroc_ci95"][0] <= m["auroc"] <= m["auroc_ci95"][1]
    assert melanoma_metrics(dx[4:], p[4:], 0.5)["sensitivity"] is None
    metrics = classification_metrics(np.stack([1 - p, p], 1), (np.isin(dx, ["mel", "bcc"])).astype(int),
                                     ["benign", "malignant"], 0.5, dx=dx, n_boot=0)
    assert metrics["melanoma"]["sensitivity"] == 0.75 and "melanoma alone" in metrics_table(metrics)
    assert "calibration" in metrics_table(metrics) and metrics["calibration_fit"]["slope"] is not None
