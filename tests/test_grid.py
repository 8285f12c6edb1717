from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFont

from embedsearch.errors import InvalidArgumentError
from embedsearch.render import grid
from embedsearch.render.grid import LINE, PAD, Tile, render_grid, save_grid

pytestmark = pytest.mark.no_store  # never opens a library


def _expected_width(cols: int, tile: int, title_w: int = 0) -> int:
    return title_w + cols * (tile + 2 * PAD) + (cols + 1) * LINE


def _expected_height(rows: int, tile: int, caption_h: int = 0) -> int:
    return rows * (tile + 2 * PAD + caption_h) + (rows + 1) * LINE


def test_size_without_captions_or_titles() -> None:
    img = Image.new("RGB", (10, 10), "red")
    out = render_grid([[Tile(img)] * 3, [Tile(img)]], tile_size=32)
    assert out.mode == "RGB"
    assert out.size == (_expected_width(3, 32), _expected_height(2, 32))


def test_captions_and_titles_add_space() -> None:
    img = Image.new("RGB", (10, 10), "red")
    plain = render_grid([[Tile(img), Tile(img)]], tile_size=40)
    captioned = render_grid([[Tile(img, "a"), Tile(img)]], tile_size=40)
    titled = render_grid([[Tile(img), Tile(img)]], tile_size=40, row_titles=["query 1"])
    assert captioned.width == plain.width and captioned.height > plain.height
    assert titled.height == plain.height and titled.width > plain.width + 2 * PAD


def test_long_title_column_is_capped() -> None:
    out = render_grid([[Tile(None)]], tile_size=32, row_titles=["x" * 500])
    assert out.width <= _expected_width(1, 32, title_w=32 + 2 * PAD)


def test_placeholder_is_grey_and_missing_cells_white() -> None:
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    out = np.asarray(render_grid([[Tile(red), Tile(red)], [Tile(None)]], tile_size=32))
    cell = 32 + 2 * PAD + LINE
    centre = LINE + PAD + 16
    assert tuple(out[centre, centre]) == (255, 0, 0)
    row2 = cell + centre
    r, g, b = out[row2, centre]
    assert r == g == b and 150 < r < 250  # grey placeholder
    assert tuple(out[row2, cell + centre]) == (255, 255, 255)  # the short row leaves blank space


@pytest.mark.parametrize(
    "image",
    [
        Image.new("L", (28, 28), 0),
        Image.new("1", (20, 20), 0),
        Image.new("RGB", (300, 120), (0, 0, 255)),
        Image.new("RGBA", (50, 50), (0, 0, 0, 0)),
        Image.new("LA", (50, 50), (0, 128)),
        Image.new("P", (30, 30), 3),
        Image.new("CMYK", (30, 30), (0, 0, 0, 255)),
        Image.new("I;16", (30, 30), 65535),
        Image.new("I", (30, 30), 200),
        Image.new("F", (30, 30), 0.5),
        Image.new("RGB", (0, 0)),
    ],
    ids=lambda im: f"{im.mode}-{im.width}x{im.height}",
)
def test_any_mode_is_accepted(image: Image.Image) -> None:
    out = render_grid([[Tile(image, image.mode)]], tile_size=48)
    assert out.mode == "RGB"


def test_transparent_pixels_become_white() -> None:
    clear = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    out = np.asarray(render_grid([[Tile(clear)]], tile_size=32))
    c = LINE + PAD + 16
    assert tuple(out[c, c]) == (255, 255, 255)


def test_small_images_are_enlarged_crisply() -> None:
    # A 2x2 checkerboard enlarged to the tile must stay pure black and white (nearest neighbour).
    checker = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8), "L")
    out = np.asarray(render_grid([[Tile(checker)]], tile_size=32))
    inner = out[LINE + PAD : LINE + PAD + 32, LINE + PAD + 16 : LINE + PAD + 32]
    assert set(np.unique(inner)) <= {0, 255}
    assert (inner == 0).any()


def test_large_images_shrink_to_fit_keeping_aspect() -> None:
    wide = Image.new("RGB", (400, 100), (0, 0, 0))
    out = np.asarray(render_grid([[Tile(wide)]], tile_size=40))
    inner = out[LINE + PAD : LINE + PAD + 40, LINE + PAD : LINE + PAD + 40]
    dark_rows = np.nonzero((inner < 128).all(axis=(1, 2)))[0]
    assert len(dark_rows) == 10  # 400x100 -> 40x10, centred on white
    assert (inner[0] == 255).all()


@pytest.mark.parametrize(
    "caption",
    ["x" * 300, "日本語のキャプション", "émoji 😀 and ✓", "tab\tnew\nline", "\u0301\u200b", ""],
)
def test_captions_never_raise(caption: str) -> None:
    img = Image.new("RGB", (16, 16), "blue")
    out = render_grid([[Tile(img, caption), Tile(None, caption)]], tile_size=32, row_titles=[caption])
    assert out.mode == "RGB"


def test_bitmap_fallback_font(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without FreeType Pillow falls back to a Latin-1 bitmap font, which raises on other text.
    monkeypatch.setattr(grid, "_font", ImageFont.load_default_imagefont)
    img = Image.new("RGB", (16, 16), "blue")
    rows = [[Tile(img, "日本語 émoji 😀 " * 5)]]
    out = render_grid(rows, tile_size=32, row_titles=["query ✓"])
    assert out.mode == "RGB"


def test_truncate_fits_width_with_ellipsis() -> None:
    for font in (ImageFont.load_default(), ImageFont.load_default_imagefont()):
        text = grid._truncate("a rather long caption for a small tile", 50, font)
        assert font.getlength(text) <= 50
        assert text.endswith(("…", "..."))
        assert grid._truncate("short", 200, font) == "short"


def test_accents_fall_back_to_base_letters() -> None:
    font = ImageFont.load_default()
    assert grid._renderable("café", font) in ("café", "cafe")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rows": []},
        {"rows": [[Tile(None)]], "tile_size": 4},
        {"rows": [[Tile(None)]], "row_titles": ["a", "b"]},
        {"rows": [[Image.new("RGB", (4, 4))]]},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(InvalidArgumentError):
        render_grid(**kwargs)


def test_save_grid_writes_png_atomically(tmp_path: Path) -> None:
    target = tmp_path / "out" / "grid.png"
    rows = [[Tile(Image.new("RGB", (20, 20), "green"), "one"), Tile(None, "none")]]
    assert save_grid(rows, target, tile_size=32, row_titles=["query 1"]) == target
    with Image.open(target) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == render_grid(rows, 32, ["query 1"]).size
    save_grid(rows, target, tile_size=48)  # replacing an existing file works too
    assert [p.name for p in target.parent.iterdir()] == ["grid.png"]  # no temp files left


def test_save_grid_failure_leaves_no_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        save_grid([], tmp_path / "grid.png")
    assert list(tmp_path.iterdir()) == []
