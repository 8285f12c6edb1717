"""Pictures of results: query grids (a query, then its neighbours, captioned)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ImageError
from .grid import Tile, save_grid
from .images import load_image

if TYPE_CHECKING:
    from .engine import QueryResult


def image_tile(path: str | None, caption: str) -> Tile:
    if path is None:
        return Tile(None, caption)
    try:
        return Tile(load_image(path), caption)
    except ImageError:
        return Tile(None, f"{caption} (unreadable)")


def query_grid(results: list[QueryResult], out: Path, tile_size: int = 96) -> Path:
    """One row per query: the query image, then each neighbour captioned '#rank distance'."""
    rows = []
    for result in results:
        row = [image_tile(result.query, "query")]
        row += [image_tile(n.path, f"#{n.rank} {n.distance:.3f}") for n in result.results]
        rows.append(row)
    return save_grid(rows, out, tile_size=tile_size, row_titles=[Path(r.query).name for r in results])
