"""The presized image cache: the same pixels as the DataBlock, reused, invalidated, and never half-written."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from skincancer import SkinCancerError
from skincancer.data import make_dataloaders, prepare
from skincancer.presize import presized_images


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


def test_loaders_built_from_the_cache_read_files_and_pickle_without_it(small_df, tmp_path):
    dls = make_dataloaders(small_df, size=48, bs=16, cache=tmp_path)
    test_dl = dls.test_dl(list(small_df["path"][:3]))
    assert type(test_dl).__name__ == "TfmdDL" and test_dl.one_batch()[0].shape == (3, 3, 48, 48)
    empty = dls.new_empty()
    assert [type(dl).__name__ for dl in empty.loaders] == ["TfmdDL", "TfmdDL"]
    assert b"PresizedDL" not in pickle.dumps(empty)  # exported learners load with plain fastai


def test_the_cache_is_reused_and_rebuilt_when_an_image_or_the_size_changes(small_df, tmp_path):
    paths = sorted(small_df["path"].astype(str))[:12]
    first = presized_images(paths, 40, tmp_path, show_progress=False)
    assert first.shape == (12, 40, 40, 3) and first.dtype == np.uint8 and first.std() > 0
    files = set(tmp_path.iterdir())
    again = presized_images(paths, 40, tmp_path, show_progress=False)
    assert set(tmp_path.iterdir()) == files and np.array_equal(first, again)  # nothing rebuilt

    presized_images(paths, 32, tmp_path, show_progress=False)
    assert len(set(tmp_path.iterdir()) - files) == 1  # another size, another cache

    copy = tmp_path / "src"
    copy.mkdir()
    local = []
    for p in paths:
        (copy / os.path.basename(p)).write_bytes(open(p, "rb").read())
        local.append(str(copy / os.path.basename(p)))
    before = presized_images(local, 40, tmp_path, show_progress=False)
    assert np.array_equal(before, first)
    (copy / os.path.basename(paths[5])).write_bytes(open(paths[6], "rb").read())  # 6th image replaced by the 7th
    after = presized_images(local, 40, tmp_path, show_progress=False)
    assert np.array_equal(after[5], first[6]) and not np.array_equal(after[5], before[5])


def test_an_unreadable_image_names_the_file_and_leaves_no_cache(small_df, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    paths = [*sorted(small_df["path"].astype(str))[:3], str(bad)]
    cache = tmp_path / "cache"
    with pytest.raises(SkinCancerError, match="broken.jpg: cannot be read as an image"):
        presized_images(paths, 32, cache, num_workers=2, show_progress=False)
    assert not cache.exists() or list(cache.iterdir()) == []
    with pytest.raises(SkinCancerError, match="do not exist"):
        presized_images([str(tmp_path / "missing.jpg")], 32, cache)
