"""HAM10000 metadata read from any of its layouts, labelled, and split by lesion (pandas; no images decoded)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .config import SEED, TEST_PCT, VALID_PCT
from .duplicates import shipped_duplicates, split_groups
from .errors import SkinCancerError, first_few
from .images import IMAGE_SUFFIXES
from .labels import DX_CLASSES, DX_NAMES, label_of

SPLITS: tuple[str, ...] = ("train", "valid", "test")

METADATA_CSV = "HAM10000_metadata.csv"
# the Harvard Dataverse serves the metadata as .tab
METADATA_NAMES = (METADATA_CSV, "HAM10000_metadata.tab", "HAM10000_metadata.tsv", "HAM10000_metadata")
# folder-per-class sets (e.g. Kaggle's "skin cancer ISIC 9 classes"): class folder name -> HAM10000 diagnosis,
# whose benign/malignant label follows; override with class_map / --class-map
DEFAULT_CLASS_MAP: dict[str, str] = {
    "actinic keratosis": "akiec", "basal cell carcinoma": "bcc", "dermatofibroma": "df", "melanoma": "mel",
    "nevus": "nv", "pigmented benign keratosis": "bkl", "seborrheic keratosis": "bkl",
    "squamous cell carcinoma": "akiec",  # malignant; HAM10000's akiec holds intraepithelial carcinoma
    "vascular lesion": "vasc", **{dx: dx for dx in DX_CLASSES}, **{name: dx for dx, name in DX_NAMES.items()}}
ISIC_GROUND_TRUTH_CSV = "ISIC2018_Task3_Training_GroundTruth.csv"
ISIC_GROUPINGS_CSV = "ISIC2018_Task3_Training_LesionGroupings.csv"
REQUIRED_COLUMNS = ("image_id", "lesion_id", "dx")
LESION_ID_KNOWN = "lesion_id_known"  # False where lesion_id is only the photo's id (folder-per-class sets)
SET_SPLIT = "set_split"  # a folder-per-class set's own split: "test" under a Test folder, "train" under Train
SET_TEST_FOLDERS, SET_TRAIN_FOLDERS = {"test", "testing"}, {"train", "training"}
SOURCE_COLUMN = "dataset"  # HAM10000's source of each photo (Harvard Dataverse metadata): a clinic and its camera


# --- files -----------------------------------------------------------------------------------

def index_files(root: str | Path) -> tuple[dict[str, Path], dict[str, Path]]:
    """Walk `root` once and return ({image stem: path}, {csv name: path}); the first path in sorted order wins."""
    root = Path(root)
    if not root.is_dir():
        raise SkinCancerError(f"{root}: data folder does not exist or is not a folder")
    images: dict[str, Path] = {}
    csvs: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()  # deterministic: Kaggle's copy ships each image twice (HAM10000_images_part_1 and ham10000_...)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in sorted(filenames):
            path = Path(dirpath) / name
            suffix = path.suffix.lower()
            if suffix in IMAGE_SUFFIXES:
                images.setdefault(path.stem, path)
            elif suffix in (".csv", ".tab", ".tsv") or name in METADATA_NAMES:
                csvs.setdefault(name, path)
    return images, csvs


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or tab-separated file as strings, or SkinCancerError naming the file."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            sep = "\t" if "\t" in f.readline() else ","
        return pd.read_csv(path, dtype=str, keep_default_na=False, sep=sep)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SkinCancerError(f"{path}: not a readable CSV ({e})") from None


def _require_columns(df: pd.DataFrame, columns, source: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise SkinCancerError(
            f"{source}: missing column(s) {', '.join(map(repr, missing))}; found {', '.join(map(repr, df.columns))}")


ONEHOT_COLUMNS = [c.upper() for c in DX_CLASSES]


def is_onehot(df: pd.DataFrame) -> bool:
    """Whether a labels frame is in the ISIC one-hot form (image, MEL, NV, ...)."""
    return "image" in df.columns and set(ONEHOT_COLUMNS) <= set(df.columns)


def onehot_to_dx(gt: pd.DataFrame, source: Path) -> pd.DataFrame:
    """ISIC one-hot ground truth (image, MEL, NV, BCC, AKIEC, BKL, DF, VASC) as image_id, dx."""
    _require_columns(gt, ["image", *ONEHOT_COLUMNS], source)
    values = gt[ONEHOT_COLUMNS].apply(pd.to_numeric, errors="coerce")
    bad = gt.loc[values.isna().any(axis=1) | (values.sum(axis=1) != 1), "image"]
    if len(bad):
        raise SkinCancerError(f"{source}: {len(bad)} row(s) are not one-hot over {', '.join(ONEHOT_COLUMNS)}: "
                              f"{first_few(bad)}")
    return pd.DataFrame({"image_id": gt["image"], "dx": values.idxmax(axis=1).str.lower()})


def read_isic_ground_truth(ground_truth: Path, groupings: Path) -> pd.DataFrame:
    """Turn the ISIC 2018 Task 3 one-hot ground truth plus lesion groupings into HAM10000 metadata columns."""
    gt = onehot_to_dx(read_table(ground_truth), ground_truth)
    groups = read_table(groupings)
    _require_columns(groups, ["image", "lesion_id"], groupings)
    groups = groups.rename(columns={"image": "image_id"})[["image_id", "lesion_id"]]
    df = gt.merge(groups, on="image_id", how="left")
    ungrouped = df.loc[df["lesion_id"].isna(), "image_id"]
    if len(ungrouped):
        raise SkinCancerError(f"{groupings}: {len(ungrouped)} image(s) of {ground_truth.name} have no lesion_id: "
                              f"{first_few(ungrouped)}")
    return df[["lesion_id", "image_id", "dx"]]


def validate_metadata(df: pd.DataFrame, source: str | Path,
                      required: tuple[str, ...] = REQUIRED_COLUMNS) -> pd.DataFrame:
    """Check columns, empty fields, diagnoses and duplicate ids; return a cleaned copy or raise SkinCancerError."""
    _require_columns(df, required, Path(source))
    df = df.copy()
    for col in required:
        df[col] = df[col].astype(str).str.strip()
    df["dx"] = df["dx"].str.lower()
    for col in required:
        empty = df.index[df[col].isin(["", "nan", "None"])]
        if len(empty):
            raise SkinCancerError(f"{source}: {len(empty)} row(s) have an empty {col!r}: "
                                  f"rows {first_few(i + 2 for i in empty)}")  # +2: header line, 1-based
    unknown = df.loc[~df["dx"].isin(DX_CLASSES)]
    if len(unknown):
        offenders = (f"{r.image_id}: {r.dx!r}" for r in unknown.itertuples())
        raise SkinCancerError(f"{source}: {len(unknown)} row(s) have an unknown dx (expected one of "
                              f"{', '.join(DX_CLASSES)}): {first_few(offenders)}")
    dup = df.loc[df["image_id"].duplicated(keep=False), "image_id"].unique()
    if len(dup):
        raise SkinCancerError(f"{source}: {len(dup)} image_id(s) appear more than once: {first_few(dup)}")
    return df.reset_index(drop=True)


def attach_paths(df: pd.DataFrame, images: dict[str, Path], root: Path, drop_missing: bool = False) -> pd.DataFrame:
    """Add a `path` column from the file index; missing images raise, or are dropped with a warning."""
    df = df.copy()
    df["path"] = df["image_id"].map(images)
    missing = df.loc[df["path"].isna(), "image_id"]
    if len(missing):
        msg = f"{root}: {len(missing)} of {len(df)} image(s) listed in the metadata are missing: {first_few(missing)}"
        zips = sorted(p.name for p in Path(root).rglob("*.zip"))
        if zips:
            msg += f" (unzip {first_few(zips, 3)} first)"
        if not drop_missing:
            raise SkinCancerError(msg + " (pass drop_missing=True / --drop-missing to train without them)")
        warnings.warn(msg + "; dropped", stacklevel=2)
        df = df.loc[df["path"].notna()].reset_index(drop=True)
        if df.empty:
            raise SkinCancerError(f"{root}: no image listed in the metadata was found")
    df["path"] = df["path"].map(str)
    return df


def read_class_folders(root: Path, images: dict[str, Path], class_map: dict[str, str] | None = None) -> pd.DataFrame:
    """Metadata for a folder-per-class set (`Train/<class>/*.jpg`, `Test/<class>/*.jpg` or `<class>/*.jpg`)."""
    mapping = {k.strip().lower(): v for k, v in (class_map or DEFAULT_CLASS_MAP).items()}
    bad_values = sorted({v for v in mapping.values() if v not in DX_CLASSES})
    if bad_values:
        raise SkinCancerError(f"class map: {first_few(bad_values)} not HAM10000 diagnoses ({', '.join(DX_CLASSES)})")
    rows, unknown = [], set()
    for image_id, path in images.items():
        folder = path.parent.name.strip().lower()
        if folder in mapping:
            parts = {p.lower() for p in path.relative_to(root).parts[:-2]}
            own = "test" if parts & SET_TEST_FOLDERS else "train" if parts & SET_TRAIN_FOLDERS else ""
            rows.append((image_id, image_id, mapping[folder], own))
        else:
            unknown.add(path.parent.name)
    if not rows:
        raise SkinCancerError(
            f"{root}: found neither {METADATA_CSV} nor the pair {ISIC_GROUND_TRUTH_CSV} + {ISIC_GROUPINGS_CSV} "
            "anywhere below this folder, nor class folders whose names the class map knows; see data/README.md")
    if unknown:
        raise SkinCancerError(f"{root}: image folder(s) {first_few(sorted(unknown))} are not in the class map; "
                              "add them with --class-map")
    warnings.warn(f"{root}: a folder-per-class set has no lesion ids: its figures count photos, and photos of one "
                  "lesion may sit in two splits (its own Test folder, if any, stays the test split)", stacklevel=3)
    # lesion_id is the photo's own id, so splits and checks run; LESION_ID_KNOWN says no figure may call it a lesion
    return pd.DataFrame(rows, columns=["lesion_id", "image_id", "dx", SET_SPLIT]).assign(**{LESION_ID_KNOWN: False})


def read_metadata(root: str | Path, drop_missing: bool = False,
                  class_map: dict[str, str] | None = None) -> pd.DataFrame:
    """Load a HAM10000 folder into one row per image: lesion_id, image_id, dx, path (plus any other metadata)."""
    root = Path(root)
    images, csvs = index_files(root)
    metadata = next((csvs[n] for n in METADATA_NAMES if n in csvs), None)
    if metadata is not None:
        source = metadata
        df = read_table(source)
    elif ISIC_GROUND_TRUTH_CSV in csvs and ISIC_GROUPINGS_CSV in csvs:
        source = csvs[ISIC_GROUND_TRUTH_CSV]
        df = read_isic_ground_truth(source, csvs[ISIC_GROUPINGS_CSV])
    else:
        source = root
        df = read_class_folders(root, images, class_map)
    df = validate_metadata(df, source)
    return attach_paths(df, images, root, drop_missing=drop_missing)


# --- labels and splits -------------------------------------------------------------------

def add_labels(df: pd.DataFrame, task: str) -> pd.DataFrame:
    """Return a copy of `df` with a `label` column for `task`."""
    return df.assign(label=[label_of(dx, task) for dx in df["dx"]])



def lesion_labels(df: pd.DataFrame) -> pd.Series:
    """Each lesion's label: the most common label among its images (ties broken alphabetically)."""
    counts = df.groupby(["lesion_id", "label"]).size().rename("n").reset_index()
    counts = counts.sort_values(["lesion_id", "n", "label"], ascending=[True, False, True])
    return counts.drop_duplicates("lesion_id").set_index("lesion_id")["label"]


def split_by_lesion(df: pd.DataFrame, valid_pct: float = VALID_PCT, test_pct: float = TEST_PCT,
                    seed: int = SEED) -> pd.Series:
    """Assign each image to train/valid/test, grouped by lesion and stratified by lesion label; deterministic."""
    if not (0 < valid_pct < 1 and 0 <= test_pct < 1 and valid_pct + test_pct < 1):
        raise SkinCancerError(f"valid_pct={valid_pct}, test_pct={test_pct}: need 0 < valid, 0 <= test, sum < 1")
    rng = np.random.default_rng(seed)
    lesion_split: dict[str, str] = {}
    by_label = lesion_labels(df)
    wanted = ("train", "valid", "test") if test_pct > 0 else ("train", "valid")
    for label in sorted(by_label.unique()):
        lesions = np.array(sorted(by_label.index[by_label == label]))
        if len(lesions) < len(wanted):
            raise SkinCancerError(f"label {label!r} has {len(lesions)} lesion(s); each of {', '.join(wanted)} "
                                  "needs at least one (use more data or a larger --limit)")
        lesions = lesions[rng.permutation(len(lesions))]
        n_test = max(round(len(lesions) * test_pct), 1) if test_pct > 0 else 0
        n_valid = max(round(len(lesions) * valid_pct), 1)
        n_valid = min(n_valid, len(lesions) - n_test - 1)  # keep one lesion for training
        for i, lesion in enumerate(lesions):
            lesion_split[lesion] = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
    return df["lesion_id"].map(lesion_split).rename("split")


def sample_by_label(df: pd.DataFrame, n: int, seed: int = SEED, min_lesions: int = 3) -> pd.DataFrame:
    """About `n` images, in whole lesions, with each label in proportion and at least `min_lesions` lesions of it."""
    if n <= 0:
        raise SkinCancerError(f"limit: {n} must be a positive number of images")
    if n >= len(df):
        return df
    rng = np.random.default_rng(seed)
    per_lesion = df.groupby("lesion_id").size()
    by_label = lesion_labels(df)
    keep: list[str] = []
    for label in sorted(by_label.unique()):
        lesions = np.array(sorted(by_label.index[by_label == label]))
        lesions = lesions[rng.permutation(len(lesions))]
        quota = n * (df["label"] == label).mean()
        taken = np.cumsum(per_lesion[lesions].to_numpy())
        k = max(int(np.searchsorted(taken, quota)) + 1, min_lesions)
        keep.extend(lesions[:k])
    return df[df["lesion_id"].isin(set(keep))].reset_index(drop=True)


def read_split(split_csv: str | Path, df: pd.DataFrame) -> pd.Series:
    """The split recorded in a NAME.split.csv (image_id, lesion_id, split), for the images of `df` it names.

    Images of `df` the file does not name get no split (NaN); an image the file names that `df` lacks, a lesion id
    that differs from the metadata's, or a lesion in two splits raises SkinCancerError naming the file.
    """
    split_csv = Path(split_csv)
    if not split_csv.is_file():
        raise SkinCancerError(f"{split_csv}: no such split file (a model's NAME.split.csv)")
    recorded = read_table(split_csv)
    _require_columns(recorded, ["image_id", "split"], split_csv)
    bad = recorded.loc[~recorded["split"].isin(SPLITS), "split"].unique()
    if len(bad):
        raise SkinCancerError(f"{split_csv}: split values {first_few(map(repr, bad))} are not {', '.join(SPLITS)}")
    dup = recorded.loc[recorded["image_id"].duplicated(), "image_id"].unique()
    if len(dup):
        raise SkinCancerError(f"{split_csv}: {len(dup)} image_id(s) appear more than once: {first_few(dup)}")
    recorded = recorded.set_index("image_id")
    unknown = recorded.index.difference(df["image_id"])
    if len(unknown):
        raise SkinCancerError(f"{split_csv}: {len(unknown)} image(s) are not in this data set: {first_few(unknown)}")
    if "lesion_id" in recorded.columns:
        ours = df.set_index("image_id")["lesion_id"].reindex(recorded.index)
        moved = recorded.index[ours != recorded["lesion_id"]]
        if len(moved):
            raise SkinCancerError(f"{split_csv}: {len(moved)} image(s) belong to another lesion in this data set's "
                                  f"metadata: {first_few(moved)}")
    split = df["image_id"].map(recorded["split"]).rename("split")
    check_no_lesion_leak(df.assign(split=split).dropna(subset=["split"]), source=split_csv)
    return split


def split_by_source(df: pd.DataFrame, source: str, valid_pct: float = VALID_PCT, test_pct: float = TEST_PCT,
                    seed: int = SEED, groups: pd.Series | None = None) -> pd.Series:
    """Every lesion with a photo from `source` in test; the other lesions split by lesion into train and valid.

    A lesion photographed at two sources goes wholly to test, and so does every lesion `groups` joins to one there.
    Valid takes the share of the other lesions that it takes of the non-test lesions in a random split
    (valid_pct / (1 - test_pct)), so train and valid keep their ratio.
    """
    if SOURCE_COLUMN not in df.columns:
        raise SkinCancerError(f"test_source: {source!r}, but the metadata has no {SOURCE_COLUMN!r} column naming each "
                              "photo's source (HAM10000's HAM10000_metadata.csv from the Harvard Dataverse has it)")
    sources = sorted(df[SOURCE_COLUMN].unique())
    if source not in sources:
        raise SkinCancerError(f"test_source: {source!r} is not a source of this data set; its {SOURCE_COLUMN!r} column "
                              f"holds {', '.join(sources)}")
    groups = df["lesion_id"] if groups is None else groups
    is_test = groups.isin(set(groups[df[SOURCE_COLUMN] == source]))
    absent = sorted(set(df["label"]) - set(df.loc[is_test, "label"]))
    if absent:
        raise SkinCancerError(f"test_source: {source!r} has no photo of {', '.join(absent)}, so its test split could "
                              "not measure the task; hold out another source")
    return split_off_test(df, is_test, valid_pct, test_pct, seed, groups)


def split_off_test(df: pd.DataFrame, is_test: pd.Series, valid_pct: float, test_pct: float, seed: int,
                      groups: pd.Series | None = None) -> pd.Series:
    """`is_test` as the test split; the rest split by lesion into train and valid at a random split's ratio, the
    lesions `groups` joins kept together."""
    split = pd.Series("test", index=df.index, name="split")
    rest = split_by_lesion(df.loc[~is_test], valid_pct / (1 - test_pct), 0.0, seed)
    split[~is_test] = rest if groups is None else keep_together(rest, groups[~is_test])
    return split


def prepare(root: str | Path, task: str = "binary", valid_pct: float = VALID_PCT, test_pct: float = TEST_PCT,
            seed: int = SEED, limit: int | None = None, drop_missing: bool = False,
            class_map: dict[str, str] | None = None, split_from: str | Path | None = None,
            test_source: str | None = None) -> pd.DataFrame:
    """Metadata with `label` and `split` columns: read, label, then sample and split by lesion, or reuse a split.

    With `split_from` (a model's NAME.split.csv) the images it names keep the split recorded there, whatever the
    task or seed, and no other image is used: models trained apart can be compared on the same test images. With
    `test_source`, every lesion photographed at that source is the test split (`split_by_source`).
    """
    df = add_labels(read_metadata(root, drop_missing=drop_missing, class_map=class_map), task)
    if split_from is not None:
        if limit or test_source:
            raise SkinCancerError(f"{'limit' if limit else 'test_source'} and split_from (--split-from): a recorded "
                                  "split already decides which images are used and where")
        df = df.assign(split=read_split(split_from, df)).dropna(subset=["split"]).reset_index(drop=True)
        missing = [s for s in ("train", "valid") if not (df["split"] == s).any()]
        if missing:
            raise SkinCancerError(f"{split_from}: no image in the {' or '.join(missing)} split")
        return df
    if limit:
        df = sample_by_label(df, limit, seed=seed)
    if SET_SPLIT in df.columns and (df[SET_SPLIT] == "test").any():
        return df.assign(split=split_by_set(df, valid_pct, test_pct, seed=seed))
    # photos of one lesion filed under two ids (duplicates.py) go where the first of them goes: every other lesion
    # keeps the split it had without them
    groups = split_groups(df, shipped_duplicates())
    if test_source is not None:
        return df.assign(split=split_by_source(df, test_source, valid_pct, test_pct, seed=seed, groups=groups))
    return df.assign(split=keep_together(split_by_lesion(df, valid_pct, test_pct, seed=seed), groups))


def keep_together(split: pd.Series, groups: pd.Series) -> pd.Series:
    """`split` with every photo of a group (lesions joined by `split_groups`) in its group's first photo's split."""
    return split.groupby(groups).transform("first").rename("split")


def split_by_set(df: pd.DataFrame, valid_pct: float = VALID_PCT, test_pct: float = TEST_PCT,
                 seed: int = SEED) -> pd.Series:
    """A set's own test folder as the test split; the rest split into train and valid as `split_by_source` does."""
    return split_off_test(df, df[SET_SPLIT] == "test", valid_pct, test_pct, seed)


def split_table(df: pd.DataFrame) -> pd.DataFrame:
    """Images per split and label, for the printout and the model card."""
    return df.groupby(["split", "label"]).size().unstack(fill_value=0).reindex(SPLITS).fillna(0).astype(int)


def check_no_lesion_leak(df: pd.DataFrame, source: str | Path | None = None) -> None:
    """Raise SkinCancerError (naming `source`, if given) if any lesion appears in more than one split."""
    n_splits = df.groupby("lesion_id")["split"].nunique()
    leaked = n_splits.index[n_splits > 1]
    if len(leaked):
        where = f"{source}: " if source is not None else ""
        raise SkinCancerError(f"{where}{len(leaked)} lesion(s) appear in more than one split: {first_few(leaked)}")



def class_weights(labels, classes) -> np.ndarray:
    """Inverse-frequency class weights normalised to mean 1 (classes absent from `labels` get weight 1)."""
    counts = pd.Series(list(labels)).value_counts().reindex(list(classes)).fillna(0).to_numpy(float)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(classes), 1.0)
    return w / w.mean()


def lesion_groups(df: pd.DataFrame) -> np.ndarray | None:
    """Each image's lesion_id for a lesion-level bootstrap, or None where the frame has no usable lesion ids."""
    if "lesion_id" not in df.columns or df["lesion_id"].isna().any():
        return None
    if LESION_ID_KNOWN in df.columns and not df[LESION_ID_KNOWN].astype(bool).all():
        return None  # each photo its own "lesion": resample photos, and no lesion-by-lesion figure
    return df["lesion_id"].astype(str).to_numpy()
