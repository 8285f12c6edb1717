from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedsearch.data.images import InputSpec, decode_bytes, infer_spec, scan
from embedsearch.errors import DataError, ImageError
from helpers import noise_image, png_bytes

GREY28 = InputSpec(28, 1)
RGB16 = InputSpec(16, 3)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header that declares a huge image (a decompression bomb) over a tiny body."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"hello, I am a text file\n", "not an image"),
        (bomb_png(100_000, 100_000), "decompression bomb"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageError, match=reason) as info:
        decode_bytes(data, GREY28, "bad.png")
    assert info.value.path == "bad.png"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(fmt: str) -> None:
    data = png_bytes(noise_image(1, 64), fmt)
    with pytest.raises(ImageError, match="cannot decode|truncated|not an image"):
        decode_bytes(data[: len(data) // 2], RGB16, "cut")


def test_pixel_limit_is_configurable() -> None:
    data = png_bytes(noise_image(2, 64))
    with pytest.raises(ImageError, match="more than 1000 pixels"):
        decode_bytes(data, RGB16, "big.png", max_pixels=1000)


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("PNG", "RGB"),
        ("JPEG", "RGB"),
        ("WEBP", "RGB"),
        ("BMP", "RGB"),
        ("TIFF", "RGB"),
        ("GIF", "P"),
        ("PNG", "L"),
        ("PNG", "RGBA"),
    ],
)
def test_every_supported_format_decodes(fmt: str, mode: str) -> None:
    im = noise_image(3, 20, "RGBA" if mode == "RGBA" else "RGB")
    im = im.convert(mode) if mode != "RGBA" else im
    meta, arr = decode_bytes(png_bytes(im, fmt), RGB16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8
    assert (meta.width, meta.height) == (20, 20)
    assert meta.format == ("TIFF" if fmt == "TIFF" else fmt)


def test_sha256_identifies_the_bytes() -> None:
    data = png_bytes(noise_image(4))
    import hashlib

    assert decode_bytes(data, RGB16)[0].sha256 == hashlib.sha256(data).hexdigest()


def test_transparency_is_composited_on_white() -> None:
    im = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    _, arr = decode_bytes(png_bytes(im), RGB16)
    assert (arr == 255).all()


def test_exif_orientation_is_applied() -> None:
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    _, arr = decode_bytes(png_bytes(im, "JPEG", exif=exif, quality=95), InputSpec(20, 1))
    # Displayed upright the image is 10 wide and 20 tall: white on top, padded left and right with white.
    assert arr[2, 10, 0] > 200 and arr[17, 10, 0] < 60


def test_gif_takes_the_first_frame() -> None:
    frames = [Image.new("L", (16, 16), 0), Image.new("L", (16, 16), 255)]
    data = png_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:])
    _, arr = decode_bytes(data, InputSpec(16, 1))
    assert arr.max() < 10


def test_resize_policy_keeps_aspect_and_pads_with_white() -> None:
    im = Image.new("L", (40, 10), 0)  # wide black bar
    _, arr = decode_bytes(png_bytes(im), InputSpec(8, 1))
    assert arr.shape == (8, 8, 1)
    assert (arr[0] == 255).all() and (arr[-1] == 255).all()  # padding rows
    assert (arr[4] < 30).all()  # the bar spans the full width


def test_extreme_aspect_ratio_is_cheap_and_valid() -> None:
    _, arr = decode_bytes(png_bytes(Image.new("RGB", (20000, 10), (0, 0, 0))), InputSpec(28, 3))
    assert arr.shape == (28, 28, 3)


@pytest.mark.parametrize("mode", ["I;16", "CMYK", "P", "LA", "1", "F"])
def test_unusual_modes_convert(mode: str) -> None:
    base = noise_image(5, 12, "L")
    if mode == "I;16":
        im = Image.fromarray(np.asarray(base, np.uint16) * 257)
        fmt = "PNG"
    elif mode == "F":
        im, fmt = base.convert("F"), "TIFF"
    else:
        im = base.convert(mode)
        fmt = "JPEG" if mode == "CMYK" else "PNG"
    _, arr = decode_bytes(png_bytes(im, fmt), InputSpec(12, 1))
    assert arr.shape == (12, 12, 1)
    if mode == "I;16":  # 16-bit values are scaled, not clipped to white
        assert abs(arr[..., 0].astype(int) - np.asarray(base, int)).max() <= 1


def test_scan_labels_skips_hidden_and_survives_symlink_loops(tmp_path: Path) -> None:
    (tmp_path / "cats" / "deep").mkdir(parents=True)
    (tmp_path / ".cache").mkdir()
    for p in ["cats/a.png", "cats/deep/b.PNG", "top.jpg", ".cache/c.png", "notes.txt"]:
        (tmp_path / p).write_bytes(b"x")
    os.symlink(tmp_path, tmp_path / "cats" / "loop")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.png")
    found = {Path(f.path).relative_to(tmp_path).as_posix(): f for f in scan(tmp_path)}
    assert set(found) == {"cats/a.png", "cats/deep/b.PNG", "top.jpg", "dangling.png"}
    assert found["cats/deep/b.PNG"].label == "cats" and found["top.jpg"].label is None
    assert found["dangling.png"].size == -1


def test_scan_of_a_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        list(scan(tmp_path / "nope"))


def test_infer_spec_takes_most_common_size_capped_and_grey_only_if_all_grey(tmp_path: Path) -> None:
    paths = []
    for i, (size, mode) in enumerate([(28, "L"), (28, "L"), (100, "L")]):
        path = tmp_path / f"{i}.png"
        path.write_bytes(png_bytes(noise_image(i, size, mode)))
        paths.append(str(path))
    assert infer_spec(paths) == InputSpec(28, 1)
    big = tmp_path / "big.png"
    big.write_bytes(png_bytes(noise_image(9, 100, "RGB")))
    assert infer_spec([str(big)]) == InputSpec(64, 3)
