"""Synthetic labelled shape images for the offline demo, the tests and the benchmarks (no downloads).

Each picture is one filled shape (circle, square, star ...) of random size, position, rotation and
colour on a plain, gradient or lightly noisy background. Colours are drawn independently of the class
so that a model has to look at the outline, not the palette; the only colour rule is a minimum
lightness difference between shape and background, so the shape stays visible in grey ("L") too.

Everything is a pure function of the seed: the j-th picture of class c is drawn from its own
generator seeded with ``(seed, c, j)``, so ``make_shapes`` output is byte-identical run to run, does
not depend on ``per_class`` (a smaller set is a prefix of a larger one) and ``make_image_array``
draws the same pictures as ``make_shapes`` for the same seed, size and mode.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from embedsearch.errors import InvalidArgumentError

#: The classes, in label order (``make_image_array`` labels index into this).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "arrow")

_MODES = ("L", "RGB")
_MIN_SIZE, _MAX_SIZE = 8, 1024
#: Shapes are drawn this many times larger and box-filtered down: cheap anti-aliasing.
_SUPERSAMPLE = 4
#: Minimum |luma(shape) - luma(background)|, so grey versions keep the shape visible.
_MIN_CONTRAST = 70
_BACKGROUNDS = ("plain", "plain", "gradient", "noise")  # half plain, a quarter each of the others


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    # math.cos/sin rather than numpy's vectorised ones: scalar libm results do not depend on which
    # SIMD code path numpy picks, which keeps the output bytes stable.
    c, s = math.cos(angle), math.sin(angle)
    return points @ np.array([[c, s], [-s, c]])


def _regular(n: int, radii: list[float], start: float) -> np.ndarray:
    """Vertices of a star-like polygon: n points cycling through ``radii``, in the unit circle."""
    angles = [start + 2 * math.pi * k / n for k in range(n)]
    return np.array(
        [(radii[k % len(radii)] * math.cos(a), radii[k % len(radii)] * math.sin(a)) for k, a in enumerate(angles)]
    )


def _cross(rng: np.random.Generator) -> np.ndarray:
    w = rng.uniform(0.26, 0.38)  # half-width of an arm
    pts = np.array(
        [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
    )
    return pts / math.hypot(1.0, w)  # the arm corners touch the unit circle


def _arrow(rng: np.random.Generator) -> np.ndarray:
    h = rng.uniform(0.16, 0.26)  # half-thickness of the shaft
    pts = np.array([(1, 0), (0.05, 0.62), (0.05, h), (-1, h), (-1, -h), (0.05, -h), (0.05, -0.62)])
    return pts / math.hypot(1.0, 0.62)


def _polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """Unit-circle outline of a polygonal class (unrotated)."""
    if shape == "square":
        return _regular(4, [1.0], math.pi / 4)
    if shape == "triangle":
        return _regular(3, [1.0], math.pi / 2)
    if shape == "star":
        return _regular(10, [1.0, rng.uniform(0.38, 0.5)], math.pi / 2)
    if shape == "cross":
        return _cross(rng)
    return _arrow(rng)


def _draw_round(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float, rng: np.random.Generator
) -> None:
    """Circle, ring and crescent: a disc, minus a smaller disc for the last two."""
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    if shape == "ring":
        k = r * rng.uniform(0.5, 0.65)
        draw.ellipse((cx - k, cy - k, cx + k, cy + k), fill=0)
    elif shape == "crescent":
        k, d = r * rng.uniform(0.8, 0.9), r * rng.uniform(0.42, 0.58)
        ox, oy = cx + d * math.cos(angle), cy + d * math.sin(angle)
        draw.ellipse((ox - k, oy - k, ox + k, oy + k), fill=0)


def _mask(shape: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """Anti-aliased coverage (uint8, 255 = shape) of one randomly placed shape."""
    big = size * _SUPERSAMPLE
    r = rng.uniform(0.22, 0.42) * big
    margin = r + _SUPERSAMPLE
    cx, cy = rng.uniform(margin, big - margin, size=2)
    angle = rng.uniform(0.0, 2 * math.pi)
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    if shape in ("circle", "ring", "crescent"):
        _draw_round(draw, shape, cx, cy, r, angle, rng)
    else:
        pts = _rotate(_polygon(shape, rng), angle) * r + (cx, cy)
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255)
    return np.asarray(img.reduce(_SUPERSAMPLE))


def _luma(rgb: np.ndarray) -> float:
    r, g, b = rgb.tolist()  # plain floats: numpy overhead dominates on three numbers
    return 0.299 * r + 0.587 * g + 0.114 * b


def _contrasting(rng: np.random.Generator, against: list[np.ndarray]) -> np.ndarray:
    """A random colour at least ``_MIN_CONTRAST`` lighter or darker than every colour in ``against``."""
    lumas = [_luma(c) for c in against]
    for _ in range(100):
        colour = rng.integers(0, 256, size=3)
        if all(abs(_luma(colour) - y) >= _MIN_CONTRAST for y in lumas):
            return colour
    # Unreachable in practice (backgrounds span < 130 luma levels); black or white always works then.
    dark = _luma(against[0]) > 127
    return np.zeros(3, np.int64) if dark else np.full(3, 255, np.int64)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(size, size, 3) int64 background and the colours the shape colour must contrast with."""
    base = rng.integers(0, 256, size=3)
    kind = _BACKGROUNDS[int(rng.integers(len(_BACKGROUNDS)))]
    if kind == "plain":
        return np.broadcast_to(base, (size, size, 3)).copy(), [base]
    if kind == "gradient":
        other = np.clip(base + rng.integers(-60, 61, size=3), 0, 255)
        direction = rng.normal(size=2)
        direction /= np.sqrt(direction @ direction) + 1e-12
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        t = xs * direction[0] + ys * direction[1]
        t = (t - t.min()) / (np.ptp(t) + 1e-12)
        bg = np.rint(base + t[..., None] * (other - base)).astype(np.int64)
        return bg, [base, other]
    noise = np.rint(rng.normal(0.0, rng.uniform(3.0, 9.0), size=(size, size, 3))).astype(np.int64)
    return np.clip(base + noise, 0, 255), [np.clip(base - 20, 0, 255), np.clip(base + 20, 0, 255)]


def _check(size: int, mode: str) -> None:
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise InvalidArgumentError(f"image size must be between {_MIN_SIZE} and {_MAX_SIZE}, not {size}")
    if mode not in _MODES:
        raise InvalidArgumentError(f"mode must be one of {', '.join(_MODES)}, not {mode!r}")


def shape_image(shape: str, rng: np.random.Generator, size: int = 64, mode: str = "RGB") -> Image.Image:
    """One ``size`` x ``size`` picture of ``shape`` (one of ``SHAPES``), drawn from ``rng``."""
    if shape not in SHAPES:
        raise InvalidArgumentError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    _check(size, mode)
    bg, avoid = _background(rng, size)
    fg = _contrasting(rng, avoid)
    alpha = _mask(shape, rng, size).astype(np.int64)[..., None]
    # Integer blending (rounded) so the result is exact, not subject to float rounding quirks.
    rgb = (bg * (255 - alpha) + fg * alpha + 127) // 255
    img = Image.fromarray(rgb.astype(np.uint8), "RGB")
    return img.convert("L") if mode == "L" else img


def _image_rng(seed: int, label: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, label, index])


def _save_format(fmt: str) -> tuple[str, str]:
    """(file ending, Pillow format name) for a format given as an ending such as "png" or ".jpg"."""
    ext = fmt.lower().lstrip(".")
    name = Image.registered_extensions().get("." + ext)
    if not ext or name is None or name not in Image.SAVE:
        raise InvalidArgumentError(f"cannot write images as {fmt!r}; use e.g. png, jpg, bmp or webp")
    return ext, name


def make_shapes(
    out_dir: str | Path, per_class: int = 40, size: int = 64, seed: int = 0, fmt: str = "png", mode: str = "RGB"
) -> list[Path]:
    """Write ``out_dir/<shape>/<shape>-<i:04d>.<fmt>`` for every class; return the paths, sorted."""
    if per_class < 1:
        raise InvalidArgumentError(f"per_class must be at least 1, not {per_class}")
    if seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, not {seed}")
    _check(size, mode)
    ext, format_name = _save_format(fmt)
    # Lossy formats at high quality so the set stays close to the drawn pixels.
    options: dict[str, object] = {"quality": 95} if format_name in ("JPEG", "WEBP") else {}
    paths = []
    for label, shape in enumerate(SHAPES):
        folder = Path(out_dir) / shape
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{shape}-{i:04d}.{ext}"
            shape_image(shape, _image_rng(seed, label, i), size, mode).save(path, format_name, **options)
            paths.append(path)
    return sorted(paths)


def make_image_array(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shape pictures as a (n, size, size, channels) uint8 array, and their int64 class labels.

    Classes are balanced (counts differ by at most one) and shuffled; labels index into ``SHAPES``.
    """
    if n < 0:
        raise InvalidArgumentError(f"n must not be negative, not {n}")
    if channels not in (1, 3):
        raise InvalidArgumentError(f"channels must be 1 or 3, not {channels}")
    if seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, not {seed}")
    mode = "L" if channels == 1 else "RGB"
    _check(size, mode)
    labels = np.random.default_rng(seed).permutation(np.arange(n, dtype=np.int64) % len(SHAPES))
    images = np.empty((n, size, size, channels), dtype=np.uint8)
    seen = [0] * len(SHAPES)
    for k, label in enumerate(labels.tolist()):
        img = shape_image(SHAPES[label], _image_rng(seed, label, seen[label]), size, mode)
        images[k] = np.asarray(img).reshape(size, size, channels)
        seen[label] += 1
    return images, labels
