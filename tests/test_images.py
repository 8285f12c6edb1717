from __future__ import annotations

import io
import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from embedsearch.data.images import InputSpec, decode_bytes, decode_bytes_for, header_pixels, infer_spec, scan, to_array
from embedsearch.encoders.classic import to_unit_float
from embedsearch.errors import DataError, ImageError, InvalidArgumentError
from helpers import noise_image, png_bytes

pytestmark = pytest.mark.no_store  # never opens a library

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


# -- bounded memory: what a decode materialises --------------------------------------------------


def photo(width: int, height: int, fmt: str = "JPEG", **save) -> bytes:
    """A smooth colour picture (a photo's worth of detail at a model's input size)."""
    return png_bytes(noise_image(7, 24).resize((width, height), Image.Resampling.BICUBIC), fmt, **save)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_large_jpeg_is_decoded_at_a_reduced_dct_scale_with_nearly_the_same_vector(
    pillow_decodes, orientation: int
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6 and 8: a quarter turn, displayed 3000 wide and 4000 tall
    data = photo(4000, 3000, progressive=True, quality=90, exif=exif)
    meta, arr = decode_bytes(data, InputSpec(28, 3))
    assert pillow_decodes == [("JPEG", (500, 375))]  # 1/8 scale: the longer side stays >= 3 x 28
    assert (meta.width, meta.height) == ((4000, 3000) if orientation == 1 else (3000, 4000))
    full = Image.open(io.BytesIO(data))
    full.load()  # every pixel, as before
    reference = to_array(ImageOps.exif_transpose(full), InputSpec(28, 3))
    assert (arr[14, 2] == 255).all() == (orientation != 1)  # turned upright: padded left and right
    diff = np.abs(arr.astype(int) - reference.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 20, (diff.mean(), diff.max())
    v, ref = to_unit_float(arr[None])[0], to_unit_float(reference[None])[0]
    assert np.linalg.norm(v - ref) / np.linalg.norm(ref) < 0.02


def test_draft_decoded_photos_retrieve_the_same_neighbours_as_fully_decoded_ones(pillow_decodes) -> None:
    """Tolerance: every query's 3 nearest neighbours (L2 on the 32x32 RGB pixels: the other shots of its
    scene) are the same set, and no vector moves by more than 2 % of its length. Beyond those, images of
    other scenes are near-ties that may swap (measured: 5-NN sets overlap 80 %)."""
    spec = InputSpec(32, 3)
    drafted, full = [], []
    for seed in range(24):  # 6 scenes x 4 noisy shots each, photo-sized, half of them portrait
        scene = noise_image(seed // 4, 6).resize(
            (1600, 1200) if seed // 4 % 2 else (1200, 1600), Image.Resampling.BICUBIC
        )
        shot = np.asarray(scene, np.float32) + np.random.default_rng(seed).normal(0, 12, (*scene.size[::-1], 3))
        data = png_bytes(Image.fromarray(np.clip(shot, 0, 255).astype(np.uint8)), "JPEG", quality=90)
        drafted.append(decode_bytes(data, spec)[1])
        whole = Image.open(io.BytesIO(data))
        whole.load()
        full.append(to_array(whole, spec))
    assert {size for _, size in pillow_decodes[::2]} == {(200, 150), (150, 200)}  # 1/8 DCT scale
    a, b = to_unit_float(np.stack(drafted)), to_unit_float(np.stack(full))  # (24, 3072) each
    assert (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max() < 0.02

    def neighbours(x: np.ndarray, k: int) -> list[set[int]]:
        d = ((x[:, None] - x[None]) ** 2).sum(-1)
        return [set(row) for row in np.argsort(d, axis=1, kind="stable")[:, 1 : k + 1].tolist()]

    assert (
        neighbours(a, 3) == neighbours(b, 3) == [{i for i in range(q - q % 4, q - q % 4 + 4)} - {q} for q in range(24)]
    )


def test_a_jpeg_for_a_grey_model_is_decoded_as_luma_and_small(pillow_decodes) -> None:
    data = photo(3000, 3000, quality=90)
    _, arr = decode_bytes(data, InputSpec(32, 1))
    full = Image.open(io.BytesIO(data))
    full.load()
    assert pillow_decodes[0] == ("JPEG", (375, 375))
    assert np.abs(arr.astype(int) - to_array(full, InputSpec(32, 1)).astype(int)).mean() < 1.5


def test_a_small_jpeg_is_decoded_exactly_as_before(pillow_decodes) -> None:
    data = photo(120, 90, quality=90)
    _, arr = decode_bytes(data, InputSpec(28, 1))
    assert pillow_decodes == [("JPEG", (120, 90))]  # too small to scale: not drafted, not turned to luma early
    full = Image.open(io.BytesIO(data))
    full.load()
    assert (arr == to_array(full, InputSpec(28, 1))).all()


def test_a_sixteen_bit_png_is_shrunk_before_it_is_converted() -> None:
    """The 16-bit -> 8-bit scaling ran on a float64 array of the whole image (8 bytes a pixel)."""
    ramp = np.tile(np.linspace(0, 65535, 2000).astype(np.uint16), (2000, 1))  # 2000x2000, 8 MB as uint16
    data = png_bytes(Image.fromarray(ramp))
    tracemalloc.start()
    try:
        meta, arr = decode_bytes(data, InputSpec(28, 1))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert meta.mode == "I;16" and peak < 2_000_000, peak  # the old conversion: 32 MB and more
    expected = (np.arange(28) + 0.5) / 28 * 255  # the ramp at the pixel centres
    assert np.abs(arr[14, :, 0] - expected).max() <= 3


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "1", "RGBA", "LA", "I;16", "F"])
def test_shrinking_first_gives_the_pixels_of_a_full_size_resize(mode: str) -> None:
    """The shrink (reduce in bands, then Lanczos) equals Pillow's resize of the whole converted image."""
    base = noise_image(8, 30).resize((900, 600), Image.Resampling.BICUBIC)
    if mode == "I;16":
        im, grey = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257), base.convert("L")
    elif mode in ("RGBA", "LA"):
        im = base.copy()
        im.putalpha(255)
        im, grey = im.convert(mode), base.convert("L")
    else:
        im = base.convert(mode)
        grey = im.convert("L")
    fmt = "TIFF" if mode == "F" else "PNG"
    _, arr = decode_bytes(png_bytes(im, fmt), InputSpec(64, 1))
    reference = np.asarray(grey.resize((64, 43), Image.Resampling.LANCZOS, reducing_gap=3.0))
    assert np.abs(arr[10:53, :, 0].astype(int) - reference.astype(int)).max() <= 2


def test_one_decode_serves_every_input_spec(pillow_decodes) -> None:
    data = photo(1200, 600, "PNG")
    specs = [InputSpec(28, 1), InputSpec(64, 3), InputSpec(16, 3), InputSpec(16, 3, "crop")]
    assert len(set(specs)) == 4  # the same size and channels with another fit is another input
    meta, arrays = decode_bytes_for(data, specs, "x.png")
    assert len(pillow_decodes) == 1 and [a.shape for a in arrays] == [s.shape for s in specs]
    assert not (arrays[2] == arrays[3]).all()
    for spec, arr in zip(specs, arrays, strict=True):
        assert (arr == decode_bytes(data, spec)[1]).all()


def test_header_pixels_reads_the_header_only(pillow_decodes) -> None:
    assert header_pixels(bomb_png(100_000, 100_000)) == 10**10
    assert header_pixels(photo(300, 200)) == 60_000
    assert header_pixels(b"not an image") == 0 and pillow_decodes == []


def _bands(width: int, height: int) -> bytes:
    """Three equal bands along the longer side: red, green, blue (the centre is green)."""
    arr = np.zeros((height, width, 3), np.uint8)
    if width >= height:
        for i in range(3):
            arr[:, i * width // 3 : (i + 1) * width // 3, i] = 255
    else:
        for i in range(3):
            arr[i * height // 3 : (i + 1) * height // 3, :, i] = 255
    return png_bytes(Image.fromarray(arr))


@pytest.mark.parametrize("width, height", [(300, 100), (100, 300), (2400, 800)])
def test_crop_keeps_the_centre_of_a_wide_or_tall_picture_and_pad_keeps_it_all(width: int, height: int) -> None:
    data = _bands(width, height)
    _, crop = decode_bytes(data, InputSpec(12, 3, "crop"))
    assert (np.abs(crop[2:-2, 2:-2].astype(int) - [0, 255, 0]) <= 8).all()  # the green centre only (Lanczos ringing)
    _, pad = decode_bytes(data, InputSpec(12, 3, "pad"))
    assert (pad == 255).all(axis=-1).any()  # the white letterbox
    assert pad[..., 0].max() == 255 and pad[..., 2].max() == 255  # red and blue bands are in


def test_crop_takes_the_centre_of_the_upright_photo() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, shown tall: the bands run top to bottom once upright
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0], arr[:, 100:200, 1], arr[:, 200:, 2] = 255, 255, 255
    data = png_bytes(Image.fromarray(arr), "JPEG", quality=95, exif=exif)
    _, crop = decode_bytes(data, InputSpec(12, 3, "crop"))
    assert (np.abs(crop[2:-2, 2:-2].astype(int) - [0, 255, 0]) < 40).all()


def test_an_unknown_fit_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="unknown fit 'stretch'"):
        InputSpec(16, 3, "stretch")


@pytest.mark.parametrize("orientation", [1, 6])
def test_a_large_jpeg_is_cropped_from_a_reduced_dct_scale_like_from_its_full_decode(
    pillow_decodes, orientation: int
) -> None:
    """Crop scales by the shorter side, so the draft keeps that one >= 3 x the input: still 1/8 here."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = photo(4000, 3000, quality=90, exif=exif)
    _, arr = decode_bytes(data, InputSpec(28, 3, "crop"))
    assert pillow_decodes == [("JPEG", (500, 375))]  # 375 >= 3 x 28
    full = Image.open(io.BytesIO(data))
    full.load()
    upright = ImageOps.exif_transpose(full)
    side = min(upright.size)
    left, top = (upright.width - side) // 2, (upright.height - side) // 2
    reference = np.asarray(
        upright.crop((left, top, left + side, top + side)).resize((28, 28), Image.Resampling.LANCZOS)
    )
    diff = np.abs(arr.astype(int) - reference.astype(int))
    assert diff.mean() < 1.5 and diff.max() <= 20, (diff.mean(), diff.max())


def test_read_bytes_returns_the_whole_file_and_refuses_what_is_not_a_file(tmp_path: Path) -> None:
    from embedsearch.data.images import read_bytes

    for size in (0, 1, 4096, 3 << 20):
        path = tmp_path / f"{size}.bin"
        content = os.urandom(size)
        path.write_bytes(content)
        assert read_bytes(str(path)) == content
    with pytest.raises(ImageError, match="not a regular file"):
        read_bytes(str(tmp_path))
    with pytest.raises(ImageError, match="cannot read file"):
        read_bytes(str(tmp_path / "missing.png"))
