"""Evaluation: subgroups, labelled sets, tables and plots, the evaluate and compare commands, Grad-CAM."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from skincancer import SkinCancerError, cli
from skincancer.data import DX_CLASSES
from skincancer.evaluate import (MIN_CASES, lesion_table, metrics_table, paired_subgroup_metrics, plot_decision_curve,
                                 plot_lesions, plot_subgroups, predict_frame, predict_loaded, prevalence_table,
                                 read_labels, read_test_split, subgroup_labels, subgroup_metrics, subgroup_table)
from skincancer.gradcam import feature_grid, gradcam
from skincancer.metrics import (at_prevalence, bootstrap_intervals, calibration_in_the_large, classification_metrics,
                                lesion_metrics, lesion_scores, malignant_scores, net_benefit, paired_bootstrap)
from skincancer.predict import load

PLOTS = {"roc.png", "pr.png", "confusion.png", "reliability.png", "threshold.png", "decision_curve.png",
         "top_losses.png", "gradcam.png"}


@pytest.fixture
def originals_meta(originals_dir):
    return pd.read_csv(originals_dir / "HAM10000_metadata.csv")


# --- subgroups, lesions, prevalence, net benefit: tables and plots -------------------------------

def _subgroup_frame(n: int = 600):
    """Images with HAM10000's metadata columns, truths and probabilities; 'ear' has 4 malignant and 16 benign."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "lesion_id": [f"L{i // 2}" for i in range(n)],  # two photos a lesion
        "sex": rng.choice(["male", "female", ""], n, p=[0.5, 0.45, 0.05]),
        "age": rng.choice(["29.0", "30", "44.9", "45", "75.0", "90", "", "n/a"], n),
        "localization": np.where(np.arange(n) < 20, "ear", rng.choice(["back", "face"], n)),
        "dataset": "one source",  # a single subgroup says nothing: left out
    })
    y = rng.random(n) < 0.3
    y[:20] = np.arange(20) < 4
    return df, y, np.clip(0.25 * y + rng.random(n), 0, 1)


def test_subgroup_metrics_are_each_subgroups_own_and_small_ones_say_too_few():
    df, y, p = _subgroup_frame()
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
    with pytest.raises(SkinCancerError, match="do not match"):
        subgroup_metrics(df, y[:-1], p[:-1], 0.6)


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


def test_photos_of_a_lesion_are_a_subgroup():
    df = pd.DataFrame({"lesion_id": ["a", "b", "b", "c", "c", "c", "d", "d", "d", "d", None]})
    assert list(subgroup_labels(df, "photos")) == ["1", "2", "2", "3+", "3+", "3+", "3+", "3+", "3+", "3+",
                                                   "unknown"]
    df, y, p = _subgroup_frame()
    df["lesion_id"] = np.where(np.arange(len(df)) < 100, df["lesion_id"], [f"S{i}" for i in range(len(df))])
    rows = [r for r in subgroup_metrics(df, y, p, 0.6, n_boot=0) if r["column"] == "photos"]
    assert [(r["subgroup"], r["n"]) for r in rows] == [("1", 500), ("2", 100)]
    assert rows[0]["auroc"] == pytest.approx(roc_auc_score(y[100:], p[100:]))


def test_ppv_and_npv_at_a_prevalence_follow_bayes_and_at_the_samples_own_are_the_counted_ones():
    df, y, p = _subgroup_frame()
    said = p >= 0.6
    sens, spec = (said & y).sum() / y.sum(), (~said & ~y).sum() / (~y).sum()
    own = y.mean()
    rows = at_prevalence(y, p, 0.6, [own, 0.05, 0.01], n_boot=300, groups=df["lesion_id"])
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
    _, y, p = _subgroup_frame()
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


def test_each_subgroup_gets_its_own_calibration_gap_unless_it_is_tiny():
    df, y, p = _subgroup_frame()
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
    assert [ax.get_title() for ax in fig.axes][-1] == "mean probability - share malignant"


def test_paired_subgroups_are_each_subgroups_own_paired_bootstrap_at_each_models_threshold():
    df, y, p_a = _subgroup_frame()
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
    table = subgroup_table(rows, difference=True)
    assert "each model's own threshold" in table and f"{by_sex['female']['auroc']:+.3f}" in table
    fig = plot_subgroups(rows, {"auroc": 0.01, "sensitivity": 0.0, "specificity": -0.02}, names=("a", "b"))
    assert fig.axes[0].get_title() == "AUROC: B - A" and fig.axes[0].get_xlim()[0] < 0 < fig.axes[0].get_xlim()[1]
    with pytest.raises(SkinCancerError, match="do not match"):
        paired_subgroup_metrics(df, y, p_a, p_b[:-1], 0.6, 0.5)


# --- labelled sets -------------------------------------------------------------------------------

def test_reads_isic_one_hot_and_plain_label_files(tmp_path, originals_dir, originals_meta):
    onehot = pd.DataFrame({"image": originals_meta["image_id"],
                           **{d.upper(): (originals_meta["dx"] == d).astype(float) for d in DX_CLASSES}})
    onehot.to_csv(tmp_path / "gt.csv", index=False)
    originals_meta[["image_id", "dx"]].to_csv(tmp_path / "plain.csv", index=False)
    a = read_labels(tmp_path / "gt.csv", originals_dir / "images")
    b = read_labels(tmp_path / "plain.csv", originals_dir / "images")
    assert a[["image_id", "dx"]].equals(b[["image_id", "dx"]]) and len(a) == 14
    assert a["dx"].tolist() == originals_meta["dx"].tolist()


def test_unknown_image_ids_and_bad_columns_are_named(tmp_path, originals_dir, originals_meta):
    extra = pd.concat([originals_meta[["image_id", "dx"]],
                       pd.DataFrame({"image_id": ["ISIC_9999999"], "dx": ["mel"]})])
    extra.to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(SkinCancerError, match=r"1 of 15 image id\(s\) have no image.*ISIC_9999999"):
        read_labels(tmp_path / "extra.csv", originals_dir / "images")
    originals_meta[["image_id", "age"]].to_csv(tmp_path / "cols.csv", index=False)
    with pytest.raises(SkinCancerError, match="cols.csv: expected columns"):
        read_labels(tmp_path / "cols.csv", originals_dir / "images")


# --- the command and its files -------------------------------------------------------------------

def test_training_chose_the_threshold_on_valid_for_the_target(trained):
    card = json.loads(trained.with_suffix(".json").read_text())
    rule = card["threshold_rule"]
    assert rule["chosen_on"] == "valid" and rule["target_sensitivity"] == 0.9
    assert card["metrics"]["valid"]["sensitivity"] >= 0.9
    assert card["metrics"]["test"]["threshold"] == card["threshold"]


def test_evaluate_the_recorded_test_split(trained, ham_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(trained), "--data", str(ham_dir), "--out", str(out),
                     "--bootstrap", "200", "--prevalence", "0.05", "0.3"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [r["prevalence"] for r in m["at_prevalence"]] == [0.05, 0.3]
    card = json.loads(trained.with_suffix(".json").read_text())
    assert m["n"] == card["split_images"]["test"] and m["threshold"] == card["threshold"]
    nb = m["net_benefit"]
    assert nb["threshold"] == card["threshold"] and nb["benign_per_malignancy"] == 1 / nb["threshold"] - 1
    assert nb["model"] <= m["n_malignant"] / m["n"]  # never more than finding every malignancy with no false alarm
    assert m["auroc"] == pytest.approx(card["metrics"]["test"]["auroc"], abs=1e-6)
    assert set(m["plots"]) == PLOTS | {"subgroups.png", "lesions.png"}
    lesions = m["by_lesion"]
    assert lesions["n_photos"] == m["n"] and lesions["each_photo"]["auroc"] == pytest.approx(m["auroc"])
    assert lesions["n_lesions"] == card["split_lesions"]["test"]
    at_training = card["metrics"]["test"]["by_lesion"]  # the card counts lesion by lesion too, the same way
    for side in ("one_photo", "all_photos"):
        for k in ("auroc", "sensitivity", "specificity", "balanced_accuracy"):
            assert lesions[side][k] == pytest.approx(at_training[side][k], abs=1e-6), (side, k)
    assert card["metrics"]["valid"]["by_lesion"]["n_lesions"] == card["split_lesions"]["valid"]
    for name in m["plots"]:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 100
    for column in ("sex", "age", "localization", "dx_type"):  # the HAM10000 metadata: every image in one subgroup
        assert sum(r["n"] for r in m["subgroups"] if r["column"] == column) == m["n"]
    printed = capsys.readouterr().out
    assert "auroc" in printed and "by subgroup" in printed and "site: " in printed
    assert "at other prevalences" in printed and "of 50 malignant found" in printed
    assert "net benefit at the threshold" in printed
    assert "lesion by lesion" in printed and "photos of lesion: 1" in printed


def test_evaluate_labelled_images_with_tta_and_no_positives(trained, originals_dir, originals_meta, tmp_path):
    benign = originals_meta[originals_meta["dx"].isin(["nv", "bkl"])][["image_id", "dx"]]
    benign.to_csv(tmp_path / "benign.csv", index=False)
    out = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(trained), "--images", str(originals_dir / "images"),
                     "--labels", str(tmp_path / "benign.csv"), "--tta", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["tta"] is True and m["n"] == len(benign)
    assert m["auroc"] is None and m["sensitivity"] is None  # undefined without a malignant image, and said so
    assert "roc.png" not in m["plots"] and "decision_curve.png" not in m["plots"] and (out / "confusion.png").exists()
    assert "net_benefit" not in m
    assert "subgroups" not in m and "subgroups.png" not in m["plots"]  # image_id,dx: no metadata to group by
    assert "by_lesion" not in m and "lesions.png" not in m["plots"]  # nor lesion ids


def test_predictions_through_the_inference_copy_are_fastais(trained, originals_dir, originals_meta):
    clf = load(trained)
    df = originals_meta.assign(path=[originals_dir / "images" / f"{i}.jpg" for i in originals_meta["image_id"]])
    probs, targets = predict_frame(clf.learn, df, bs=5)
    fast_probs, fast_targets = predict_loaded(clf, df)
    np.testing.assert_allclose(fast_probs, probs, atol=1e-5)
    np.testing.assert_array_equal(fast_targets, targets)
    assert targets.sum() == originals_meta["dx"].isin(["mel", "bcc", "akiec"]).sum()


def test_evaluation_shows_progress_and_predict_keeps_stdout_for_its_json(trained, originals_dir, originals_meta,
                                                                         monkeypatch):
    import fastprogress.fastprogress as fp

    bars, real = [], fp.progress_bar
    monkeypatch.setattr(fp, "progress_bar", lambda gen, **kwargs: bars.append(len(gen)) or real(gen, **kwargs))
    clf = load(trained)
    df = originals_meta.assign(path=[originals_dir / "images" / f"{i}.jpg" for i in originals_meta["image_id"]])
    predict_loaded(clf, df, bs=5)
    assert bars == [3]  # one bar over the 3 batches of 14 images
    clf.predict_batch(list(df["path"]), bs=5)  # a console bar would write into `predict`'s JSON lines on stdout
    assert bars == [3]


def test_tta_through_the_inference_copy_is_fastais(trained, originals_dir, originals_meta):
    from fastai.torch_core import set_seed

    clf = load(trained)
    own = clf.learn.model
    df = originals_meta.assign(path=[originals_dir / "images" / f"{i}.jpg" for i in originals_meta["image_id"]])
    set_seed(3)  # fastai's augmentation draws from Python's, NumPy's and torch's generators
    fastai_tta, _ = predict_frame(clf.learn, df, tta=True, bs=5)
    batches = []
    hook = clf.model.register_forward_hook(lambda module, args, out: batches.append(len(out)))
    set_seed(3)
    copy_tta, targets = predict_loaded(clf, df, tta=True, bs=5)
    hook.remove()
    plain, _ = predict_loaded(clf, df, bs=5)
    assert sum(batches) == 5 * len(df)  # four augmented passes and a plain one, all through the inference copy
    np.testing.assert_allclose(copy_tta, fastai_tta, atol=1e-5)  # the same augmented views, the same mix
    assert np.abs(copy_tta - plain).max() > 1e-3  # and they were augmented
    assert clf.learn.model is own and clf.model is not own  # the learner has its own network back, for Grad-CAM
    assert targets.sum() == originals_meta["dx"].isin(["mel", "bcc", "akiec"]).sum()


def test_evaluate_needs_labels_with_images(trained, originals_dir, tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(trained), "--images", str(originals_dir),
                     "--out", str(tmp_path)]) == 2
    assert "--images needs --labels" in capsys.readouterr().err


def test_compare_two_models_on_the_test_split_they_share(trained, ham_dir, tmp_path, capsys):
    # a 7-diagnosis model trained on the binary model's split: both are tested on the same images
    dx = tmp_path / "dx.pkl"
    assert cli.main(["train", "--data", str(ham_dir), "--task", "dx", "--no-pretrained", "--size", "32", "--bs", "32",
                     "--epochs", "1", "--workers", "0", "--split-from", str(trained.with_suffix(".split.csv")),
                     "--out", str(dx)]) == 0
    capsys.readouterr()
    out = tmp_path / "compare"
    assert cli.main(["compare", "--models", str(trained), str(dx), "--data", str(ham_dir), "--out", str(out),
                     "--bootstrap", "200"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    cards = [json.loads(m.with_suffix(".json").read_text()) for m in (trained, dx)]
    assert result["n"] == cards[0]["split_images"]["test"] == cards[1]["split_images"]["test"]
    assert [result["a"]["task"], result["b"]["task"]] == ["binary", "dx"] and result["names"] == ["smoke", "dx"]
    for key, card in zip("ab", cards):  # each model's metrics are the ones its export measured on test
        assert result[key]["auroc"] == pytest.approx(card["metrics"]["test"]["auroc"], abs=1e-6)
        assert result[key]["threshold"] == card["threshold"]
    auroc = result["difference"]["auroc"]
    assert auroc["difference"] == pytest.approx(result["b"]["auroc"] - result["a"]["auroc"])
    assert result["difference"]["resampled"] == "lesions" and len(auroc["ci"]) == 2
    for plot in ("comparison.png", "comparison_subgroups.png"):
        with Image.open(out / plot) as img:
            assert img.format == "PNG" and min(img.size) > 100
    assert result["plots"] == ["comparison.png", "comparison_subgroups.png"]
    assert {r["column"] for r in result["subgroups"]} >= {"sex", "age", "localization", "dx_type"}
    assert sum(r["n"] for r in result["subgroups"] if r["column"] == "sex") == result["n"]
    lesions = result["by_lesion"]  # each model calls each lesion on the mean of its photos, paired
    df = pd.read_csv(trained.with_suffix(".split.csv"))
    assert lesions["n_lesions"] == df.loc[df["split"] == "test", "lesion_id"].nunique()
    assert lesions["difference"]["resampled"] == "lesions"
    clf = load(trained)
    test = read_test_split(trained, ham_dir)
    y, p = malignant_scores(*predict_loaded(clf, test), clf.classes, clf.calibration)
    y_lesion, p_lesion, _ = lesion_scores(test["lesion_id"], y, p)
    assert lesions["difference"]["auroc"]["a"] == pytest.approx(roc_auc_score(y_lesion, p_lesion), abs=1e-6)
    assert lesions["difference"]["sensitivity"]["a"] == pytest.approx((p_lesion[y_lesion] >= clf.threshold).mean())
    at = {r["threshold"]: r for r in result["net_benefit"]}  # at the exchange each model's threshold implies
    assert sorted(at) == sorted({cards[0]["threshold"], cards[1]["threshold"]})
    assert at[clf.threshold]["a"] == pytest.approx(net_benefit(y, p, [clf.threshold])[0], abs=1e-6)
    stdout = capsys.readouterr().out
    assert "B = dx.pkl against A = smoke.pkl" in stdout and "balanced_accuracy" in stdout
    assert "by subgroup (B - A" in stdout and "confirmed by: histo" in stdout and "lesion by lesion" in stdout
    assert "net benefit at threshold probability" in stdout
    assert "not a medical device" in stdout


def test_compare_refuses_models_tested_on_different_images(trained, ham_dir, tmp_path, capsys):
    import shutil

    for suffix in (".pkl", ".safetensors", ".json", ".split.csv"):
        shutil.copy(trained.with_suffix(suffix), tmp_path / f"other{suffix}")
    split = pd.read_csv(tmp_path / "other.split.csv")
    split.loc[split.index[split["split"] == "test"][0], "split"] = "train"  # one test image trained the other
    split.to_csv(tmp_path / "other.split.csv", index=False)
    assert cli.main(["compare", "--models", str(trained), str(tmp_path / "other.pkl"), "--data", str(ham_dir),
                     "--out", str(tmp_path / "compare")]) == 2
    err = capsys.readouterr().err
    assert "smoke.split.csv and other.split.csv test different images (1 only in the first, 0 only in the second" in err
    assert f"--split-from {trained.with_suffix('.split.csv')}" in err
    assert not (tmp_path / "compare").exists()


# --- Grad-CAM ------------------------------------------------------------------------------------

def _red_means_malignant(body):
    """A model whose malignant score is the mean of the body's first channel: red makes it malignant."""
    import torch
    from torch import nn

    class Score(nn.Module):
        def forward(self, acts):
            s = acts[:, 0].mean(dim=(1, 2))
            return torch.stack([-s, s], dim=1)

    return nn.Sequential(body, Score())


def _gradcam_with(learn, model, photo):
    kept, learn.model = learn.model, model
    try:
        heat, _ = gradcam(learn, Image.fromarray(photo), target="malignant")
    finally:
        learn.model = kept
    return heat


def test_gradcam_puts_the_heat_where_the_evidence_is(trained):
    from torch import nn

    photo = np.zeros((150, 200, 3), np.uint8)
    photo[:75, 100:, 0] = 255  # red in the top-right quarter only: a flip or a transpose moves it
    heat = _gradcam_with(load(trained).learn, _red_means_malignant(nn.AvgPool2d(8)), photo)  # the image, 8x coarser
    assert heat.shape == (150, 200)
    quarters = {(r, c): float(heat[r * 75:(r + 1) * 75, c * 100:(c + 1) * 100].mean()) for r in (0, 1) for c in (0, 1)}
    # hot where the red is; the rest cools (a blurred edge, as upsampling a coarse map gives), never flipped
    assert quarters[0, 1] > 0.8 and max(quarters[0, 0], quarters[1, 1]) < 0.3 and quarters[1, 0] < 0.1, quarters


def test_a_seven_class_gradcam_maps_malignancy_by_default_and_any_class_on_request(trained):
    """mel's logit follows red, nv's green; nv wins the argmax, yet the default map is of malignancy (mel's red)."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    class Score(nn.Module):
        def forward(self, acts):
            red, green = acts[:, 0].mean(dim=(1, 2)), acts[:, 1].mean(dim=(1, 2))
            zero = torch.zeros_like(red)
            by_class = {"mel": red, "nv": green + 10.0}
            return torch.stack([by_class.get(c, zero) for c in DX_CLASSES], dim=1)

    dls = load(trained).learn.dls
    learn = SimpleNamespace(dls=SimpleNamespace(test_dl=dls.test_dl, vocab=list(DX_CLASSES)),
                            model=nn.Sequential(nn.AvgPool2d(8), Score()))
    photo = np.zeros((150, 200, 3), np.uint8)
    photo[:75, 100:, 0] = 255  # red: top right
    photo[75:, :100, 1] = 255  # green: bottom left
    top_right, bottom_left = (slice(0, 75), slice(100, 200)), (slice(75, 150), slice(0, 100))
    for target, hot, cold in [(None, top_right, bottom_left), ("malignant", top_right, bottom_left),
                              ("nv", bottom_left, top_right)]:
        heat, _ = gradcam(learn, Image.fromarray(photo), target=target)
        assert heat[hot].mean() > 0.8 and heat[cold].mean() < 0.1, (target, heat[hot].mean(), heat[cold].mean())
    with pytest.raises(SkinCancerError, match="'melanoma' is not one of the model's classes"):
        gradcam(learn, Image.fromarray(photo), target="melanoma")


def test_gradcam_cells_land_where_the_body_looked(trained):
    """A ResNet-like body (3x3 convolutions of stride 2, padding 1) centres cell i on pixel 8i, not 8i + 3.5."""
    import torch
    from torch import nn

    convs = [nn.Conv2d(3 if i == 0 else 1, 1, 3, stride=2, padding=1, bias=False) for i in range(3)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
            conv.weight[0, 0] = 1 / 9  # an average of the red channel, then of that
    learn = load(trained).learn
    model = _red_means_malignant(nn.Sequential(*convs))
    photo = np.zeros((150, 200, 3), np.uint8)
    photo[..., 0] = 124  # the red that ImageNet normalisation turns into 0: only the spot raises the score
    size = learn.dls.test_dl([Image.fromarray(photo)], num_workers=0).one_batch()[0].shape[-1]  # the model's input
    # a red spot on the input pixel that cell (3, 5) of the map is centred on, (24, 40), drawn in the 200x150 photo
    cy, cx = (24 + 0.5) * 150 / size - 0.5, (40 + 0.5) * 200 / size - 0.5
    photo[round(cy) - 4:round(cy) + 5, round(cx) - 5:round(cx) + 6, 0] = 255
    heat = _gradcam_with(learn, model, photo)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    # a plain resize of the map would put the hot cell 3.5 input pixels down and right: 8 and 11 photo pixels
    assert abs(y - cy) <= 2 and abs(x - cx) <= 2, ((y, x), (cy, cx))


def _receptive_field_centre(body, size: int, cell: int) -> float:
    """The middle of the input pixels that feature cell (cell, cell) depends on, measured with gradients."""
    import torch

    # a max pool passes gradient to one pixel of its window, and a ReLU to the active ones: a single input can miss
    # pixels at the edge of the field, so take the pixels any of several inputs depends on
    x = torch.rand(16, 3, size, size, requires_grad=True)
    grad = torch.autograd.grad(body(x)[:, :, cell, cell].sum(), x)[0].abs().sum(dim=(0, 1))
    cols = (grad.sum(0) > 0).nonzero().flatten()
    return (int(cols.min()) + int(cols.max())) / 2


def test_feature_grid_matches_the_receptive_fields():
    import torchvision
    from fastai.vision.all import create_body
    from torch import nn

    resnet = create_body(torchvision.models.resnet18(weights=None)).eval()  # residual branches, a max pool
    vgg_like = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                             nn.BatchNorm2d(4), nn.MaxPool2d(2)).eval()  # pools of 2 put cells between pixels
    for body, size, cell in [(resnet, 512, 8), (vgg_like, 64, 8)]:  # cells whose field is inside the image
        (step_y, first_y), (step_x, first_x) = feature_grid(body)
        assert (step_y, first_y) == (step_x, first_x)
        assert first_x + step_x * cell == _receptive_field_centre(body, size, cell)
    assert feature_grid(resnet) == ((32, 0), (32, 0)) and feature_grid(vgg_like) == ((4, 1.5), (4, 1.5))
    assert feature_grid(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())) is None  # nowhere to place: plain resize


def test_gradcam_map_and_overlay_on_a_real_lesion(trained, original_images):
    clf = load(trained)
    pred = clf.predict(original_images[0])["label"]
    heat, overlay = gradcam(clf.learn, original_images[0], target=pred)
    assert heat.shape == (450, 600) and overlay.size == (600, 450)
    assert heat.min() >= 0 and heat.max() == pytest.approx(1.0, abs=1e-2) and heat.std() > 0.01
    photo = np.asarray(Image.open(original_images[0]).convert("RGB"), dtype=float)
    change = np.abs(np.asarray(overlay, dtype=float) - photo).sum(-1)
    hot, cold = heat >= np.quantile(heat, 0.8), heat <= np.quantile(heat, 0.2)
    assert change[hot].mean() > change[cold].mean()  # colour goes where the heat is



def test_gradcam_is_the_textbook_map_without_the_full_backward_pass(trained, original_images, monkeypatch):
    """Differentiating the head alone gives the map that hooking the body and differentiating everything gives."""
    from conftest import ROOT
    from torch import nn

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from bench_predict import full_backward_gradcam

    learn = load(trained).learn
    learn.model.zero_grad(set_to_none=True)
    cases = [(Image.open(path), target) for path in original_images[:3] for target in (0, 1)]
    heats = [gradcam(learn, image, target=target)[0] for image, target in cases]
    assert all(p.grad is None for p in learn.model.parameters())  # no weight was differentiated
    textbooks = [full_backward_gradcam(learn, image, target).numpy() for image, target in cases]
    assert sum(t.std() > 0.01 for t in textbooks) >= len(cases) / 2  # 2x2 maps with a shape to get wrong
    for heat, textbook in zip(heats, textbooks):
        np.testing.assert_allclose(heat, textbook, atol=1e-5)
    with pytest.raises(SkinCancerError, match=r"Grad-CAM needs a \(body, head\) network .* not a Conv2d"):
        _gradcam_with(learn, nn.Conv2d(3, 2, 1), np.zeros((150, 200, 3), np.uint8))

def test_metrics_table_tells_class_recall_from_the_benign_malignant_call():
    targets = np.array([0, 4, 4, 5, 5, 5])  # akiec, mel, mel, nv, nv, nv
    probs = np.full((6, 7), 0.01)
    probs[[0, 1, 2, 3, 4, 5], [1, 4, 5, 5, 5, 0]] = 0.94  # akiec -> bcc, mel -> mel, mel -> nv, nv, nv, nv -> akiec
    dx = np.array(DX_CLASSES)[targets]
    table = metrics_table(classification_metrics(probs, targets, DX_CLASSES, threshold=0.5, dx=dx))
    by_class = table.split("recall per class")[1].split("recall per diagnosis")[0]
    by_call = table.split("recall per diagnosis")[1]
    # 7-class recall: akiec named bcc is wrong; the benign/malignant call on it (malignant) is right
    assert re.search(r"akiec\s+0\.0000", by_class) and re.search(r"akiec\s+1\.0000", by_call)
    assert re.search(r"mel\s+0\.5000", by_class) and re.search(r"nv\s+0\.6667", by_class)
    assert re.search(r"mel\s+0\.5000", by_call) and re.search(r"nv\s+0\.6667", by_call)
    assert re.search(r"bcc\s+null", by_class)  # no bcc image: undefined, not 0
    binary = metrics_table(classification_metrics(probs[:, [5, 4]], (targets == 4).astype(int),
                                                  ["benign", "malignant"], dx=dx))
    assert "recall per class" not in binary and "recall per diagnosis" in binary
    # which call accuracy scores: a binary model's is the threshold's, a dx model's the most likely diagnosis
    assert re.search(r"balanced_accuracy\s+\S+\s+\(at the threshold\)", binary)
    assert re.search(r"balanced_accuracy\s+\S+\s+\(7 classes, most likely diagnosis\)", table)
