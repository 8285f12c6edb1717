"""Picture grids: query results, reconstructions and generated candidates side by side in one PNG.

Layout: an optional column of row titles on the left, then one cell per tile. A cell is the picture
fitted into a ``tile_size`` square (centred on white) with a one-line caption under it; thin grey
lines separate the cells. The caption strip is only there when some tile has a caption. Rows may
differ in length; the grid is as wide as the longest row.
"""

from __future__ import annotations

import functools
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from embedsearch.errors import InvalidArgumentError
from embedsearch.files import atomic_path

#: White space around a picture inside its cell, and the width of the separator lines.
PAD = 4
LINE = 1
_MIN_TILE, _MAX_TILE = 16, 1024
_WHITE = (255, 255, 255)
_PLACEHOLDER = (215, 215, 215)
_SEPARATOR = (190, 190, 190)
_TEXT = (40, 40, 40)
_Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


@dataclass
class Tile:
    """One cell of a grid; ``image=None`` draws an empty grey placeholder ("no result")."""

    image: Image.Image | None
    caption: str = ""


@functools.cache
def _font() -> _Font:
    # Pillow's built-in font needs no installed font files; loaded lazily, not at import time.
    return ImageFont.load_default()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB; transparency composited on white, deep greys scaled to 8 bits."""
    if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data (anything above 255) is shown at its bit depth, floats in [0, 1] as fractions.
        scale = 255.0 if img.mode == "F" and arr.size and arr.max() <= 1.0 else 1.0
        scale = 1 / 257 if arr.size and arr.max() > 255 else scale
        img = Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def _fit(img: Image.Image, box: int) -> Image.Image:
    """Scale ``img`` (RGB) to fit a ``box`` square, keeping the aspect ratio."""
    w, h = img.size
    scale = box / max(w, h)
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    # Enlarge by a whole factor when that still fills most of the box: every source pixel then
    # becomes an equal square block (a 28x28 digit stays crisp instead of getting uneven rows).
    whole = int(scale)
    if whole * max(w, h) >= 0.75 * box:
        scale = float(whole)
    if scale == 1:
        return img
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.NEAREST)


def _has_glyph(font: _Font, ch: str) -> bool:
    """Whether ``font`` can draw ``ch``: no error, and not the "missing glyph" box."""
    try:
        mask = font.getmask(ch)
    except (UnicodeError, ValueError, OSError):
        return False  # the bitmap fallback font only knows Latin-1 and raises for the rest
    try:
        notdef = font.getmask("\ue000")  # private-use code point: no glyph in Pillow's fonts
    except (UnicodeError, ValueError, OSError):
        return True  # a font that raises for missing glyphs has just drawn this one
    return (mask.size, bytes(mask)) != (notdef.size, bytes(notdef))


@functools.lru_cache(maxsize=4096)
def _substitute(font: _Font, ch: str) -> str:
    """``ch`` if the font draws it, else its accent-free base letters ("é" -> "e"), else "?"."""
    if _has_glyph(font, ch):
        return ch
    base = "".join(c for c in unicodedata.normalize("NFKD", ch) if not unicodedata.combining(c))
    return base if base and base != ch and all(_has_glyph(font, c) for c in base) else "?"


def _renderable(text: str, font: _Font) -> str:
    """``text`` on one line, with characters the font cannot draw replaced (Pillow's built-in font
    covers little beyond ASCII; FreeType would draw boxes, the bitmap fallback would raise)."""
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    return "".join(ch if " " <= ch <= "~" else _substitute(font, ch) for ch in text)


def _ellipsis(font: _Font) -> str:
    return "…" if _renderable("…", font) == "…" else "..."


def _truncate(text: str, width: int, font: _Font) -> str:
    """The longest prefix of ``text`` that fits ``width`` pixels, with an ellipsis if shortened."""
    text = _renderable(text, font)
    if font.getlength(text) <= width:
        return text
    dots = _ellipsis(font)
    lo, hi = 0, len(text)  # invariant: text[:lo] + dots fits (or lo == 0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(text[:mid].rstrip() + dots) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + dots if lo or font.getlength(dots) <= width else ""


def _line_height(font: _Font) -> int:
    return int(font.getbbox("Ág|")[3]) + 2


def _check(rows: list[list[Tile]], tile_size: int, row_titles: list[str] | None) -> None:
    if not rows:
        raise InvalidArgumentError("a grid needs at least one row")
    if not _MIN_TILE <= tile_size <= _MAX_TILE:
        raise InvalidArgumentError(f"tile size must be between {_MIN_TILE} and {_MAX_TILE}, not {tile_size}")
    if row_titles is not None and len(row_titles) != len(rows):
        raise InvalidArgumentError(f"got {len(row_titles)} row titles for {len(rows)} rows")
    for row in rows:
        for tile in row:
            if not isinstance(tile, Tile):
                raise InvalidArgumentError(f"grid cells must be Tile objects, not {type(tile).__name__}")


def _title_width(row_titles: list[str] | None, tile_size: int, font: _Font) -> int:
    if row_titles is None:
        return 0
    longest = max((font.getlength(_renderable(t, font)) for t in row_titles), default=0)
    # Titles are labels like "query 3"; cap the column so a long one cannot dwarf the pictures.
    return min(int(np.ceil(longest)), tile_size) + 2 * PAD


def _draw_tile(canvas: Image.Image, tile: Tile, x: int, y: int, tile_size: int, caption_h: int) -> None:
    """Draw one cell whose inner top-left corner (inside the separators) is (x, y)."""
    draw = ImageDraw.Draw(canvas)
    ix, iy = x + PAD, y + PAD
    if tile.image is None or 0 in tile.image.size:
        draw.rectangle((ix, iy, ix + tile_size - 1, iy + tile_size - 1), fill=_PLACEHOLDER)
    else:
        pic = _fit(_to_rgb(tile.image), tile_size)
        canvas.paste(pic, (ix + (tile_size - pic.width) // 2, iy + (tile_size - pic.height) // 2))
    if caption_h and tile.caption:
        font = _font()
        text = _truncate(tile.caption, tile_size, font)
        tx = ix + (tile_size - int(font.getlength(text))) // 2
        draw.text((tx, iy + tile_size + 1), text, fill=_TEXT, font=font)


def render_grid(rows: list[list[Tile]], tile_size: int = 96, row_titles: list[str] | None = None) -> Image.Image:
    """Draw ``rows`` of tiles as one RGB picture (see the module docstring for the layout).

    Width: ``title column + cols * (tile_size + 2*PAD) + (cols + 1) * LINE``; height likewise with
    each row ``tile_size + 2*PAD`` tall, plus a caption line when any tile has a caption.
    """
    _check(rows, tile_size, row_titles)
    font = _font()
    cols = max(1, max(len(row) for row in rows))
    caption_h = _line_height(font) if any(t.caption for row in rows for t in row) else 0
    title_w = _title_width(row_titles, tile_size, font)
    cell_w, cell_h = tile_size + 2 * PAD, tile_size + 2 * PAD + caption_h
    width = title_w + cols * cell_w + (cols + 1) * LINE
    height = len(rows) * cell_h + (len(rows) + 1) * LINE
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    for c in range(cols + 1):
        x = title_w + c * (cell_w + LINE)
        draw.rectangle((x, 0, x + LINE - 1, height - 1), fill=_SEPARATOR)
    for r, row in enumerate(rows):
        y = r * (cell_h + LINE)
        draw.rectangle((title_w, y, width - 1, y + LINE - 1), fill=_SEPARATOR)
        for c, tile in enumerate(row):
            _draw_tile(canvas, tile, title_w + c * (cell_w + LINE) + LINE, y + LINE, tile_size, caption_h)
        if row_titles is not None:
            title = _truncate(row_titles[r], title_w - 2 * PAD, font)
            th = _line_height(font)
            draw.text((PAD, y + LINE + (cell_h - th) // 2), title, fill=_TEXT, font=font)
    draw.rectangle((title_w, height - LINE, width - 1, height - 1), fill=_SEPARATOR)
    return canvas


def save_grid(
    rows: list[list[Tile]], path: str | Path, tile_size: int = 96, row_titles: list[str] | None = None
) -> Path:
    """Render the grid and write it as PNG to ``path`` atomically; returns ``path``.

    A reader (e.g. the web page showing it) never sees a half-written file: the PNG goes to a
    temporary file in the same folder and is then renamed over ``path`` (:func:`embedsearch.files.atomic_path`).
    """
    image = render_grid(rows, tile_size, row_titles)
    # PIL creates the temporary file itself, with the usual umask permissions.
    return atomic_path(path, lambda tmp: image.save(tmp, "PNG"))
