"""A presized image cache: decode and squish every image once, then train from one uint8 array.

Decoding JPEGs and resizing them every epoch, on the CPU, starves a GPU (docs/speed.md). The cache holds each image
exactly as fastai's `Resize(presize, method='squish')` item transform would make it, so a model trained from the cache
is the model the DataBlock pipeline would train, and the exported learner (which reads files) sees the same pixels at
inference.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import numpy as np
from fastai.vision.all import PILImage, Resize, ResizeMethod
from fastprogress.fastprogress import progress_bar

from .console import on_terminal
from .errors import SkinCancerError
from .files import atomic_path

CACHE_VERSION = 1  # bump when the way pixels are made changes: old caches are then ignored


def default_cache_dir() -> Path:
    """Where presized caches live: $SKINCANCER_CACHE, else $XDG_CACHE_HOME/skincancer, else ~/.cache/skincancer."""
    if os.environ.get("SKINCANCER_CACHE"):
        return Path(os.environ["SKINCANCER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "skincancer"


def cache_key(paths: Sequence[str | Path], size: int) -> str:
    """A digest of the images (path, byte size, modification time) and the presize: any change makes a new cache."""
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "size": size, "method": "squish"}).encode())
    missing = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            missing.append(str(p))
            continue
        h.update(f"{Path(p).resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    if missing:
        raise SkinCancerError(f"presize cache: {len(missing)} image file(s) do not exist, e.g. {missing[0]}")
    return h.hexdigest()[:24]


def _presize_one(path: str | Path, size: int) -> np.ndarray:
    # fastai's own transform, so the pixels are those the DataBlock's item_tfms would give
    img = Resize(size, method=ResizeMethod.Squish)(PILImage.create(path), split_idx=1)
    return np.asarray(img, dtype=np.uint8)


def _fill(tmp: str, start: int, paths: list[str], size: int) -> None:
    out = np.load(tmp, mmap_mode="r+")
    for i, path in enumerate(paths, start):
        try:
            out[i] = _presize_one(path, size)
        except Exception as e:  # noqa: BLE001 - any decoder failure names the file
            raise SkinCancerError(f"{path}: cannot be read as an image ({type(e).__name__}: {e})") from e
    out.flush()


def presized_images(paths: Sequence[str | Path], size: int, folder: str | Path | None = None,
                    num_workers: int | None = None, show_progress: bool = True) -> np.ndarray:
    """The images squished to `size` x `size` as a read-only uint8 array (N, size, size, 3), cached in `folder`.

    The cache file is named by `cache_key`, written to a temporary file and renamed, so an interrupted build
    leaves nothing behind, and reused by any later run on the same files at the same size.
    """
    if size <= 0:
        raise SkinCancerError(f"presize: {size} must be positive")
    names = [str(p) for p in paths]
    folder = Path(folder) if folder is not None else default_cache_dir()
    dest = folder / f"presized-{size}-{len(names)}-{cache_key(names, size)}.npy"
    if dest.is_file():
        try:
            arr = np.load(dest, mmap_mode="r")
            if arr.shape == (len(names), size, size, 3) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # unreadable or truncated by hand: build it again
    with atomic_path(dest) as tmp:
        np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(names), size, size, 3)).flush()
        chunks = [(str(tmp), start, names[start:start + 64], size) for start in range(0, len(names), 64)]
        workers = num_workers or min(16, os.cpu_count() or 1)
        if workers <= 1:
            for chunk in chunks:
                _fill(*chunk)
        else:  # processes: fastai's transforms hold the GIL, threads would run one at a time
            with ProcessPoolExecutor(workers) as pool:
                jobs = as_completed([pool.submit(_fill, *chunk) for chunk in chunks])
                if show_progress and on_terminal():
                    jobs = progress_bar(jobs, total=len(chunks), leave=False)
                    jobs.comment = f"presizing {len(names)} images to {size}px"
                for job in jobs:
                    job.result()
    return np.load(dest, mmap_mode="r")
