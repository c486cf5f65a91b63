"""Photos as untrusted input: decoded, checked and made upright 8-bit RGB before any model sees them."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import SkinCancerError

ImageInput = Union[str, Path, bytes, Image.Image]
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
TRANSPARENT_BACKGROUND = (255, 255, 255, 255)  # what a photo's transparent pixels are shown to the model as
MIN_SIDE = 64  # pixels on the shorter side below which no lesion detail is left to judge (the sample's are 100x75)
MIN_CONTRAST = 2.0  # grey-level standard deviation (0-255) of one flat colour; HAM10000's faintest photo has 4.8
MAX_PIXELS = 64_000_000  # a dermoscopy photo is a few megapixels; far beyond this is a decompression bomb


def describe(src: Any) -> str:
    """A short name for an image input, for results and error messages."""
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<{type(src).__name__}>"


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """RGB from any PIL mode; 16-bit and float images are scaled, not clipped to white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).round().astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # transparent pixels keep whatever colour they stored (often black): composite them on white instead
        rgba = img.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, TRANSPARENT_BACKGROUND)
        flat.alpha_composite(rgba)
        img = flat
    return img.convert("RGB")


def open_image(src: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a path, bytes or PIL image into an upright RGB PIL image, or raise SkinCancerError naming it."""
    name = describe(src)
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        if image_files([src]) == [str(src)]:  # a folder with images is expanded before it gets here
            raise SkinCancerError(f"{name}: a folder with no images in it (looked for "
                                  f"{', '.join(sorted(IMAGE_SUFFIXES))} below it)")
        raise SkinCancerError(f"{name}: a folder, not an image file")
    if isinstance(src, (str, Path)) and not Path(src).is_file():
        raise SkinCancerError(f"{name}: no such file")
    if isinstance(src, (str, Path)) and Path(src).stat().st_size == 0:
        raise SkinCancerError(f"{name}: an empty file (0 bytes), not an image")
    if not isinstance(src, (str, Path, bytes, bytearray, Image.Image)):
        raise SkinCancerError(f"{name}: expected a file path, bytes or a PIL image")
    if isinstance(src, (bytes, bytearray)) and not src:
        raise SkinCancerError(f"{name}: empty (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = src if isinstance(src, Image.Image) else Image.open(
                io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray)) else src)
            width, height = img.size
            if width * height > max_pixels:  # checked on the header, before any pixel is decoded
                raise SkinCancerError(f"{name}: {width}x{height} pixels is over the limit of {max_pixels:,}")
            img.load()  # decode now, so a truncated file fails here and not inside a batch
            return _to_8bit_rgb(ImageOps.exif_transpose(img))
    except SkinCancerError:
        raise
    except Exception as e:  # untrusted bytes: whatever the decoder raises means "not a readable image"
        raise SkinCancerError(f"{name}: not a readable image ({type(e).__name__}: {e})") from None


def open_photo(src: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`open_image`, then refused if too small or too flat for a model to judge (SkinCancerError saying which)."""
    img, name = open_image(src, max_pixels), describe(src)
    if min(img.size) < MIN_SIDE:
        raise SkinCancerError(f"{name}: {img.width}x{img.height} pixels is too small to judge; a photo needs at least "
                              f"{MIN_SIDE} pixels on its shorter side")
    if float(np.asarray(img.convert("L"), dtype=np.float64).std()) < MIN_CONTRAST:
        raise SkinCancerError(f"{name}: a single flat colour, with nothing in it to judge")
    return img


def image_files(paths) -> list[str]:
    """`paths` with each folder replaced by the image files below it (by suffix, sorted); files stay as given."""
    out: list[str] = []
    for path in map(str, paths):
        found = sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)) \
            if Path(path).is_dir() else []
        out += found or [path]  # a folder without images stays, and its result says what it is
    return out
