"""The presized image cache: the same pixels as the DataBlock, reused, invalidated, and never half-written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from skincancer import SkinCancerError
from skincancer.data import prepare
from skincancer.presize import presized_images


@pytest.fixture(scope="module")
def small_df(ham_dir):
    return prepare(ham_dir, "binary", limit=150, seed=1)


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
