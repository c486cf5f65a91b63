"""Get HAM10000 as the ISIC 2018 Task 3 files: resumable, verified, safely extracted, idempotent."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd
from fastprogress.fastprogress import progress_bar

from .console import on_terminal
from .errors import SkinCancerError, first_few
from .files import sha256_file, write_json_atomic

ISIC_BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/2018/"
MANIFEST = "skincancer-manifest.json"
TRAINING_FILES = ("ISIC2018_Task3_Training_Input.zip", "ISIC2018_Task3_Training_GroundTruth.zip",
                  "ISIC2018_Task3_Training_LesionGroupings.csv")
TEST_FILES = ("ISIC2018_Task3_Validation_Input.zip", "ISIC2018_Task3_Validation_GroundTruth.zip",
              "ISIC2018_Task3_Test_Input.zip", "ISIC2018_Task3_Test_GroundTruth.zip")
# image folder -> the ground-truth CSV that lists its images
IMAGE_SETS = {"ISIC2018_Task3_Training_Input": "ISIC2018_Task3_Training_GroundTruth.csv",
              "ISIC2018_Task3_Validation_Input": "ISIC2018_Task3_Validation_GroundTruth.csv",
              "ISIC2018_Task3_Test_Input": "ISIC2018_Task3_Test_GroundTruth.csv"}
CHUNK = 1 << 20
TIMEOUT = 60


# --- one file over HTTP --------------------------------------------------------------------------

def _total_length(response, offset: int) -> int | None:
    """The whole file's length from Content-Range (a 206) or Content-Length (a 200)."""
    content_range = response.headers.get("Content-Range")
    if content_range and "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    length = response.headers.get("Content-Length")
    return int(length) + (offset if response.status == 206 else 0) if length is not None else None


def fetch(url: str, dest: str | Path, show_progress: bool = True) -> Path:
    """Download `url` to `dest`, resuming a previous `dest.part` with an HTTP Range request; verify its length."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # the range starts at the end: the part file is already whole
            part.replace(dest)
            return dest
        raise SkinCancerError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise SkinCancerError(f"{url}: could not connect ({getattr(e, 'reason', e)}); check the network or "
                              "pass --mirror") from None
    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored the range: start over
        total = _total_length(response, offset)
        mode = "ab" if offset else "wb"
        n_chunks = max(1, -(-(total - offset) // CHUNK)) if total else None
        chunks = range(n_chunks) if n_chunks else iter(int, 1)
        try:
            with open(part, mode) as f:
                for _ in (progress_bar(chunks, leave=False) if show_progress and n_chunks and on_terminal()
                          else chunks):
                    block = response.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                while block := response.read(CHUNK):  # a server that sent more than it announced
                    f.write(block)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as e:
            raise SkinCancerError(f"{url}: the download broke off at {part.stat().st_size:,} bytes ({e}); "
                                  "run the same command again to resume") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise SkinCancerError(f"{url}: got {size:,} of {total:,} bytes; run the same command again to resume")
    part.replace(dest)
    return dest


# --- archives ------------------------------------------------------------------------------------

def check_zip(path: Path) -> list[str]:
    """Member names of a zip whose every CRC checks out; raise SkinCancerError for a corrupt or unsafe archive."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
            links = [i.filename for i in z.infolist() if (i.external_attr >> 16) & 0o170000 == 0o120000]
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SkinCancerError(f"{path}: not a readable zip archive ({e})") from None
    if bad:
        raise SkinCancerError(f"{path}: corrupt archive, CRC check failed for {bad}")
    unsafe = [n for n in names if n.startswith(("/", "\\")) or ":" in n.split("/")[0]
              or ".." in PurePosixPath(n.replace("\\", "/")).parts]
    if unsafe or links:
        raise SkinCancerError(f"{path}: refusing to extract {len(unsafe) + len(links)} unsafe entr(ies) "
                              f"(absolute paths, '..' or links): {first_few(unsafe + links)}")
    return names


def extract(path: Path, dest: Path) -> list[Path]:
    """Extract a checked zip into a temporary folder beside `dest`, then rename its top-level entries into `dest`."""
    check_zip(path)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=dest))
    try:
        with zipfile.ZipFile(path) as z:
            z.extractall(tmp)
        moved = []
        for entry in sorted(tmp.iterdir()):
            if entry.name.startswith("__MACOSX"):
                continue
            target = dest / entry.name
            if target.exists():  # a previous, verified extraction: never mix two
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(entry, target)
            moved.append(target)
        return moved
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the whole download --------------------------------------------------------------------------

def read_manifest(dest: Path) -> dict:
    """The record of verified downloads in `dest` ({} if none or unreadable)."""
    try:
        return json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def verify_counts(dest: Path) -> dict[str, int]:
    """Check every extracted image folder holds exactly the images its ground-truth CSV lists."""
    counts = {}
    for folder, gt in IMAGE_SETS.items():
        if not (dest / folder).is_dir():
            continue
        gt_files = list(dest.rglob(gt))
        if not gt_files:
            raise SkinCancerError(f"{dest}: {folder}/ is there but not {gt}, which lists its images")
        expected = set(pd.read_csv(gt_files[0], usecols=["image"])["image"])
        found = {p.stem for p in (dest / folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        if missing := sorted(expected - found):
            raise SkinCancerError(f"{dest / folder}: {len(missing)} of the {len(expected)} images listed in {gt} "
                                  f"are missing: {first_few(missing)}")
        counts[folder] = len(found)
    return counts


def download(dest: str | Path, mirror: str | None = None, with_test: bool = False,
             show_progress: bool = True) -> dict:
    """Download, verify and extract the ISIC 2018 Task 3 (HAM10000) files into `dest`; return the manifest.

    A second run checks each recorded sha256 and downloads nothing; a corrupted file is fetched again.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    base = (mirror or ISIC_BASE_URL).rstrip("/") + "/"
    manifest = read_manifest(dest)
    names = TRAINING_FILES + (TEST_FILES if with_test else ())
    for name in names:
        path, entry = dest / name, manifest.get(name)
        if entry and path.exists() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]:
            if name.endswith(".zip") and not all((dest / t).exists() for t in entry.get("extracted", [])):
                entry["extracted"] = [p.name for p in extract(path, dest)]
                write_json_atomic(dest / MANIFEST, manifest)
            continue
        if entry:
            print(f"{name}: does not match its recorded sha256; downloading it again")
            path.unlink(missing_ok=True)
        print(f"downloading {base + name}")
        fetch(base + name, path, show_progress=show_progress)
        entry = {"url": base + name, "size": path.stat().st_size, "sha256": sha256_file(path)}
        if name.endswith(".zip"):
            try:
                entry["extracted"] = [p.name for p in extract(path, dest)]
            except SkinCancerError:
                path.unlink(missing_ok=True)  # a corrupt or hostile archive is not kept to look whole
                raise
        manifest[name] = entry
        write_json_atomic(dest / MANIFEST, manifest)  # after each file, so an interruption loses only one
    manifest_counts = verify_counts(dest)
    print("verified: " + ", ".join(f"{k} {v} images" for k, v in manifest_counts.items()))
    return manifest
