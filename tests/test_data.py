"""HAM10000 metadata from each of its layouts, validated; lesion-grouped, stratified, reproducible splits."""

from __future__ import annotations

import re
import warnings

import pandas as pd
import pytest
from conftest import ROOT, copy_images
from hypothesis import given, settings
from hypothesis import strategies as st

from skincancer import SkinCancerError
from skincancer.data import (
    add_labels,
    check_no_lesion_leak,
    class_weights,
    prepare,
    read_metadata,
    sample_by_label,
    split_by_lesion,
)
from skincancer.labels import BINARY_CLASSES, DX_CLASSES, classes_for

# --- reading the folder layouts ----------------------------------------------------------------


def test_reads_the_complete_shared_set(ham_dir):
    df = read_metadata(ham_dir)
    assert len(df) == 10015 and df["lesion_id"].nunique() == 7470
    assert df["dx"].value_counts().to_dict() == {"nv": 6705, "mel": 1113, "bkl": 1099, "bcc": 514,
                                                 "akiec": 327, "vasc": 142, "df": 115}
    assert all(p.endswith(f"{i}.jpg") for p, i in zip(df["path"], df["image_id"]))
    assert {"age", "sex", "localization"} <= set(df.columns)  # the rest of the metadata is kept


def test_kaggle_layout_with_images_in_two_parts_and_a_duplicate_copy(tmp_path, ham_dir, small_rows):
    root = tmp_path / "kaggle"
    half = len(small_rows) // 2
    copy_images(small_rows[:half], ham_dir, root / "HAM10000_images_part_1")
    copy_images(small_rows[half:], ham_dir, root / "HAM10000_images_part_2")
    copy_images(small_rows, ham_dir, root / "ham10000_images_part_1")  # Kaggle ships a second copy
    small_rows.to_csv(root / "HAM10000_metadata.csv", index=False)
    df = read_metadata(root)
    assert len(df) == len(small_rows)
    assert all("HAM10000_images_part_" in p for p in df["path"])  # the first copy in sorted order


def test_isic_2018_layout_from_one_hot_ground_truth_and_groupings(tmp_path, ham_dir, small_rows):
    root = tmp_path / "isic"
    copy_images(small_rows, ham_dir, root / "ISIC2018_Task3_Training_Input")
    gt = pd.DataFrame({"image": small_rows["image_id"]})
    for dx in DX_CLASSES:
        gt[dx.upper()] = (small_rows["dx"] == dx).astype(float)
    gt.to_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    small_rows.rename(columns={"image_id": "image"})[["image", "lesion_id"]].assign(
        diagnosis_confirm_type="histopathology").to_csv(root / "ISIC2018_Task3_Training_LesionGroupings.csv",
                                                        index=False)
    df = read_metadata(root).set_index("image_id")
    expected = small_rows.set_index("image_id")
    assert (df.loc[expected.index, "dx"] == expected["dx"]).all()
    assert (df.loc[expected.index, "lesion_id"] == expected["lesion_id"]).all()


def test_isic_ground_truth_that_is_not_one_hot_is_named(tmp_path, ham_dir, small_rows):
    root = tmp_path / "isic"
    copy_images(small_rows, ham_dir, root / "images")
    gt = pd.DataFrame({"image": small_rows["image_id"], **{dx.upper(): 0.0 for dx in DX_CLASSES}})
    gt.loc[0, "MEL"] = 1.0  # only the first row is valid
    gt.to_csv(root / "ISIC2018_Task3_Training_GroundTruth.csv", index=False)
    small_rows.rename(columns={"image_id": "image"}).to_csv(root / "ISIC2018_Task3_Training_LesionGroupings.csv")
    with pytest.raises(SkinCancerError, match=rf"{len(gt) - 1} row\(s\) are not one-hot.*{gt.loc[1, 'image']}"):
        read_metadata(root)


def test_dataverse_layout_with_tab_separated_metadata(make_ham, small_rows):
    root = make_ham()
    (root / "HAM10000_metadata.csv").unlink()
    small_rows.to_csv(root / "HAM10000_metadata.tab", sep="\t", index=False)
    df = read_metadata(root)
    assert len(df) == len(small_rows) and df["dx"].tolist() == small_rows["dx"].tolist()


def test_folder_per_class_layout_with_the_default_and_a_custom_map(tmp_path, ham_dir, small_rows):
    names = {"mel": "melanoma", "nv": "nevus", "bcc": "basal cell carcinoma", "bkl": "seborrheic keratosis",
             "df": "dermatofibroma", "vasc": "vascular lesion", "akiec": "actinic keratosis"}
    root = tmp_path / "nine"
    _class_folders(root, ham_dir, small_rows, names)
    with pytest.warns(UserWarning, match="has no lesion ids: its figures count photos"):
        df = read_metadata(root)
    assert df.set_index("image_id")["dx"].to_dict() == small_rows.set_index("image_id")["dx"].to_dict()

    (root / "Train" / "mystery").mkdir()
    image = ham_dir / "images" / f"{small_rows.image_id[0]}.jpg"
    (root / "Train" / "mystery" / "x.jpg").write_bytes(image.read_bytes())
    with pytest.raises(SkinCancerError, match=r"image folder\(s\) mystery are not in the class map"):
        read_metadata(root)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = read_metadata(root, class_map={**{v: k for k, v in names.items()}, "mystery": "mel"})
    assert df.set_index("image_id").loc["x", "dx"] == "mel"
    with pytest.raises(SkinCancerError, match="not HAM10000 diagnoses"):
        read_metadata(root, class_map={"mystery": "cancer"})


def test_missing_column_names_the_file_and_the_column(make_ham, small_rows):
    root = make_ham(metadata=small_rows.drop(columns=["lesion_id"]))
    with pytest.raises(SkinCancerError, match=r"HAM10000_metadata\.csv: missing column\(s\) 'lesion_id'"):
        read_metadata(root)


def test_unknown_dx_gives_the_count_and_first_offenders(make_ham, small_rows):
    bad = small_rows.copy()
    bad.loc[[0, 3, 5], "dx"] = ["melanoma", "nevus", "???"]
    with pytest.raises(SkinCancerError, match=r"3 row\(s\) have an unknown dx") as e:
        read_metadata(make_ham(metadata=bad))
    assert f"{bad.loc[0, 'image_id']}: 'melanoma'" in str(e.value)


def test_duplicate_image_ids_are_refused(make_ham, small_rows):
    bad = pd.concat([small_rows, small_rows.iloc[[2, 7]]], ignore_index=True)
    with pytest.raises(SkinCancerError, match=r"2 image_id\(s\) appear more than once") as e:
        read_metadata(make_ham(metadata=bad))
    assert small_rows.loc[2, "image_id"] in str(e.value)


def test_empty_lesion_id_is_refused_with_its_row(make_ham, small_rows):
    bad = small_rows.copy()
    bad.loc[4, "lesion_id"] = ""
    with pytest.raises(SkinCancerError, match=r"1 row\(s\) have an empty 'lesion_id': rows 6"):
        read_metadata(make_ham(metadata=bad))


def test_missing_images_are_an_error_unless_dropped_with_a_warning(make_ham, small_rows):
    root = make_ham()
    gone = small_rows["image_id"].iloc[:7].tolist()
    for image_id in gone:
        (root / "images" / f"{image_id}.jpg").unlink()
    with pytest.raises(SkinCancerError, match=rf"7 of {len(small_rows)} image\(s\).*missing: {gone[0]}") as e:
        read_metadata(root)
    assert "(2 more)" in str(e.value) and "--drop-missing" in str(e.value)
    with pytest.warns(UserWarning, match="7 of"):
        df = read_metadata(root, drop_missing=True)
    assert len(df) == len(small_rows) - 7 and not set(gone) & set(df["image_id"])


def test_a_folder_without_metadata_or_that_does_not_exist(tmp_path):
    with pytest.raises(SkinCancerError, match="does not exist"):
        read_metadata(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SkinCancerError, match="found neither HAM10000_metadata.csv"):
        read_metadata(tmp_path / "empty")


def _class_folders(root, ham_dir, small_rows, names):
    for dx, name in names.items():
        part = "Train" if dx != "df" else "Test"
        copy_images(small_rows[small_rows["dx"] == dx], ham_dir, root / part / name)


# --- splits ------------------------------------------------------------------------------------


def test_class_weights_are_inverse_frequency():
    w = class_weights(["benign"] * 80 + ["malignant"] * 20, BINARY_CLASSES)
    assert w[1] / w[0] == pytest.approx(4.0) and w.mean() == pytest.approx(1.0)


lesion_sets = st.lists(st.tuples(st.integers(1, 5), st.sampled_from(DX_CLASSES)), min_size=21, max_size=150)


def _frame(lesions) -> pd.DataFrame:
    rows = [(f"L{i}", f"I{i}_{j}", dx) for i, (n, dx) in enumerate(lesions) for j in range(n)]
    return pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx"])


@settings(max_examples=60, deadline=None)
@given(lesions=lesion_sets, seed=st.integers(0, 2**16), task=st.sampled_from(["binary", "dx"]))
def test_no_lesion_crosses_splits_and_every_split_has_every_label(lesions, seed, task):
    df = add_labels(_frame(lesions), task)
    per_label = df.drop_duplicates("lesion_id")["label"].value_counts()
    if (per_label < 3).any():
        with pytest.raises(SkinCancerError, match="needs at least one"):
            split_by_lesion(df, seed=seed)
        return
    split = split_by_lesion(df, seed=seed)
    df = df.assign(split=split)
    assert split.notna().all()
    assert (df.groupby("lesion_id")["split"].nunique() == 1).all()
    check_no_lesion_leak(df)
    for name in ("train", "valid", "test"):
        assert set(df.loc[df["split"] == name, "label"]) == set(df["label"])
    assert split.equals(split_by_lesion(df, seed=seed))  # deterministic for a seed


def test_leak_check_catches_a_lesion_in_two_splits():
    df = pd.DataFrame({"lesion_id": ["a", "a", "b"], "split": ["train", "test", "valid"]})
    with pytest.raises(SkinCancerError, match=r"1 lesion\(s\) appear in more than one split: a"):
        check_no_lesion_leak(df)


@pytest.mark.parametrize("task", ["binary", "dx"])
def test_split_of_the_full_set_is_70_15_15_by_lesion_and_stratified(ham_dir, task):
    df = prepare(ham_dir, task=task, seed=7)
    check_no_lesion_leak(df)
    lesion_share = df.drop_duplicates("lesion_id")["split"].value_counts(normalize=True)
    assert lesion_share["train"] == pytest.approx(0.70, abs=0.01)
    assert lesion_share["valid"] == pytest.approx(0.15, abs=0.01)
    assert lesion_share["test"] == pytest.approx(0.15, abs=0.01)
    for name in ("train", "valid", "test"):
        part = df[df["split"] == name]
        assert set(part["label"]) == set(classes_for(task))
        # stratified: each label's share of lesions in this split is near its share overall
        overall = df.drop_duplicates("lesion_id")["label"].value_counts(normalize=True)
        here = part.drop_duplicates("lesion_id")["label"].value_counts(normalize=True)
        assert (here - overall).abs().max() < 0.02
    other = prepare(ham_dir, task=task, seed=8)
    assert not other["split"].equals(df["split"])  # the seed matters


def test_limit_samples_whole_lesions_in_label_proportion(ham_dir):
    df = add_labels(read_metadata(ham_dir), "dx")
    small = sample_by_label(df, 300, seed=1)
    assert 280 <= len(small) <= 360
    full_lesions = df.groupby("lesion_id").size()
    taken = small.groupby("lesion_id").size()
    assert taken.equals(full_lesions[taken.index])  # every image of each sampled lesion
    assert (small.drop_duplicates("lesion_id")["label"].value_counts() >= 3).all()
    assert small["label"].value_counts(normalize=True)["nv"] == pytest.approx(0.67, abs=0.08)
    assert small["image_id"].equals(sample_by_label(df, 300, seed=1)["image_id"])


def test_a_recorded_split_is_reused_whatever_the_task_and_seed(ham_dir, tmp_path):
    binary = prepare(ham_dir, "binary", limit=200, seed=3)
    recorded = tmp_path / "model.split.csv"
    binary[["image_id", "lesion_id", "split"]].to_csv(recorded, index=False)
    dx = prepare(ham_dir, "dx", seed=99, split_from=recorded)
    assert dx.set_index("image_id")["split"].sort_index().equals(binary.set_index("image_id")["split"].sort_index())
    assert set(dx["label"]) <= set(DX_CLASSES) and len(dx) == len(binary)  # only the recorded images, relabelled
    with pytest.raises(SkinCancerError, match="limit and split_from"):
        prepare(ham_dir, limit=100, split_from=recorded)


def _split_file(tmp_path, rows, name="bad.split.csv"):
    path = tmp_path / name
    pd.DataFrame(rows, columns=["image_id", "lesion_id", "split"]).to_csv(path, index=False)
    return path


def test_a_bad_split_file_is_refused_naming_it(ham_dir, tmp_path):
    meta = read_metadata(ham_dir)
    shared = meta.groupby("lesion_id").filter(lambda g: len(g) > 1).iloc[:2]  # two photos of one lesion
    (a, la), (b, lb) = shared[["image_id", "lesion_id"]].itertuples(index=False)
    other = meta.loc[meta["lesion_id"] != la].iloc[0]
    cases = {
        "not in this data set: ISIC_9999999": [("ISIC_9999999", "HAM_x", "train"), (a, la, "valid")],
        "'holdout'.*are not train, valid, test": [(a, la, "holdout")],
        "1 lesion\\(s\\) appear in more than one split": [(a, la, "train"), (b, lb, "test")],
        "1 image\\(s\\) belong to another lesion": [(a, other["lesion_id"], "train")],
        "no image in the valid split": [(a, la, "train"), (b, lb, "train")],
        "appear more than once": [(a, la, "train"), (a, la, "valid")],
    }
    for message, rows in cases.items():
        path = _split_file(tmp_path, rows)
        with pytest.raises(SkinCancerError, match=f"{re.escape(str(path))}: .*{message}"):
            prepare(ham_dir, split_from=path)
    with pytest.raises(SkinCancerError, match="no such split file"):
        prepare(ham_dir, split_from=tmp_path / "none.csv")


@pytest.mark.parametrize("source", ["rosendahl", "vidir_modern"])
def test_a_held_out_source_is_the_whole_test_split_of_the_shared_set(ham_dir, source):
    from skincancer.data import prepare

    df = prepare(ham_dir, test_source=source)
    held = set(df.loc[df["dataset"] == source, "lesion_id"])
    test = df[df["split"] == "test"]
    assert set(test["lesion_id"]) == held  # every lesion photographed there, and nothing else
    assert (df.loc[df["dataset"] == source, "split"] == "test").all()
    check_no_lesion_leak(df)
    rest = df[df["split"] != "test"]
    # train and valid keep the random split's ratio of lesions (70:15)
    n = rest.groupby("split")["lesion_id"].nunique()
    assert n["valid"] / (n["train"] + n["valid"]) == pytest.approx(0.15 / 0.85, abs=0.01)
    assert set(test["label"]) == set(rest["label"]) == {"benign", "malignant"}


def test_a_lesion_photographed_at_two_sources_goes_wholly_to_test(make_ham, small_rows):
    rows = small_rows.assign(dataset=["rosendahl" if i % 3 == 0 else "vidir_modern" for i in range(len(small_rows))])
    two = rows.groupby("lesion_id")["dataset"].nunique()
    assert (two > 1).any()  # lesions seen at both sources
    from skincancer.data import prepare

    df = prepare(make_ham(rows), test_source="rosendahl")
    assert set(df.loc[df["split"] == "test", "lesion_id"]) >= set(two.index[two > 1])
    check_no_lesion_leak(df)


def test_the_sample_holds_out_a_source_and_a_wrong_source_is_named(ham_dir):
    from skincancer.data import prepare

    sample = ROOT / "data" / "sample"
    df = prepare(sample, test_source="rosendahl")
    assert (df.loc[df["split"] == "test", "dataset"] == "rosendahl").all()
    with pytest.raises(SkinCancerError, match=r"'nowhere' is not a source of this data set; its 'dataset' column "
                                              r"holds rosendahl, vidir_modern, vidir_molemax, vienna_dias"):
        prepare(sample, test_source="nowhere")
    with pytest.raises(SkinCancerError, match=r"'vidir_molemax' has no photo of akiec"):
        prepare(ham_dir, task="dx", test_source="vidir_molemax")


def test_a_source_needs_the_dataset_column_and_no_recorded_split(make_ham, small_rows, tmp_path):
    from skincancer.data import prepare

    rows = small_rows.drop(columns="dataset")  # metadata from before the Dataverse's source column
    root = make_ham(rows)
    with pytest.raises(SkinCancerError, match="the metadata has no 'dataset' column"):
        prepare(root, test_source="rosendahl")
    split = tmp_path / "m.split.csv"
    split.write_text("image_id,split\n")
    with pytest.raises(SkinCancerError, match="test_source and split_from"):
        prepare(root, test_source="rosendahl", split_from=split)


def test_a_folder_per_class_set_keeps_its_own_test_folder_and_counts_photos(tmp_path, ham_dir, ham_metadata):
    from skincancer.data import lesion_groups, prepare

    names = {"mel": "melanoma", "nv": "nevus", "bcc": "basal cell carcinoma", "bkl": "seborrheic keratosis"}
    rows = ham_metadata[ham_metadata["dx"].isin(names)].groupby("dx").head(30).reset_index(drop=True)
    root = tmp_path / "nine"
    for dx, part in rows.groupby("dx"):
        copy_images(part.iloc[:20], ham_dir, root / "Train" / names[dx])
        copy_images(part.iloc[20:], ham_dir, root / "Test" / names[dx])
    with pytest.warns(UserWarning, match="no lesion ids: its figures count photos"):
        df = prepare(root)
    test = set(df.loc[df["split"] == "test", "image_id"])
    assert test == {p.stem for p in (root / "Test").rglob("*.jpg")}  # the set's own test folder, nothing pooled
    assert set(df.loc[df["split"] != "test", "split"]) == {"train", "valid"}
    assert lesion_groups(df) is None  # no figure may call a photo a lesion: intervals resample photos
