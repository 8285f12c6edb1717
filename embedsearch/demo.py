"""``embedsearch demo``: the whole job on built-in synthetic data, offline, in seconds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.data.synth import SHAPES, make_shapes

if TYPE_CHECKING:
    from embedsearch.engine import Engine
    from embedsearch.results import QueryResult

log = logging.getLogger(__name__)


@dataclass
class DemoOutcome:
    results: list[QueryResult]
    grid: Path
    summary: str


def run_demo(engine: Engine, per_class: int = 40, seed: int = 0, model: str = "pca-demo") -> DemoOutcome:
    """Generate shapes under HOME/demo/shapes, index them (pixels and PCA), query one of each class."""
    root = engine.home / "demo"
    data = root / "shapes"
    if not data.is_dir():
        log.info("writing %d synthetic images to %s", per_class * len(SHAPES), data)
        make_shapes(data, per_class=per_class, size=32, seed=seed)
    pixels = engine.index(str(data), "pixels")
    if engine.store.model(model) is None:
        engine.create_model(model, "pca", str(data), options={"dim": 16, "seed": seed})
    engine.index(str(data), model)
    queries = [str(sorted((data / shape).iterdir())[0]) for shape in SHAPES]
    results = [r for r in engine.query(queries, model, k=6) if not isinstance(r, tuple)]
    from embedsearch.render.pictures import query_grid

    grid = query_grid(results, root / "query-grid.png")
    hits = sum(n.label == Path(r.query).parent.name for r in results for n in r.results[1:])
    total = sum(len(r.results) - 1 for r in results)
    summary = (
        f"indexed {pixels.scanned} images ({pixels.added} new) with 'pixels' and '{model}'; "
        f"{hits}/{total} neighbours share their query's shape; grid: {grid}"
    )
    return DemoOutcome(results, grid, summary)
