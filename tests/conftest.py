"""Shared fixtures: the read-only HAM10000 copies in ../shared/data and small folders built from them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
# the smallest real training run: ~300 images, 64 px, one epoch, from scratch
SMALL = ["--limit", "300", "--size", "64", "--bs", "32", "--epochs", "1", "--no-pretrained", "--workers", "0"]
SHARED = Path(os.environ.get("SKINCANCER_SHARED_DATA", ROOT.parent / "shared" / "data"))
# presized caches of this test session (subprocesses inherit it), never the user's ~/.cache/skincancer
TEST_CACHE = tempfile.mkdtemp(prefix="skincancer-test-cache-")
os.environ["SKINCANCER_CACHE"] = TEST_CACHE


def pytest_sessionfinish(session, exitstatus):
    """Delete this session's presized caches: every run would otherwise leave one in the temporary folder."""
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


def _need(path: Path) -> Path:
    if not path.exists():
        msg = f"{path} is missing (set SKINCANCER_SHARED_DATA to the folder holding ham10000_200x150)"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI always has the shared data: its absence is a broken setup, not a skip
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def ham_dir() -> Path:
    """The complete HAM10000 set at 200x150."""
    return _need(SHARED / "ham10000_200x150")


@pytest.fixture(scope="session")
def originals_dir() -> Path:
    """14 full-size 600x450 originals."""
    return _need(SHARED / "ham10000_originals")


@pytest.fixture(scope="session")
def original_images(originals_dir) -> list[Path]:
    """Paths of the full-size originals."""
    return sorted((originals_dir / "images").glob("*.jpg"))


@pytest.fixture(scope="session")
def ham_metadata(ham_dir) -> pd.DataFrame:
    """The raw metadata CSV of the shared set."""
    return pd.read_csv(ham_dir / "HAM10000_metadata.csv", dtype=str)


@pytest.fixture
def small_rows(ham_metadata) -> pd.DataFrame:
    """A few whole lesions of every diagnosis (about 40 images), for folders built in a test."""
    lesions = ham_metadata.groupby("dx")["lesion_id"].apply(lambda s: sorted(s.unique())[:4]).explode()
    return ham_metadata[ham_metadata["lesion_id"].isin(set(lesions))].reset_index(drop=True)


def copy_images(rows: pd.DataFrame, src: Path, dest: Path) -> None:
    """Copy the images of `rows` from the shared set into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    for image_id in rows["image_id"]:
        shutil.copy(src / "images" / f"{image_id}.jpg", dest / f"{image_id}.jpg")


@pytest.fixture
def make_ham(tmp_path, ham_dir, small_rows):
    """Build a HAM10000-style folder (flat images/ and HAM10000_metadata.csv) and return its path."""

    def make(rows: pd.DataFrame | None = None, metadata: pd.DataFrame | None = None) -> Path:
        rows = small_rows if rows is None else rows
        root = tmp_path / "ham"
        copy_images(rows, ham_dir, root / "images")
        (rows if metadata is None else metadata).to_csv(root / "HAM10000_metadata.csv", index=False)
        return root

    return make


def wait_for_checkpoint(state_file: Path, epoch: int, proc, timeout: float = 240) -> None:
    """Wait until a training process has checkpointed `epoch` (0-based); fail if it exits or time runs out."""
    import json
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(state_file.read_text())["epoch"] >= epoch:
                return
        except (FileNotFoundError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint of epoch {epoch} appeared (exit status {proc.poll()})")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ham_dir) -> Path:
    """A binary model trained for one epoch on ~300 images by `python -m skincancer train`."""
    from skincancer import cli

    out = tmp_path_factory.mktemp("models") / "smoke.pkl"
    assert cli.main(["train", "--data", str(ham_dir), *SMALL, "--out", str(out)]) == 0
    return out
