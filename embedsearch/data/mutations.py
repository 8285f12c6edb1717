"""Seeded mutations of image files, for fuzzing the decoder (``tests/test_fuzz.py`` and
``benchmarks/fuzz.py`` drive the same code: hypothesis draws the ops in one, a seeded
``random.Random`` in the other).

Seeds are small valid PNG, JPEG, GIF, BMP, TIFF and WebP files made in code (several modes and
compressions each), plus one file of each other format Pillow opens whatever a file is called. A
case is one seed plus a short list of mutations: bit flips, byte writes, truncation, insertion,
deletion, repeats, a splice with another seed, an integer written into a header field, a PNG IHDR
field rewritten with mended CRCs, a TIFF tag rewritten, a JPEG frame-header field rewritten. Plain
functions of plain data; nothing here runs at import time.
"""

from __future__ import annotations

import io
import random
import re
import struct
import zlib
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from embedsearch.data.images import InputSpec

# Pillow warns about every odd TIFF tag and EXIF block it meets; here that is expected.

#: Specs decoded to: grey and colour, one odd size (padding on both axes).
SPECS = (InputSpec(8, 1), InputSpec(8, 3), InputSpec(13, 3))
#: Interesting integers for header fields (sizes, counts, offsets).
INTERESTING = (
    0,
    1,
    2,
    7,
    8,
    16,
    255,
    256,
    0x7F,
    0x80,
    0xFF,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    65500,
    100_000,
    1_000_000,
)
#: PNG IHDR fields: (offset in the file, width in bytes).
IHDR_FIELDS = {
    "width": (16, 4),
    "height": (20, 4),
    "depth": (24, 1),
    "colour": (25, 1),
    "compression": (26, 1),
    "filter": (27, 1),
    "interlace": (28, 1),
}
#: TIFF tags worth rewriting: size, bits, compression, photometric, samples, strips, orientation,
#: planar configuration, predictor, extra samples, sample format.
TIFF_TAGS = (256, 257, 258, 259, 262, 273, 274, 277, 278, 279, 284, 317, 338, 339)
#: Small values of those tags (codes of compressions, photometric interpretations, sample formats).
TIFF_VALUES = (
    0,
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    12,
    16,
    24,
    32,
    64,
    32773,
    32844,
    32845,
    34892,
    0xFFFF,
    100_000,
    0xFFFFFFFF,
)
#: JPEG start-of-frame fields: (offset after the marker, width in bytes): precision, height,
#: width, components, then id / sampling / table of the first three components.
SOF_FIELDS = (
    (4, 1),
    (5, 2),
    (7, 2),
    (9, 1),
    (10, 1),
    (11, 1),
    (12, 1),
    (13, 1),
    (14, 1),
    (15, 1),
    (16, 1),
    (17, 1),
    (18, 1),
)

Op = tuple[Any, ...]


def _save(im: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(seed: int, mode: str, size: tuple[int, int] = (12, 9)) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert(mode)


@cache
def seed_corpus() -> tuple[tuple[str, bytes], ...]:
    """Small valid files of every format the library is meant to read, in several modes."""
    frames = [_noise(i, "P") for i in range(3)]
    seeds = [
        ("png-L", _save(_noise(1, "L"), "PNG")),
        ("png-RGB", _save(_noise(2, "RGB"), "PNG")),
        ("png-RGBA", _save(_noise(3, "RGBA"), "PNG")),
        ("png-P-transparent", _save(_noise(4, "P"), "PNG", transparency=0)),
        ("png-1", _save(_noise(5, "1"), "PNG")),
        ("png-LA", _save(_noise(6, "LA"), "PNG")),
        ("png-I16", _save(Image.fromarray(np.arange(108, dtype=np.uint16).reshape(9, 12) * 600), "PNG")),
        ("jpeg-RGB", _save(_noise(7, "RGB"), "JPEG", quality=80)),
        ("jpeg-L", _save(_noise(8, "L"), "JPEG")),
        ("jpeg-CMYK", _save(_noise(9, "CMYK"), "JPEG")),
        ("jpeg-progressive", _save(_noise(10, "RGB", (20, 14)), "JPEG", progressive=True)),
        ("jpeg-exif-rotated", _save(_noise(11, "RGB"), "JPEG", exif=_orientation(6))),
        ("gif-P", _save(_noise(12, "P"), "GIF")),
        ("gif-animated", _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)),
        ("gif-transparent", _save(_noise(13, "P"), "GIF", transparency=3)),
        ("bmp-RGB", _save(_noise(14, "RGB"), "BMP")),
        ("bmp-P", _save(_noise(15, "P"), "BMP")),
        ("bmp-1", _save(_noise(16, "1"), "BMP")),
        ("bmp-RGBA", _save(_noise(17, "RGBA"), "BMP")),
        ("tiff-RGB", _save(_noise(18, "RGB"), "TIFF")),
        ("tiff-L-lzw", _save(_noise(19, "L"), "TIFF", compression="tiff_lzw")),
        ("tiff-RGB-deflate", _save(_noise(20, "RGB"), "TIFF", compression="tiff_adobe_deflate")),
        ("tiff-RGBA-packbits", _save(_noise(21, "RGBA"), "TIFF", compression="packbits")),
        ("tiff-CMYK", _save(_noise(22, "CMYK"), "TIFF")),
        ("tiff-F", _save(_noise(23, "L").convert("F"), "TIFF")),
        ("tiff-I16", _save(Image.fromarray(np.arange(108, dtype=np.uint16).reshape(9, 12) * 600), "TIFF")),
        (
            "tiff-multipage",
            _save(
                frames[0].convert("RGB"), "TIFF", save_all=True, append_images=[f.convert("RGB") for f in frames[1:]]
            ),
        ),
        ("webp-lossy", _save(_noise(24, "RGB"), "WEBP", quality=60)),
        ("webp-lossless-RGBA", _save(_noise(25, "RGBA"), "WEBP", lossless=True)),
        (
            "webp-animated",
            _save(
                frames[0].convert("RGB"),
                "WEBP",
                save_all=True,
                append_images=[f.convert("RGB") for f in frames[1:]],
                duration=50,
            ),
        ),
    ]
    # The scan picks files by name and Pillow by content: a .png may hold any format Pillow opens.
    for fmt, mode in [
        ("ICO", "RGBA"),
        ("DDS", "RGBA"),
        ("JPEG2000", "RGB"),
        ("PCX", "RGB"),
        ("PPM", "RGB"),
        ("SGI", "RGB"),
        ("TGA", "RGBA"),
        ("QOI", "RGB"),
        ("BLP", "P"),
        ("XBM", "1"),
        ("MSP", "1"),
        ("AVIF", "RGB"),
    ]:
        try:
            seeds.append((f"other-{fmt}", _save(_noise(30 + len(seeds), mode), fmt)))
        except (KeyError, OSError):  # a Pillow built without this writer
            continue
    return tuple(seeds)


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# -- mutations: plain functions of plain data (hypothesis draws the ops; the benchmark a Random) ----


def fix_png_crcs(data: bytes) -> bytes:
    """Recompute the CRC of every well-framed chunk of a PNG, so mutations get past the checksums."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, pos = bytearray(data), 8
    while pos + 12 <= len(out):
        length = int.from_bytes(out[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(out):
            break
        out[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(out[pos + 4 : end])))
        pos = end + 4
    return bytes(out)


def apply_op(data: bytes, op: Op, seeds: Sequence[bytes]) -> bytes:
    """One mutation. Positions are taken modulo the length, so every op fits every input."""
    kind, n = op[0], max(len(data), 1)
    if kind == "flip":
        _, pos, bit = op
        if not data:
            return data
        buf = bytearray(data)
        buf[pos % n] ^= 1 << bit
        return bytes(buf)
    if kind == "byte":
        _, pos, value = op
        if not data:
            return data
        buf = bytearray(data)
        buf[pos % n] = value
        return bytes(buf)
    if kind == "truncate":
        return data[: op[1] % n]
    if kind == "insert":
        _, pos, blob = op
        return data[: pos % n] + blob + data[pos % n :]
    if kind == "delete":
        _, pos, length = op
        return data[: pos % n] + data[pos % n + length :]
    if kind == "repeat":  # duplicate a run of bytes (a chunk or a marker segment, with luck)
        _, pos, length, times = op
        piece = data[pos % n : pos % n + length]
        return data[: pos % n] + piece * times + data[pos % n :]
    if kind == "splice":  # our head, another seed's tail
        _, other, cut, cut_other = op
        donor = seeds[other % len(seeds)]
        return data[: cut % n] + donor[cut_other % max(len(donor), 1) :]
    if kind == "field":  # an interesting integer written into the first 64 bytes (header fields)
        _, pos, width, big, value = op
        pos = pos % min(n, 64)
        raw = (value % (1 << (8 * width))).to_bytes(width, "big" if big else "little")
        return data[:pos] + raw + data[pos + width :]
    if kind == "ihdr":  # a PNG header field with the checksums mended
        _, name, value = op
        offset, width = IHDR_FIELDS[name]
        if not data.startswith(b"\x89PNG\r\n\x1a\n") or len(data) < offset + width:
            return data
        raw = (value % (1 << (8 * width))).to_bytes(width, "big")
        return fix_png_crcs(data[:offset] + raw + data[offset + width :])
    if kind == "fixcrc":
        return fix_png_crcs(data)
    if kind == "tifftag":
        return _set_tiff_tag(data, op[1], op[2])
    if kind == "sof":  # a JPEG frame header field (size, precision, components, sampling)
        _, field, value = op
        at = next((m.start() for m in re.finditer(b"\xff[\xc0-\xc2]", data)), None)
        offset, width = SOF_FIELDS[field % len(SOF_FIELDS)]
        if at is None or at + offset + width > len(data):
            return data
        raw = (value % (1 << (8 * width))).to_bytes(width, "big")
        return data[: at + offset] + raw + data[at + offset + width :]
    raise ValueError(f"unknown mutation {op!r}")


def _set_tiff_tag(data: bytes, tag: int, value: int) -> bytes:
    """Rewrite one tag of the first IFD of a little-endian TIFF (or turn the last entry into it)."""
    if not data.startswith(b"II*\x00") or len(data) < 8:
        return data
    buf = bytearray(data)
    ifd = int.from_bytes(buf[4:8], "little")
    if ifd + 2 > len(buf):
        return data
    count = int.from_bytes(buf[ifd : ifd + 2], "little")
    entries = [ifd + 2 + 12 * i for i in range(count) if ifd + 14 + 12 * i <= len(buf)]
    if not entries:
        return data
    at = next((e for e in entries if int.from_bytes(buf[e : e + 2], "little") == tag), None)
    if at is None:
        at = entries[-1]
        buf[at : at + 8] = struct.pack("<HHI", tag, 4 if value > 0xFFFF else 3, 1)
    kind, n = struct.unpack("<HI", bytes(buf[at + 2 : at + 8]))
    size = 4 if kind == 4 else 2
    raw = (value % (1 << (8 * size))).to_bytes(size, "little")
    if n * size <= 4:  # the values are in the entry itself
        for i in range(n):
            buf[at + 8 + size * i : at + 8 + size * (i + 1)] = raw
    else:
        where = int.from_bytes(buf[at + 8 : at + 12], "little")
        for i in range(min(n, 16)):
            if where + size * (i + 1) <= len(buf):
                buf[where + size * i : where + size * (i + 1)] = raw
    return bytes(buf)


def family(name: str) -> tuple[bytes, ...]:
    """The seeds of one family: "main" (PNG, JPEG, GIF, BMP, TIFF, WebP) or "other" (the rest)."""
    return tuple(d for n, d in seed_corpus() if n.startswith("other-") == (name == "other"))


def mutate(seeds: Sequence[bytes], index: int, ops: Sequence[Op]) -> bytes:
    """Seed ``index`` of ``seeds`` after ``ops`` (splices take their donors from ``seeds`` too)."""
    data = seeds[index % len(seeds)]
    for op in ops:
        data = apply_op(data, op, seeds)
    return data


def random_op(rng: random.Random) -> Op:
    """The benchmark's draw of one op (the same kinds and ranges as the hypothesis strategy)."""
    kind = rng.choice(
        [
            "flip",
            "flip",
            "byte",
            "truncate",
            "insert",
            "delete",
            "repeat",
            "splice",
            "field",
            "field",
            "ihdr",
            "fixcrc",
            "tifftag",
            "tifftag",
            "sof",
        ]
    )
    pos = rng.randrange(1 << 16) if rng.random() < 0.5 else rng.randrange(96)  # header bytes more often
    if kind == "flip":
        return (kind, pos, rng.randrange(8))
    if kind == "byte":
        return (kind, pos, rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)]))
    if kind == "truncate":
        return (kind, pos)
    if kind == "insert":
        return (kind, pos, rng.randbytes(rng.randrange(1, 33)))
    if kind == "delete":
        return (kind, pos, rng.randrange(1, 65))
    if kind == "repeat":
        return (kind, pos, rng.randrange(1, 65), rng.randrange(2, 5))
    if kind == "splice":
        return (kind, rng.randrange(64), pos, rng.randrange(1 << 16))
    if kind == "field":
        return (
            kind,
            rng.randrange(64),
            rng.choice([1, 2, 4]),
            rng.random() < 0.5,
            rng.choice(INTERESTING) if rng.random() < 0.8 else rng.randrange(1 << 32),
        )
    if kind == "ihdr":
        return (kind, rng.choice(sorted(IHDR_FIELDS)), rng.choice(INTERESTING + (3, 4, 6, 10, 12)))
    if kind == "tifftag":
        return (kind, rng.choice(TIFF_TAGS), rng.choice(TIFF_VALUES) if rng.random() < 0.8 else rng.randrange(1 << 16))
    if kind == "sof":
        value = rng.choice(INTERESTING) if rng.random() < 0.5 else rng.randrange(256)
        return (kind, rng.randrange(len(SOF_FIELDS)), value)
    return (kind,)


def random_case(rng: random.Random, n_seeds: int) -> tuple[int, list[Op]]:
    return rng.randrange(n_seeds), [random_op(rng) for _ in range(rng.randint(1, 4))]
