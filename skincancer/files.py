"""Atomic writes and checksums, so a crash never leaves a half-written file where a good one was."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dest`; on success rename it over `dest`, on error delete it."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        # mkstemp makes 0600, and a writer may replace the file with its own: the result reads like any file we make
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(dest: str | Path, text: str) -> Path:
    """Write `text` to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(dest)


def write_json_atomic(dest: str | Path, obj) -> Path:
    """Write `obj` as indented JSON to `dest` atomically."""
    return write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def model_files(model_path: str | Path) -> dict[str, Path]:
    """The files of one export, from any of them: NAME.pkl, .safetensors, .json (card), .split.csv, .onnx, ..."""
    p = Path(model_path)
    if p.name.endswith((".split.csv", ".report.txt", ".int8.onnx", ".check.safetensors")):
        p = p.with_suffix("")
    return {"model": p.with_suffix(".pkl"), "weights": p.with_suffix(".safetensors"), "card": p.with_suffix(".json"),
            "check": p.with_suffix(".check.safetensors"),
            "split": p.with_suffix(".split.csv"), "report": p.with_suffix(".report.txt"),
            "onnx": p.with_suffix(".onnx"), "int8": p.with_suffix(".int8.onnx")}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def project_path(path: str | Path, start: str | Path | None = None) -> Path:
    """`path`, a relative one resolved against the project's checkout (the nearest folder up from `start`, by default
    the working folder, that holds pyproject.toml), so a notebook finds data/ and models/ from any working folder."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    here = Path(start or Path.cwd()).resolve()
    root = next((d for d in (here, *here.parents) if (d / "pyproject.toml").is_file()), here)
    return root / path
