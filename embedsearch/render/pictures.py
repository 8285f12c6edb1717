"""Pictures of results: query grids (a query, then its neighbours, captioned), reconstructions and
generated candidates."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from embedsearch.data.images import load_image, to_pil
from embedsearch.errors import ImageError
from embedsearch.render.grid import Tile, save_grid

if TYPE_CHECKING:
    from embedsearch.core.explain import Explanation
    from embedsearch.core.generate import Generation
    from embedsearch.results import QueryResult


def image_tile(path: str | None, caption: str, size: int = 96) -> Tile:
    """A file as a grid cell of ``size`` pixels, decoded at no more than that (a JPEG at a DCT scale:
    a 12-megapixel photo costs a few milliseconds, not a full decode)."""
    if path is None:
        return Tile(None, caption)
    try:
        return Tile(load_image(path, max_side=size), caption)
    except ImageError:
        return Tile(None, f"{caption} (unreadable)")


def query_grid(
    results: list[QueryResult], out: Path, tile_size: int = 96, query_files: list[str | None] | None = None
) -> Path:
    """One row per query: the query image, then each neighbour captioned '#rank distance'.

    ``query_files``: the file each query's tile shows where it is not the query itself (an id:N
    query's stored file; None: a placeholder)."""
    files: list[str | None] = list(query_files) if query_files is not None else [r.query for r in results]
    rows = []
    for result, query_file in zip(results, files, strict=True):
        row = [image_tile(query_file, "query", tile_size)]
        row += [image_tile(n.path, f"#{n.rank} {n.distance:.3f}", tile_size) for n in result.results]
        rows.append(row)
    return save_grid(rows, out, tile_size=tile_size, row_titles=[Path(r.query).name for r in results])


def explained_grid(results: list[QueryResult], explained: list[Explanation], out: Path, tile_size: int = 96) -> Path:
    """Per query: its row as :func:`query_grid` draws it (an id:N query as its file), then a row
    "decoded" (the query's and each hit's reconstruction, under the pictures they are of) and, for a
    VAE, a row "midpoint" (the decoded midpoint between the query's code and each hit's; its first
    cell is empty)."""
    rows: list[list[Tile]] = []
    titles: list[str] = []
    for result, ex in zip(results, explained, strict=True):
        ranks = [f"#{n.rank}" for n in result.results]
        rows.append([image_tile(ex.path, "query", tile_size)])  # an id:N query's own file
        rows[-1] += [image_tile(n.path, f"#{n.rank} {n.distance:.3f}", tile_size) for n in result.results]
        rows.append([Tile(to_pil(ex.reconstruction), "query decoded")])
        rows[-1] += [Tile(to_pil(h.reconstruction), f"{r} decoded") for r, h in zip(ranks, ex.hits, strict=True)]
        # Pillow's built-in font draws spaces narrow: a colon keeps the model's name apart.
        titles += [Path(result.query).name, f"decoded: {result.model}"]
        if ex.has_midpoints:
            mids = [
                Tile(None if h.midpoint is None else to_pil(h.midpoint), f"{r} midpoint")
                for r, h in zip(ranks, ex.hits, strict=True)
            ]
            rows.append([Tile(None, "(query+hit)/2"), *mids])
            titles.append(f"midpoint: {result.model}")
    return save_grid(rows, out, tile_size=tile_size, row_titles=titles)


def reconstruction_grid(originals: np.ndarray, recons: np.ndarray, names: list[str], out: Path) -> Path:
    """Originals (top row) above their reconstructions (bottom row)."""
    rows = [
        [Tile(to_pil(im), Path(n).name) for im, n in zip(originals, names, strict=False)],
        [Tile(to_pil(im), "reconstruction") for im in recons],
    ]
    return save_grid(rows, out, row_titles=["original", "decoded"])


def candidates_grid(generation: Generation, path: Path, columns: int = 8) -> Path:
    """Generated candidates in rows of ``columns``, each captioned, its nearest real images under it."""
    rows: list[list[Tile]] = []
    cands = generation.candidates
    for start in range(0, len(cands), columns):
        block = cands[start : start + columns]
        rows.append([Tile(to_pil(c.image), c.caption) for c in block])
        depth = max((len(c.neighbours) for c in block), default=0)
        for r in range(depth):
            rows.append(
                [
                    image_tile(c.neighbours[r].path, f"{c.neighbours[r].label or ''} {c.neighbours[r].distance:.2f}")
                    if r < len(c.neighbours)
                    else Tile(None, "")
                    for c in block
                ]
            )
    return save_grid(rows, path)
