"""Photos of one lesion filed under two lesion ids: found by a perceptual hash, confirmed by the photos' fine detail,
and kept together by the split. HAM10000's own list is shipped (ham10000_duplicates.csv); `duplicates` finds them in
any set."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from .errors import SkinCancerError
from .images import open_image

HASH_DISTANCE = 10  # perceptual-hash bits two photos may differ by to be compared at all (of 64)
MIN_CORRELATION = 0.75  # of their fine detail: HAM10000's one duplicate pair 0.88, every other pair at most 0.64
COLUMNS = ["image_a", "image_b", "lesion_a", "lesion_b", "hash_distance", "correlation"]
SHIPPED = "ham10000_duplicates.csv"


def _detail(path: str) -> np.ndarray:
    """A photo's fine detail (grey, 200x150, less its blur), standardised: hair, pigment network, not the colours."""
    grey = open_image(path).convert("L").resize((200, 150), Image.Resampling.BILINEAR)
    a = np.asarray(grey, np.float64) - np.asarray(grey.filter(ImageFilter.GaussianBlur(4)), np.float64)
    return (a - a.mean()) / (a.std() + 1e-9)


def _hashes(paths) -> np.ndarray:
    """Each photo's 64-bit perceptual hash (imagehash's pHash), as unsigned integers."""
    try:
        import imagehash  # only this search needs it: training reads the shipped list
    except ImportError:
        raise SkinCancerError("finding duplicates needs imagehash: pip install imagehash") from None
    return np.array([int(str(imagehash.phash(open_image(p).convert("L"))), 16) for p in paths], dtype=np.uint64)


def find_duplicates(df: pd.DataFrame, hash_distance: int = HASH_DISTANCE,
                    min_correlation: float = MIN_CORRELATION) -> pd.DataFrame:
    """Pairs of photos under different lesion ids that show the same scene: hashes within `hash_distance` bits, and
    fine detail correlated at least `min_correlation` (the best of the photo, its flips and its half turn)."""
    hashes = _hashes(df["path"])
    bits = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    lesions, ids = df["lesion_id"].to_numpy(), df["image_id"].to_numpy()
    details: dict[int, np.ndarray] = {}
    rows = []
    for start in range(0, len(hashes), 512):  # a block of rows against all: bounded memory
        x = hashes[start:start + 512, None] ^ hashes[None, :]
        distance = bits[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1)
        for i, j in zip(*np.nonzero(distance <= hash_distance)):
            a, b = start + i, j
            if a >= b or lesions[a] == lesions[b]:
                continue
            for k in (a, b):
                if k not in details:
                    details[k] = _detail(df["path"].iloc[k])
            y = details[b]
            corr = max(float((details[a] * v).mean()) for v in (y, y[::-1], y[:, ::-1], y[::-1, ::-1]))
            if corr >= min_correlation:
                rows.append((ids[a], ids[b], lesions[a], lesions[b], int(distance[i, j]), round(corr, 4)))
    return pd.DataFrame(rows, columns=COLUMNS)


def shipped_duplicates() -> pd.DataFrame:
    """The duplicate pairs found in HAM10000's 10,015 photos (`find_duplicates` on them), shipped with the package."""
    with resources.files(__package__).joinpath(SHIPPED).open(encoding="utf-8") as f:
        return pd.read_csv(f, dtype={c: str for c in COLUMNS[:4]})


def split_groups(df: pd.DataFrame, pairs: pd.DataFrame) -> pd.Series:
    """Each photo's group for the split: its lesion id, with the lesions of every duplicate pair in `df` joined."""
    parent = {lesion: lesion for lesion in df["lesion_id"].unique()}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    known = set(df["image_id"])
    for a, b, la, lb in pairs[["image_a", "image_b", "lesion_a", "lesion_b"]].itertuples(index=False):
        if a in known and b in known and la in parent and lb in parent:
            parent[root(la)] = root(lb)
    return df["lesion_id"].map(root).rename("split_group")
