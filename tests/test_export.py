"""What an export writes: every file, its sha256 in the card, readable by others, never half-written."""

from __future__ import annotations

import importlib
import json
import pickletools
import zipfile

import pandas as pd
import pytest

from skincancer.export import export
from skincancer.files import sha256_file


def test_train_exports_the_learner_its_card_and_its_split(trained):
    card = json.loads(trained.with_suffix(".json").read_text())
    assert card["sha256"] == sha256_file(trained)
    assert card["task"] == "binary" and card["classes"] == ["benign", "malignant"]
    assert card["arch"] == "resnet50" and card["pretrained"] is False and card["size"] == 64 and card["seed"] == 42
    assert {"fastai", "torch", "torchvision", "skincancer", "python"} <= set(card["versions"])
    for split in ("valid", "test"):
        m = card["metrics"][split]
        for key in ("accuracy", "balanced_accuracy", "auroc", "sensitivity", "specificity"):
            assert 0.0 <= m[key] <= 1.0, (split, key)
        assert m["n"] == card["split_images"][split]
    split = pd.read_csv(trained.with_suffix(".split.csv"))
    assert list(split.columns) == ["image_id", "lesion_id", "split"]
    assert (split.groupby("lesion_id")["split"].nunique() == 1).all()
    assert split["split"].value_counts().to_dict() == {k: v for k, v in card["split_images"].items() if v}
    assert sum(sum(c.values()) for c in card["split_counts"].values()) == len(split)


def test_a_failed_export_leaves_the_previous_model_intact(trained, tmp_path, monkeypatch):
    from skincancer.predict import load

    learn = load(trained).learn
    target = tmp_path / "model.pkl"
    target.write_bytes(b"the previous good model")

    def boom(self, fname, **kwargs):
        fname.write_bytes(b"half a pickle")
        raise OSError("disk full")

    monkeypatch.setattr(type(learn), "export", boom)
    with pytest.raises(OSError, match="disk full"):
        export(learn, target, {}, pd.DataFrame(columns=["image_id", "lesion_id", "split"]))
    assert target.read_bytes() == b"the previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pkl"]  # no temporary files left behind


# what a 0.1 export pickled by name (read from one with pickletools): each must still resolve, or fastai's
# load_learner and --trust-pickle fail on models trained before
NAMES_0_1 = ["skincancer.augment.SyncFreeAffineCoordTfm", "skincancer.augment.SyncFreeWarpCoord",
             "skincancer.augment.dihedral_mat", "skincancer.losses.OperatingPointLoss", "skincancer.train.auroc_or_nan"]


def pickled_names(path) -> set[str]:
    """The package's names a torch-saved pickle refers to (its globals), read without unpickling it."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif op.name == "STACK_GLOBAL":
            names.add(f"{strings[-2]}.{strings[-1]}")
        elif op.name == "GLOBAL":
            names.add(arg.replace(" ", "."))
    return {n for n in names if n.startswith("skincancer.")}


def test_every_name_an_export_pickles_resolves_and_so_do_those_of_0_1_exports(trained):
    names = pickled_names(trained)
    # ours: only the loss that decodes the call, which fastai's learn.predict needs; fastai's own augmentation and no
    # metrics otherwise, so no class of ours built on a fastai private one (fa._WarpCoord) is pickled
    assert names == {"skincancer.losses.OperatingPointLoss"}
    for name in sorted(names | set(NAMES_0_1)):
        module, _, attribute = name.rpartition(".")
        assert getattr(importlib.import_module(module), attribute, None) is not None, name


def test_the_export_pickles_fastais_transforms_and_gives_training_its_own_back(small_dls, tmp_path):
    from fastai.vision import augment as fa

    from skincancer.augment import SyncFreeAffineCoordTfm
    from skincancer.export import as_fastai_export
    from skincancer.model import make_learner

    learn = make_learner(small_dls, "binary", "resnet18", pretrained=False)
    ours = [t for t in learn.dls.train.after_batch.fs if isinstance(t, fa.AffineCoordTfm)]
    assert ours and all(isinstance(t, SyncFreeAffineCoordTfm) for t in ours)
    with as_fastai_export(learn):
        inside = [t for t in learn.dls.train.after_batch.fs if isinstance(t, fa.AffineCoordTfm)]
        assert [type(t) for t in inside] == [fa.AffineCoordTfm] and not learn.metrics
        assert any(type(c) is fa._WarpCoord for t in inside for c in t.coord_fs)
        learn.export(tmp_path / "m.pkl")
    assert learn.dls.train.after_batch.fs.filter(lambda t: isinstance(t, fa.AffineCoordTfm)) == ours and learn.metrics
    assert not {n for n in pickled_names(tmp_path / "m.pkl") if n != "skincancer.losses.OperatingPointLoss"}
