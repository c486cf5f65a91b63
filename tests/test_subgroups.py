"""Results by subgroup: each subgroup's own numbers, paired differences, calibration gaps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import subgroup_frame
from sklearn.metrics import roc_auc_score

from skincancer import SkinCancerError
from skincancer.metrics import bootstrap_intervals, calibration_in_the_large, paired_bootstrap
from skincancer.plotting import plot_subgroups
from skincancer.subgroups import MIN_CASES, paired_subgroup_metrics, subgroup_labels, subgroup_metrics
from skincancer.tables import subgroup_table


def test_subgroup_metrics_are_each_subgroups_own_and_small_ones_say_too_few():
    df, y, p = subgroup_frame()
    rows = subgroup_metrics(df, y, p, 0.6, n_boot=200, groups=df["lesion_id"])
    assert {r["column"] for r in rows} == {"sex", "age", "localization"}
    ages = [r["subgroup"] for r in rows if r["column"] == "age"]
    assert ages == ["0-29", "30-44", "45-59", "75+", "unknown"]  # in order; '', 'n/a' unknown; no empty band
    band = {"29.0": "0-29", "30": "30-44", "44.9": "30-44", "45": "45-59", "75.0": "75+", "90": "75+"}
    for r in rows:
        column, name = r["column"], r["subgroup"]
        if column == "age":
            inside = df["age"].map(band).fillna("unknown").to_numpy() == name
        else:
            inside = df[column].replace("", "unknown").to_numpy() == name
        yk, pk = y[inside], p[inside]
        assert r["n"] == inside.sum() and r["n_malignant"] == yk.sum()
        if column == "localization" and name == "ear":  # 4 malignant: no AUROC or sensitivity; 16 benign suffice
            assert r["auroc"] is None and r["sensitivity"] is None and r["auroc_ci95"] is None
            assert r["specificity"] == pytest.approx((pk[~yk] < 0.6).mean()) and r["specificity_ci95"] is not None
            continue
        assert min(yk.sum(), (~yk).sum()) >= MIN_CASES
        assert r["auroc"] == pytest.approx(roc_auc_score(yk, pk))
        assert r["sensitivity"] == pytest.approx((pk[yk] >= 0.6).mean())
        assert r["specificity"] == pytest.approx((pk[~yk] < 0.6).mean())
        ci = bootstrap_intervals(yk, pk, 0.6, 200, groups=df["lesion_id"].to_numpy()[inside])  # lesions, in it
        assert r["auroc_ci95"] == pytest.approx(list(ci["auroc"]))
        assert r["sensitivity_ci95"] == pytest.approx(list(ci["sensitivity"]))
    table = subgroup_table(rows)
    assert len(table.splitlines()) == len(rows) + 2 and "site: ear" in table and "too few" in table
    fig = plot_subgroups(rows, {"auroc": 0.7, "sensitivity": 0.8, "specificity": 0.5})
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0] == "sex"  # each column under its header
    # a row with no estimate says so in the figure, and the figure says what that means
    ear = [t.get_text() for t in fig.axes[0].get_yticklabels()].index(next(
        t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text().startswith("ear ")))
    said = [t for t in fig.axes[0].texts if t.get_text() == "too few"]
    assert [t.get_position()[1] for t in said] == [ear]  # AUROC: too few malignant on the ear row only
    assert f"'too few': under {MIN_CASES} of the cases" in " ".join(t.get_text() for t in fig.texts)
    with pytest.raises(SkinCancerError, match="do not match"):
        subgroup_metrics(df, y[:-1], p[:-1], 0.6)


def test_photos_of_a_lesion_are_a_subgroup():
    df = pd.DataFrame({"lesion_id": ["a", "b", "b", "c", "c", "c", "d", "d", "d", "d", None]})
    assert list(subgroup_labels(df, "photos")) == ["1", "2", "2", "3+", "3+", "3+", "3+", "3+", "3+", "3+",
                                                   "unknown"]
    df, y, p = subgroup_frame()
    df["lesion_id"] = np.where(np.arange(len(df)) < 100, df["lesion_id"], [f"S{i}" for i in range(len(df))])
    rows = [r for r in subgroup_metrics(df, y, p, 0.6, n_boot=0) if r["column"] == "photos"]
    assert [(r["subgroup"], r["n"]) for r in rows] == [("1", 500), ("2", 100)]
    assert rows[0]["auroc"] == pytest.approx(roc_auc_score(y[100:], p[100:]))


def test_each_subgroup_gets_its_own_calibration_gap_unless_it_is_tiny():
    df, y, p = subgroup_frame()
    df.loc[20:24, "localization"] = "scalp"  # 5 images: too few
    rows = subgroup_metrics(df, y, p, 0.6, n_boot=200, groups=df["lesion_id"])
    lesions = df["lesion_id"].to_numpy()
    for r in rows:
        inside = subgroup_labels(df, r["column"]).to_numpy() == r["subgroup"]
        if inside.sum() < MIN_CASES:
            assert all(r[k] is None for k in ("mean_probability", "share_malignant", "calibration_gap",
                                               "calibration_gap_ci95")), r["subgroup"]
            continue
        assert r["mean_probability"] == pytest.approx(p[inside].mean()) and r["share_malignant"] == y[inside].mean()
        want = calibration_in_the_large(y[inside], p[inside], 200, groups=lesions[inside])  # lesions within it
        assert r["calibration_gap_ci95"] == pytest.approx(want["calibration_gap_ci95"])
    assert any(r["subgroup"] == "scalp" for r in rows)
    assert "mean p - share malignant" in subgroup_table(rows)
    fig = plot_subgroups(rows, {"auroc": 0.7, "sensitivity": 0.8, "specificity": 0.5, "calibration_gap": 0.0})
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[-1] == "mean probability - share malignant\n(dashed: all images, +0.000)"
    assert all(ax.get_legend() is None for ax in fig.axes)  # the overall values are named above, not over the points
    assert "orange: probabilities off in this subgroup" in " ".join(t.get_text() for t in fig.texts)


def test_paired_subgroups_are_each_subgroups_own_paired_bootstrap_at_each_models_threshold():
    df, y, p_a = subgroup_frame()
    women = df["sex"].to_numpy() == "female"
    p_b = np.where(women, np.clip(p_a + 0.3 * y, 0, 1), p_a)  # B ranks better for women only
    rows = paired_subgroup_metrics(df, y, p_a, p_b, 0.6, 0.5, n_boot=200, groups=df["lesion_id"])
    assert [(r["column"], r["subgroup"]) for r in rows] == [(r["column"], r["subgroup"]) for r in
                                                            subgroup_metrics(df, y, p_a, 0.6, n_boot=0)]
    lesions = df["lesion_id"].to_numpy()
    for r in rows:
        inside = subgroup_labels(df, r["column"]).to_numpy() == r["subgroup"]
        if r["subgroup"] == "ear":  # too few malignant for AUROC and sensitivity, for either model
            assert all(r[f"auroc{k}"] is None and r[f"sensitivity{k}"] is None for k in ("", "_ci95", "_a", "_b"))
            assert r["specificity_b"] == pytest.approx((p_b[inside & ~y] < 0.5).mean())
            continue
        want = paired_bootstrap(y[inside], p_a[inside], p_b[inside], 0.6, 0.5, n_boot=200, groups=lesions[inside])
        for k in ("auroc", "sensitivity", "specificity"):
            assert r[k] == pytest.approx(want[k]["difference"]) and r[f"{k}_ci95"] == pytest.approx(want[k]["ci"])
            assert r[f"{k}_a"] == pytest.approx(want[k]["a"]) and r[f"{k}_b"] == pytest.approx(want[k]["b"])
        assert r["sensitivity_b"] == pytest.approx((p_b[inside & y] >= 0.5).mean())  # B at its own threshold
    by_sex = {r["subgroup"]: r for r in rows if r["column"] == "sex"}
    assert by_sex["female"]["auroc_ci95"][0] > 0 and by_sex["male"]["auroc"] == 0  # the same scores for men
    table = subgroup_table(rows, names=("a", "b"))
    assert "each model's own threshold" in table and f"{by_sex['female']['auroc']:+.3f}" in table
    fig = plot_subgroups(rows, {"auroc": 0.01, "sensitivity": 0.0, "specificity": -0.02}, names=("a", "b"))
    assert fig.axes[0].get_title().startswith("AUROC: b - a") and "(b - a)" in table
    assert fig.axes[0].get_xlim()[0] < 0 < fig.axes[0].get_xlim()[1]
    with pytest.raises(SkinCancerError, match="do not match"):
        paired_subgroup_metrics(df, y, p_a, p_b[:-1], 0.6, 0.5)
