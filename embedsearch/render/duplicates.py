"""The picture of ``duplicates --grid``: one row per group, each image captioned with its distance."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.render.grid import Tile, save_grid
from embedsearch.render.pictures import image_tile

if TYPE_CHECKING:
    from embedsearch.core.dedup import DuplicateGroup

#: A picture of thousands of groups helps no one: the largest ones are shown, each up to a row's width.
MAX_ROWS = 50
MAX_COLUMNS = 12


def duplicates_grid(groups: list[DuplicateGroup], out: Path, tile_size: int = 96) -> Path:
    """Row per group (the first :data:`MAX_ROWS`): its first image, then the others with their distance."""
    rows, titles = [], []
    for group in groups[:MAX_ROWS]:
        shown = group.images[:MAX_COLUMNS]
        row = [
            image_tile(im.path, f"id {im.id}" if r == 0 else f"{im.distance:.3f}", tile_size)
            for r, im in enumerate(shown)
        ]
        if len(group.images) > len(shown):
            row.append(Tile(None, f"+{len(group.images) - len(shown)} more"))
        rows.append(row)
        titles.append(f"group {group.group}")
    if not rows:
        rows, titles = [[Tile(None, "no groups")]], ["-"]
    return save_grid(rows, out, tile_size=tile_size, row_titles=titles)
