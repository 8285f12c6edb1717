"""Pictures of results: query grids (a query, then its neighbours, captioned)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from embedsearch.data.images import load_image
from embedsearch.errors import ImageError
from embedsearch.render.grid import Tile, save_grid

if TYPE_CHECKING:
    from embedsearch.results import QueryResult


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


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def reconstruction_grid(originals: np.ndarray, recons: np.ndarray, names: list[str], out: Path) -> Path:
    """Originals (top row) above their reconstructions (bottom row)."""
    rows = [
        [Tile(_pil(im), Path(n).name) for im, n in zip(originals, names, strict=False)],
        [Tile(_pil(im), "reconstruction") for im in recons],
    ]
    return save_grid(rows, out, row_titles=["original", "decoded"])
