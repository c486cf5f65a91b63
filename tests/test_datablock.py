"""The DataBlock and loaders: presizing, augmentation, the weights' normalisation, the presized cache's batches."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from skincancer.data import prepare
from skincancer.datablock import make_dataloaders


def test_dataloaders_presize_augment_normalise_and_keep_the_vocab(ham_dir):
    df = prepare(ham_dir, limit=120, seed=3)
    dls = make_dataloaders(df, "binary", size=48, bs=16, num_workers=0)
    assert list(dls.vocab) == ["benign", "malignant"]
    assert len(dls.train_ds) == (df["split"] == "train").sum() and len(dls.valid_ds) == (df["split"] == "valid").sum()
    assert not set(dls.valid_ds.items["image_id"]) & set(df.loc[df["split"] == "test", "image_id"])
    x, y = dls.one_batch()
    assert tuple(x.shape) == (16, 3, 48, 48)
    assert abs(float(x.mean())) < 1.0 and 0.3 < float(x.std()) < 3.0  # ImageNet-normalised, not 0..1
    assert set(y.tolist()) <= {0, 1}


def test_balanced_sampler_draws_malignant_about_half_the_time(ham_dir):
    df = prepare(ham_dir, limit=200, seed=3)
    dls = make_dataloaders(df, "binary", size=32, bs=64, sampler=True, num_workers=0)
    ys = np.concatenate([y.numpy() for _, y in dls.train])
    assert 0.35 < ys.mean() < 0.65  # the data are ~20% malignant


@pytest.fixture(scope="module")
def small_df(ham_dir):
    return prepare(ham_dir, "binary", limit=150, seed=1)


def test_cached_batches_are_the_datablock_batches(small_df, tmp_path):
    plain = make_dataloaders(small_df, size=48, bs=16, num_workers=0)
    cached = make_dataloaders(small_df, size=48, bs=16, cache=tmp_path)
    assert type(cached.train).__name__ == "PresizedDL" and type(plain.train).__name__ == "TfmdDL"
    # validation transforms are deterministic: every pixel and label must agree
    for (xp, yp), (xc, yc) in zip(plain.valid, cached.valid):
        assert type(xc) is type(xp) and xc.shape == xp.shape
        assert torch.equal(yp, yc)
        assert torch.allclose(xp, xc, atol=1e-6)
    # training batches are augmented at random, but hold the training labels in their proportions
    labels = torch.cat([y for _, y in cached.train])
    assert len(labels) == len(plain.train) * 16 and 0 < labels.float().mean() < 0.5
    assert np.array_equal(np.sort(cached.train.targets.cpu().numpy()),
                          np.sort([int(y) for _, y in plain.train_ds]))


def test_another_split_of_the_same_images_reuses_the_one_cache(small_df, tmp_path):
    make_dataloaders(small_df, size=48, bs=16, cache=tmp_path)
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1
    # test and train trade places (as another seed or held-out source would): no second copy of the data
    swapped = small_df.assign(split=small_df["split"].replace({"test": "train", "train": "test"}))
    dls = make_dataloaders(swapped, size=48, bs=16, cache=tmp_path)
    assert sorted(tmp_path.iterdir()) == files
    assert len(dls.train.targets) == (swapped["split"] == "train").sum()
    plain = make_dataloaders(swapped, size=48, bs=16, num_workers=0)
    for (xp, _), (xc, _) in zip(plain.valid, dls.valid):
        assert torch.allclose(xp, xc, atol=1e-6)


def test_loaders_built_from_the_cache_read_files_and_pickle_without_it(small_df, tmp_path):
    dls = make_dataloaders(small_df, size=48, bs=16, cache=tmp_path)
    test_dl = dls.test_dl(list(small_df["path"][:3]))
    assert type(test_dl).__name__ == "TfmdDL" and test_dl.one_batch()[0].shape == (3, 3, 48, 48)
    empty = dls.new_empty()
    assert [type(dl).__name__ for dl in empty.loaders] == ["TfmdDL", "TfmdDL"]
    assert b"PresizedDL" not in pickle.dumps(empty)  # exported learners load with plain fastai
