"""Photos as untrusted input: every colour mode, EXIF, bombs, truncated and fuzzed bytes, folders."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from skincancer import SkinCancerError
from skincancer.images import open_image
from skincancer.predict import load


def test_truncated_jpeg_is_a_clear_error(original_images):
    data = original_images[0].read_bytes()
    with pytest.raises(SkinCancerError, match="not a readable image"):
        open_image(data[: len(data) // 3])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_other_colour_modes_become_rgb(mode, original_images):
    img = Image.open(original_images[0]).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    out = open_image(buf.getvalue())
    assert out.mode == "RGB" and out.size == (600, 450)


def test_exif_orientation_is_applied(original_images):
    img = Image.open(original_images[0])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the upright image is 450 wide
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert open_image(buf.getvalue()).size == (450, 600)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_sixteen_bit_images_are_scaled_not_clipped(original_images):
    grey = np.asarray(Image.open(original_images[0]).convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray((grey * 257).astype("<u2"))
    assert sixteen.mode.startswith("I;16")
    out = np.asarray(open_image(_png(sixteen)))
    assert out.shape == (450, 600, 3)
    np.testing.assert_allclose(out[..., 0].astype(float), grey, atol=1)  # 255 would mean clipped to white


def test_palette_png_with_transparency_becomes_rgb(original_images):
    img = Image.open(original_images[0]).convert("P", palette=Image.Palette.ADAPTIVE)
    img.info["transparency"] = 0
    assert open_image(_png(img)).mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_on_white(mode):
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)  # black everywhere, its left half transparent
    rgba[:, 15:, 3] = 255
    img = Image.fromarray(rgba, "RGBA")
    img = img.convert("LA") if mode == "LA" else img.quantize() if mode == "P" else img
    if mode == "P":  # a palette whose transparent entry is the left half's colour
        img = Image.fromarray(np.where(rgba[..., 3] == 0, 1, 0).astype(np.uint8), "P")
        img.putpalette([0, 0, 0, 0, 0, 0])
        img.info["transparency"] = 1
    out = np.asarray(open_image(_png(img)))
    assert (out[:, :15] == 255).all() and (out[:, 15:] == 0).all()


@pytest.mark.parametrize("size", [(9000, 9000), (100000, 100000)])
def test_pixel_bombs_are_refused_from_the_header(size):
    with pytest.raises(SkinCancerError, match=r"over the limit|not a readable image"):
        open_image(_png_header_only(*size))


def test_empty_and_non_image_inputs(tmp_path):
    with pytest.raises(SkinCancerError, match="empty"):
        open_image(b"")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(SkinCancerError, match=r"zero.jpg: an empty file \(0 bytes\), not an image"):
        open_image(tmp_path / "zero.jpg")
    (tmp_path / "notes.jpg").write_text("a text file")
    with pytest.raises(SkinCancerError, match="notes.jpg: not a readable image"):
        open_image(tmp_path / "notes.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    with pytest.raises(SkinCancerError, match=r"empty: a folder with no images in it \(looked for .bmp, .jpeg"):
        open_image(tmp_path / "empty")
    with pytest.raises(SkinCancerError, match="expected a file path, bytes or a PIL image"):
        open_image(12345)


_SEEDS = {}


def _seeds(original_images):
    if not _SEEDS:
        small = Image.open(original_images[0]).resize((60, 45))
        jpeg = io.BytesIO()
        small.save(jpeg, format="JPEG")
        _SEEDS["jpeg"], _SEEDS["png"] = jpeg.getvalue(), _png(small)
    return _SEEDS


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_bytes_decode_or_raise_a_clear_error(data, original_images):
    seeds = _seeds(original_images)
    kind = data.draw(st.sampled_from(["random", "jpeg", "png"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2048))
    else:
        blob = bytearray(seeds[kind])
        for _ in range(data.draw(st.integers(1, 8))):
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] = data.draw(st.integers(0, 255))
        blob = bytes(blob[: data.draw(st.integers(1, len(blob)))])
    try:
        img = open_image(blob)
    except SkinCancerError as e:
        assert "not a readable image" in str(e) or "empty" in str(e) or "over the limit" in str(e)
    else:
        assert img.mode == "RGB" and img.size[0] > 0


def test_a_batch_of_hostile_inputs_still_predicts_the_good_images(trained, original_images):
    seeds = _seeds(original_images)
    hostile = [b"", b"\x00" * 100, seeds["jpeg"][:200], _png_header_only(100000, 100000), b"GIF89a" + b"\xff" * 50]
    inputs = [original_images[0], *hostile, original_images[1]]
    results = load(trained).predict_batch(inputs)
    assert ["error" in r for r in results] == [False, True, True, True, True, True, False]


def test_photos_too_small_or_flat_to_judge_are_refused_and_the_smallest_accepted_is_stated(original_images):
    from skincancer.images import MIN_SIDE, open_photo

    assert MIN_SIDE == 64
    for size in ((1, 1), (8, 8), (MIN_SIDE - 1, 200)):
        with pytest.raises(SkinCancerError, match=rf"{size[0]}x{size[1]} pixels is too small to judge; a photo needs "
                                                  rf"at least {MIN_SIDE} pixels on its shorter side"):
            open_photo(_png(Image.effect_noise(size, 64).convert("RGB")))
    assert open_photo(_png(Image.effect_noise((MIN_SIDE, MIN_SIDE), 64).convert("RGB"))).size == (64, 64)
    for colour in ("white", (120, 80, 60)):
        with pytest.raises(SkinCancerError, match="a single flat colour, with nothing in it to judge"):
            open_photo(_png(Image.new("RGB", (600, 450), colour)))
    small = Image.open(original_images[0]).resize((100, 75))  # the demo sample's size passes
    assert open_photo(_png(small)).size == (100, 75)
