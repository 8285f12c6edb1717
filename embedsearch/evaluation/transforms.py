"""Seeded near-duplicate transforms: the edits a re-uploaded copy of a picture gets, one at a time and mixed.

:data:`TRANSFORMS` maps a name to ``fn(images, seed)``: (N, S, S, C) uint8 in, the same shape and
dtype out, C = 1 (grey) or 3 (RGB), any side S. Image i is altered with its own generator seeded
``(seed, i)``, so an image's copy does not depend on the others in the batch, and every draw is a
fraction of the side, so the same seed alters a picture alike at any size. Each strength is drawn
from a range that excludes a no-op, so every copy differs from its original.

``mixed`` is the compare run's historical near-duplicate (crop + brightness + noise + JPEG, the
definition of ``neardup_recall@k``); its code and draws are kept byte for byte.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFilter

from embedsearch.data.images import to_pil

Transform = Callable[[np.ndarray, int], np.ndarray]
Alter = Callable[[np.ndarray, np.random.Generator], np.ndarray]

#: mixed: crop side fraction, brightness factor, noise sigma (of [0, 1]), JPEG quality.
CROP = (0.85, 0.95)
BRIGHTNESS = (0.8, 1.2)
NOISE_SIGMA = 0.03
JPEG_QUALITY = 60

#: The single transforms' ranges (README "Robustness transforms" defines each one).
SHIFT = (0.04, 0.08)  # translation length, fraction of the side, in a random direction
ROTATION = (5.0, 15.0)  # degrees, either sign
BLUR = (0.02, 0.04)  # Gaussian standard deviation, fraction of the side
NOISE = (0.03, 0.06)  # Gaussian noise standard deviation, of the [0, 1] range
JPEG = (30, 60)  # JPEG quality, both ends included
GAIN = (0.1, 0.25)  # brightness: pixel values times 1 + g or 1 - g


# -- helpers ------------------------------------------------------------------------------------------


def _crop_box(side: int, frac: float, ux: float, uy: float) -> tuple[int, int, int, int]:
    """The square of ``frac`` of the side at relative position (ux, uy) of the free room."""
    crop = max(1, round(frac * side))
    x0, y0 = round(ux * (side - crop)), round(uy * (side - crop))
    return x0, y0, x0 + crop, y0 + crop


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """The image through a JPEG encode and decode at ``quality``, back in its own mode."""
    pic = to_pil(image)
    buf = io.BytesIO()
    pic.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as back:
        return np.asarray(back.convert(pic.mode), dtype=np.uint8).reshape(image.shape)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _background(image: np.ndarray) -> tuple[int, ...]:
    """Per-channel median of the outermost ring of pixels: what a shift or rotation uncovers.

    The ring, not a fixed white or black, so that dark-background digits and white-background
    product shots are both padded with their own background.
    """
    ring = np.concatenate([image[0], image[-1], image[1:-1, 0], image[1:-1, -1]])  # (4S - 4, C)
    return tuple(int(v) for v in np.median(ring, axis=0).round())


def _pil_fill(image: np.ndarray) -> int | tuple[int, ...]:
    fill = _background(image)
    return fill[0] if image.shape[2] == 1 else fill


def _each(alter: Alter) -> Transform:
    """A batch transform applying ``alter`` to image i with the generator seeded (seed, i)."""

    def transform(images: np.ndarray, seed: int) -> np.ndarray:
        out = np.empty_like(images)
        for i, image in enumerate(images):
            out[i] = alter(image, np.random.default_rng([seed, i]))
        return out

    transform.__doc__ = alter.__doc__
    return transform


# -- one image ------------------------------------------------------------------------------------------


def _alter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mixed: crop+resize, brightness, noise, JPEG (compare's near-duplicate since the start)."""
    side = image.shape[0]
    frac, ux, uy, gain = rng.uniform(*CROP), rng.uniform(), rng.uniform(), rng.uniform(*BRIGHTNESS)
    pic = to_pil(image).crop(_crop_box(side, frac, ux, uy)).resize((side, side), Image.Resampling.BILINEAR)
    x = np.asarray(pic, dtype=np.float32).reshape(image.shape) * gain
    x += rng.normal(0.0, NOISE_SIGMA * 255.0, size=x.shape).astype(np.float32)
    return _jpeg(_to_uint8(x), JPEG_QUALITY)


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """crop: a square of 85-95% of the side at a random position, resized back (bilinear)."""
    side = image.shape[0]
    box = _crop_box(side, rng.uniform(*CROP), rng.uniform(), rng.uniform())
    pic = to_pil(image).crop(box).resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(pic, dtype=np.uint8).reshape(image.shape)


def _shift(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """shift: translated by 4-8% of the side in a random direction, uncovered pixels the background."""
    side = image.shape[0]
    length, angle = rng.uniform(*SHIFT) * side, rng.uniform(0.0, 2.0 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = round(length * c), round(length * s)
    if dx == dy == 0:  # a tiny side: one pixel along the larger component
        dx, dy = (1 if c >= 0 else -1, 0) if abs(c) >= abs(s) else (0, 1 if s >= 0 else -1)
    out = np.empty_like(image)
    out[:] = np.array(_background(image), dtype=np.uint8)
    dst = (slice(max(dy, 0), side + min(dy, 0)), slice(max(dx, 0), side + min(dx, 0)))
    src = (slice(max(-dy, 0), side + min(-dy, 0)), slice(max(-dx, 0), side + min(-dx, 0)))
    out[dst] = image[src]
    return out


def _rotation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """rotation: 5-15 degrees either way about the centre (bilinear), corners the background."""
    angle = rng.uniform(*ROTATION) * (1.0 if rng.uniform() < 0.5 else -1.0)
    pic = to_pil(image).rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=_pil_fill(image))
    return np.asarray(pic, dtype=np.uint8).reshape(image.shape)


def _blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """blur: Gaussian with a standard deviation of 2-4% of the side."""
    radius = rng.uniform(*BLUR) * image.shape[0]
    pic = to_pil(image).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(pic, dtype=np.uint8).reshape(image.shape)


def _noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """noise: additive Gaussian, standard deviation 3-6% of the value range, per pixel and channel."""
    sigma = rng.uniform(*NOISE) * 255.0
    return _to_uint8(image.astype(np.float32) + rng.normal(0.0, sigma, size=image.shape).astype(np.float32))


def _jpeg_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """jpeg: re-encoded as JPEG at a quality of 30-60."""
    return _jpeg(image, int(rng.integers(JPEG[0], JPEG[1] + 1)))


def _brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """brightness: every value times a gain of 0.75-0.9 or 1.1-1.25, clipped to 255."""
    g = rng.uniform(*GAIN)
    gain = 1.0 + g if rng.uniform() < 0.5 else 1.0 - g
    return _to_uint8(image.astype(np.float32) * np.float32(gain))


augment = _each(_alter)
augment.__doc__ = "Each (N, S, S, C) uint8 image altered once by ``mixed``; image i uses a generator seeded (seed, i)."

#: name -> seeded batch transform, in the order the robustness table shows them.
TRANSFORMS: dict[str, Transform] = {
    "crop": _each(_crop),
    "shift": _each(_shift),
    "rotation": _each(_rotation),
    "blur": _each(_blur),
    "noise": _each(_noise),
    "jpeg": _each(_jpeg_copy),
    "brightness": _each(_brightness),
    "mixed": augment,
}
