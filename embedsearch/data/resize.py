"""The resize policy, from a decoded image of any size and mode to a model's input, in bounded memory.

The policy is the model's (:data:`FITS`, fixed when it is made, used everywhere: index, query,
train). ``pad``: the image is scaled so that its longer side equals the model's ``image_size``
(Lanczos, aspect ratio kept), then centred on a white square canvas; nothing is cropped, so a wide
panorama stays a panorama. ``crop``: scaled so that its shorter side equals it, and the centred
square of the upright picture kept (photos: no letterbox to tell portraits from landscapes).
Transparency is composited on white first; grey models get Pillow's ITU-R 601-2 luma, colour models RGB.

Memory: a hostile upload can be a tiny file that decodes to tens of megapixels. A JPEG is decoded at a
reduced DCT scale (:func:`draft`); every other format is decoded at full size (Pillow cannot do
less, so the pixel limit from the header is its bound) and is then shrunk by whole blocks first,
converting a band of rows at a time, so that no further full-size copy is made (no 16-bit or float
array, no premultiplied or palette-expanded copy of the whole image).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

Box = tuple[float, float, float, float]

#: Modes of more than 8 bits per value: scaled to 8-bit L by their white point.
_WIDE_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
#: Modes whose values Image.reduce may average (not palette indices, not 1-bit, not 16-bit).
_REDUCIBLE = frozenset({"L", "LA", "La", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I", "F"})
#: Shrink by whole factors (reduce, JPEG DCT scaling) only while the longer side stays at least this many
#: times the model's input; the Lanczos step after it then sees what it would see in the full image
#: (Pillow's own reducing_gap).
REDUCING_GAP = 3
#: How many pixels of a full-size image are converted at a time when shrinking.
_BAND_PIXELS = 1 << 20
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
#: Where a point (x, y) of a w x h image lands under each transposition.
_CORNERS: dict[Image.Transpose, Callable[[float, float, int, int], tuple[float, float]]] = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda x, y, w, h: (w - x, y),
    Image.Transpose.ROTATE_180: lambda x, y, w, h: (w - x, h - y),
    Image.Transpose.FLIP_TOP_BOTTOM: lambda x, y, w, h: (x, h - y),
    Image.Transpose.TRANSPOSE: lambda x, y, w, h: (y, x),
    Image.Transpose.ROTATE_270: lambda x, y, w, h: (h - y, x),
    Image.Transpose.TRANSVERSE: lambda x, y, w, h: (h - y, w - x),
    Image.Transpose.ROTATE_90: lambda x, y, w, h: (y, w - x),
}
QUARTER_TURNS = frozenset({TRANSPOSE[5], TRANSPOSE[6], TRANSPOSE[7], TRANSPOSE[8]})


def draft_size(size: tuple[int, int], target: int, fit: str) -> int:
    """The longer side a ``size`` image is scaled to by ``fit``: pad scales the longer side to the target,
    crop the shorter one (so the longer side ends up larger)."""
    return target if fit == "pad" else -(-target * max(size) // max(1, min(size)))


def draft(im: Image.Image, size: int, grey: bool) -> bool:
    """JPEG: let libjpeg decode at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps the longer side
    at least REDUCING_GAP x the largest input, so a 16-megapixel photo never exists at full size.

    The longer side is what the resize policy scales by and a 90-degree EXIF turn keeps it the longer
    side, so drafting before the turn is right. Grey models take the luma straight from the decoder.
    No-op for other formats, and for JPEGs too small to scale (their pixels stay exactly as before).
    True if the image will be decoded smaller than its header says.
    """
    need = size * REDUCING_GAP
    longer = max(im.size)
    if im.format != "JPEG" or longer < 2 * need:
        return False
    im.draft("L" if grey else "RGB", (max(1, im.width * need // longer), max(1, im.height * need // longer)))
    return True


def white_point(im: Image.Image) -> float | None:
    """The value that maps to white in a 16-bit, 32-bit or float image (None for 8-bit modes).

    Taken from the full image's maximum (C, no copy) before any shrinking averages it away.
    """
    if im.mode not in _WIDE_MODES:
        return None
    top = float(im.getextrema()[1])  # type: ignore[arg-type]  # one band: (min, max)
    return 1.0 if im.mode == "F" and top <= 1.0 else 65535.0 if top > 255 else 255.0


def _reducible(im: Image.Image, channels: int) -> str | None:
    """The mode to convert to before averaging (None: as it is; "" : leave it to the final resize)."""
    if im.mode in _REDUCIBLE:
        return None
    if im.mode == "1":
        return "L"
    if im.mode in ("P", "PA"):  # palette indices cannot be averaged
        return "RGBA" if im.mode == "PA" or "transparency" in im.info else "L" if channels == 1 else "RGB"
    return "I" if im.mode.startswith("I;16") else ""  # reduce refuses 16-bit


def _fit(width: float, height: float, size: int, fit: str = "pad") -> tuple[int, int]:
    """The size an image of ``width`` x ``height`` is resized to: its longer side (pad) or its shorter
    side (crop) becomes ``size``."""
    scale = size / (max(width, height) if fit == "pad" else min(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def _shrink(im: Image.Image, size: int, channels: int, fit: str = "pad") -> tuple[Image.Image, Box]:
    """Average whole blocks down (Image.reduce) while each side stays >= REDUCING_GAP x its final size.

    Exactly what Pillow's reducing_gap does inside the final resize, done first so that every
    conversion runs on the small image; returns the image and the part of it that the original
    covers (the last block may be partial). Conversions that reduce needs (16-bit to 32-bit,
    palette to RGB, the premultiplied copy of RGBA) are made a band of rows at a time: never a
    second full-size copy. Bands are whole blocks high, so the result equals one reduce.
    """
    final = _fit(im.width, im.height, size, fit)
    fx, fy = (max(1, int(side / new / REDUCING_GAP)) for side, new in zip(im.size, final, strict=True))
    mode = _reducible(im, channels)
    if (fx, fy) == (1, 1) or mode == "":
        return im, (0.0, 0.0, float(im.width), float(im.height))
    rows = fy * max(1, _BAND_PIXELS // (im.width * fy))
    out = Image.new(mode or im.mode, (-(-im.width // fx), -(-im.height // fy)))
    for top in range(0, im.height, rows):
        band = im.crop((0, top, im.width, min(top + rows, im.height)))
        out.paste((band if mode is None else band.convert(mode)).reduce((fx, fy)), (0, top // fy))
    return out, (0.0, 0.0, im.width / fx, im.height / fy)


def _turn(im: Image.Image, box: Box, turn: Image.Transpose | None) -> tuple[Image.Image, Box]:
    """Transpose an image upright, and the box within it along."""
    if turn is None:
        return im, box
    w, h = im.size
    x0, y0, x1, y1 = box
    corners = [_CORNERS[turn](x, y, w, h) for x, y in ((x0, y0), (x1, y1))]
    xs, ys = sorted(c[0] for c in corners), sorted(c[1] for c in corners)
    return im.transpose(turn), (xs[0], ys[0], xs[1], ys[1])


def _to_mode(im: Image.Image, channels: int, white: float | None) -> Image.Image:
    """Composite any transparency on white and convert to L (1 channel) or RGB (3 channels)."""
    if white is not None and im.mode in _WIDE_MODES:
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr * (255.0 / white), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white_canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white_canvas, rgba)
    target = "L" if channels == 1 else "RGB"
    return im if im.mode == target else im.convert(target)


def _crop_square(im: Image.Image, size: int, box: Box | None = None) -> Image.Image:
    """The crop policy: the centred square of the (upright) picture, scaled to ``size``."""
    x0, y0, x1, y1 = box or (0.0, 0.0, float(im.width), float(im.height))
    side = min(x1 - x0, y1 - y0)
    left, top = x0 + (x1 - x0 - side) / 2, y0 + (y1 - y0 - side) / 2
    square = (left, top, left + side, top + side)
    if im.size == (size, size) and square == (0, 0, size, size):
        return im
    return im.resize((size, size), Image.Resampling.LANCZOS, box=square, reducing_gap=float(REDUCING_GAP))


def _fit_square(im: Image.Image, size: int, box: Box | None = None) -> Image.Image:
    """The pad policy: the whole picture, its longer side scaled to ``size``, centred on white."""
    box = box or (0.0, 0.0, float(im.width), float(im.height))
    if im.size == (size, size) and box == (0, 0, size, size):
        return im
    new = _fit(box[2] - box[0], box[3] - box[1], size)
    im = im.resize(new, Image.Resampling.LANCZOS, box=box, reducing_gap=float(REDUCING_GAP))
    if new == (size, size):
        return im
    canvas = Image.new(im.mode, (size, size), 255 if im.mode == "L" else (255, 255, 255))
    canvas.paste(im, ((size - new[0]) // 2, (size - new[1]) // 2))
    return canvas


#: The resize policies a model can be made with (its InputSpec's ``fit``).
FITS: dict[str, Callable[[Image.Image, int, Box | None], Image.Image]] = {"pad": _fit_square, "crop": _crop_square}


def prepared(
    im: Image.Image, size: int, channels: int, turn: Image.Transpose | None, white: float | None, fit: str = "pad"
) -> np.ndarray:
    """A decoded image at its own size -> ``(S, S)`` or ``(S, S, 3)`` uint8: shrink, turn upright, convert, fit."""
    if turn is None and white is None and im.size == (size, size) and im.mode == ("L" if channels == 1 else "RGB"):
        # Already what the model takes (a folder of 28x28 PNGs): every step below would be a no-op.
        return np.asarray(im, dtype=np.uint8)
    small, box = _turn(*_shrink(im, size, channels, fit), turn)
    return np.asarray(FITS[fit](_to_mode(small, channels, white), size, box), dtype=np.uint8)


def fitted(im: Image.Image, size: int, channels: int, turn: Image.Transpose | None, white: float | None) -> Image.Image:
    """A decoded image -> upright L or RGB with its longer side at most ``size``, aspect kept, never
    enlarged, no canvas (thumbnails and grid tiles): the same shrink, turn and conversion as :func:`prepared`."""
    small, box = _turn(*_shrink(im, size, channels), turn)
    small = _to_mode(small, channels, white)
    width, height = box[2] - box[0], box[3] - box[1]
    new = _fit(width, height, size) if max(width, height) > size else (max(1, round(width)), max(1, round(height)))
    if new == small.size and box == (0.0, 0.0, float(small.width), float(small.height)):
        return small
    return small.resize(new, Image.Resampling.LANCZOS, box=box, reducing_gap=float(REDUCING_GAP))
