"""Photos of one lesion under two lesion ids: found, shipped for HAM10000, and kept in one split."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import copy_images

from skincancer import cli
from skincancer.data import check_no_lesion_leak, keep_together, prepare, split_by_source
from skincancer.duplicates import find_duplicates, shipped_duplicates, split_groups

PAIR = ("ISIC_0030074", "ISIC_0025226")  # one nevus, photographed twice, filed as HAM_0000140 and HAM_0004919


def test_groups_join_the_lesions_of_each_pair_transitively():
    df = pd.DataFrame({"image_id": list("abcdef"), "lesion_id": ["L1", "L1", "L2", "L3", "L4", "L5"]})
    pairs = pd.DataFrame({"image_a": ["a", "d", "x"], "image_b": ["c", "c", "e"],
                          "lesion_a": ["L1", "L3", "L9"], "lesion_b": ["L2", "L2", "L4"]})
    groups = split_groups(df, pairs)
    assert groups[0] == groups[1] == groups[2] == groups[3]  # L1-L2-L3 joined; the pair naming x is not here
    assert len({groups[0], groups[4], groups[5]}) == 3
    split = pd.Series(["train", "train", "test", "valid", "test", "valid"])
    assert list(keep_together(split, groups)) == ["train"] * 4 + ["test", "valid"]


def test_find_duplicates_finds_ham10000s_pair_among_other_photos(ham_dir, ham_metadata, tmp_path, capsys):
    others = ham_metadata[~ham_metadata["image_id"].isin(PAIR)].groupby("dx").head(12)
    rows = pd.concat([ham_metadata[ham_metadata["image_id"].isin(PAIR)], others], ignore_index=True)
    copy_images(rows, ham_dir, tmp_path / "set" / "images")
    rows.to_csv(tmp_path / "set" / "HAM10000_metadata.csv", index=False)
    assert cli.main(["duplicates", "--data", str(tmp_path / "set"), "--out", str(tmp_path / "pairs.csv")]) == 0
    found = pd.read_csv(tmp_path / "pairs.csv")
    assert {tuple(found.loc[0, ["image_a", "image_b"]])} == {PAIR} and len(found) == 1
    assert found.loc[0, "correlation"] > 0.75 and "1 pair(s)" in capsys.readouterr().out
    # the shipped list is this search on all 10,015 photos
    shipped = shipped_duplicates()
    assert list(shipped.columns) == list(found.columns) and {tuple(shipped.loc[0, ["image_a", "image_b"]])} == {PAIR}
    assert pd.read_csv(tmp_path / "pairs.csv").equals(find_duplicates(
        prepare(tmp_path / "set")).astype({"correlation": float}))


@pytest.mark.parametrize("seed", [0, 4, 7])
def test_the_pair_never_crosses_splits(ham_dir, seed):
    df = prepare(ham_dir, seed=seed)
    check_no_lesion_leak(df)
    assert df.set_index("image_id").loc[list(PAIR), "split"].nunique() == 1


def test_a_held_out_source_takes_the_lesions_joined_to_its_own(ham_metadata):
    rows = ham_metadata.groupby("dx").head(10).reset_index(drop=True)
    rows["dataset"] = ["rosendahl" if i < 20 else "vidir_modern" for i in range(len(rows))]
    a, b = rows.index[0], rows.index[30]  # two photos of different lesions and sources, filed as one scene
    pairs = pd.DataFrame({"image_a": [rows.image_id[a]], "image_b": [rows.image_id[b]],
                          "lesion_a": [rows.lesion_id[a]], "lesion_b": [rows.lesion_id[b]]})
    rows["label"] = rows["dx"].isin(["mel", "bcc", "akiec"]).map({True: "malignant", False: "benign"})
    split = split_by_source(rows, "rosendahl", groups=split_groups(rows, pairs))
    assert split[a] == split[b] == "test"
    assert split[rows["dataset"] == "rosendahl"].eq("test").all()
