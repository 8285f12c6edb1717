"""``embedsearch demo``: pixels, PCA, an AE and a VAE side by side on built-in synthetic shapes, offline.

The data (:func:`embedsearch.data.synth.make_shapes`) draws each shape's colour, its background's
colour and its background's kind (plain, gradient, noisy) independently of the class, so only the
outline tells the class; a model that matches colours finds pictures of the same palette, not of
the same shape. The demo trains a small AE and a small VAE with the training defaults (augmentation
and the consistency term), indexes the set with all four models, scores every model the same way
(each image queried, its ``k`` nearest other images, the share of them that have its shape) and
draws one picture of a few queries, a row per model, with reconstructions and VAE samples.

Everything is seeded: the pictures, the training, the queries shown and the VAE samples. A second
run with the same settings reuses the pictures and the models; other settings start the demo afresh.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedsearch.data.images import to_pil
from embedsearch.data.synth import SHAPES, make_shapes
from embedsearch.errors import DataError, InvalidArgumentError
from embedsearch.evaluation.metrics import hit_matrix, precision_at
from embedsearch.files import atomic_write
from embedsearch.render.grid import Tile, save_grid
from embedsearch.render.pictures import image_tile

if TYPE_CHECKING:
    from embedsearch.engine import Engine
    from embedsearch.results import IndexReport, Neighbour, QueryResult

log = logging.getLogger(__name__)

#: The demo's models, in the order of the picture's rows and the precision lines.
PIXELS, PCA, AE, VAE = "pixels-demo", "pca-demo", "ae-demo", "vae-demo"
MODELS: tuple[str, ...] = (PIXELS, PCA, AE, VAE)
PICTURE = "demo.png"
_SETTINGS = "settings.json"


@dataclass
class DemoConfig:
    """What decides the demo's figures; the defaults keep it well under 90 s on a 2-core CPU."""

    per_class: int = 40
    seed: int = 0
    epochs: int = 10
    # The training defaults (README "Training defaults") but for the batch: 320 images at the default
    # 256 would be two steps an epoch.
    batch_size: int = 32
    pca_dim: int = 16
    size: int = 32
    k: int = 5  # precision@k, and the hits shown per row
    queries: int = 4  # queries shown in the picture (one class each)
    samples: int = 6  # VAE prior samples in the picture's last row (k + 1: as wide as the rest)
    tile_size: int = 96

    def __post_init__(self) -> None:
        if self.per_class < 2:
            raise InvalidArgumentError(
                f"per_class must be at least 2 (a query needs another of its shape), not {self.per_class}"
            )
        if min(self.epochs, self.batch_size, self.k, self.queries, self.samples) < 1:
            raise InvalidArgumentError("epochs, batch size, k, queries and samples must be at least 1")
        if self.queries > len(SHAPES):
            raise InvalidArgumentError(f"the demo shows at most {len(SHAPES)} queries (one per shape)")

    def data_settings(self) -> dict[str, Any]:
        """The settings the pictures and the models depend on (not what is merely shown)."""
        keys = ("per_class", "seed", "epochs", "batch_size", "pca_dim", "size")
        return {key: value for key, value in asdict(self).items() if key in keys}


@dataclass
class ModelScore:
    """One model's precision@k over every demo image (each image left out of its own results)."""

    model: str
    k: int
    hits: int  # neighbours that share their query's shape
    total: int  # neighbours counted: k per image
    precision: float

    def line(self) -> str:
        return (
            f"precision@{self.k} {self.model:<11} {self.precision:.3f}  "
            f"({self.hits}/{self.total} nearest neighbours share their query's shape)"
        )


@dataclass
class DemoPicture:
    """The picture's rows as drawn (a row title and its tiles), and where it was written."""

    path: Path
    titles: list[str]
    rows: list[list[Tile]]


@dataclass
class DemoOutcome:
    data: Path
    indexed: list[IndexReport]
    scores: list[ModelScore]
    winners: list[str]  # the best model, or all the tied best
    chance: float  # the precision of neighbours drawn at random
    results: dict[str, list[QueryResult]]  # model -> every image's results, the image itself included
    shown: list[str]  # the queries in the picture
    picture: DemoPicture
    seconds: float = 0.0
    lines: list[str] = field(default_factory=list)


# -- the data and the models ---------------------------------------------------------------------


def _prepare(engine: Engine, root: Path, config: DemoConfig) -> Path:
    """The demo's pictures under ``root/shapes``; what an earlier run with other settings left is removed."""
    data, settings = root / "shapes", root / _SETTINGS
    wanted = config.data_settings()
    before = _read_settings(settings)
    if before != wanted and (data.exists() or any(engine.store.model(m) for m in MODELS)):
        log.info("demo settings changed: starting the demo afresh")
        _reset(engine, data)
    if not data.is_dir():
        log.info("writing %d synthetic images to %s", config.per_class * len(SHAPES), data)
        make_shapes(data, per_class=config.per_class, size=config.size, seed=config.seed)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(settings, (json.dumps(wanted, indent=1) + "\n").encode())
    return data


def _read_settings(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # none yet (or unreadable): whatever is there is treated as another run's


def _reset(engine: Engine, data: Path) -> None:
    for name in MODELS:
        if engine.store.model(name) is not None:
            engine.delete_model(name)
    if data.exists():
        with contextlib.suppress(DataError):  # DataError: nothing of it was indexed
            engine.remove([str(data)])  # also what an older demo put in the library's 'pixels'
        shutil.rmtree(data)
    (data.parent / "query-grid.png").unlink(missing_ok=True)  # the picture of the demo before issue 16


def _make_models(engine: Engine, data: Path, config: DemoConfig) -> None:
    seed = config.seed
    trained = {"epochs": config.epochs, "batch_size": config.batch_size, "seed": seed}
    plan: list[tuple[str, str, dict[str, Any]]] = [
        (PIXELS, "pixels", {}),
        (PCA, "pca", {"dim": config.pca_dim, "seed": seed}),
        (AE, "ae", trained),
        (VAE, "vae", trained),
    ]
    for name, kind, options in plan:
        if engine.store.model(name) is None:
            engine.create_model(name, kind, str(data), options=options)


# -- scoring --------------------------------------------------------------------------------------


def others(result: QueryResult, k: int) -> list[Neighbour]:
    """The ``k`` nearest results of a query that is itself indexed, without the query itself."""
    itself = os.path.realpath(result.query)  # stored paths are absolute, a query's path may not be
    return [n for n in result.results if n.path is None or os.path.realpath(n.path) != itself][:k]


def _label_of(path: str) -> int:
    return SHAPES.index(Path(path).parent.name)  # make_shapes writes <shape>/<shape>-<i>.png


def score(model: str, results: list[QueryResult], k: int) -> ModelScore:
    """precision@k of a model from its query results, by the evaluation's own metric functions."""
    rows = np.full((len(results), k), -1, dtype=np.int64)  # (Q, k) rows of db_labels, -1: no result
    db_labels: list[int] = []  # one entry per neighbour found (-2: not a shape)
    for q, result in enumerate(results):
        found = others(result, k)
        rows[q, : len(found)] = np.arange(len(db_labels), len(db_labels) + len(found))
        db_labels += [SHAPES.index(n.label) if n.label in SHAPES else -2 for n in found]
    query_labels = np.array([_label_of(r.query) for r in results], dtype=np.int64)
    hits = hit_matrix(rows, np.array(db_labels or [-2], dtype=np.int64), query_labels)  # [-2]: none found
    return ModelScore(model, k, int(hits.sum()), len(results) * k, precision_at(hits, k))


def winners(scores: list[ModelScore]) -> list[str]:
    best = max(s.hits for s in scores)
    return [s.model for s in scores if s.hits == best]


# -- the picture ----------------------------------------------------------------------------------


def pick_queries(data: Path, config: DemoConfig) -> list[str]:
    """``config.queries`` images of different shapes, drawn with the seed."""
    rng = np.random.default_rng([config.seed, 16])
    classes = sorted(rng.choice(len(SHAPES), size=config.queries, replace=False).tolist())
    return [str(sorted((data / SHAPES[c]).iterdir())[int(rng.integers(config.per_class))]) for c in classes]


def query_rows(
    results: dict[str, list[QueryResult]], shown: list[str], k: int, size: int
) -> tuple[list[str], list[list[Tile]]]:
    """For each shown query, a row per model: the query, then its k nearest others, 'label distance'."""
    titles, rows = [], []
    by_path = {model: {r.query: r for r in found} for model, found in results.items()}
    for query in shown:
        label = Path(query).parent.name
        for model in MODELS:
            hits = others(by_path[model][query], k)
            rows.append(
                [image_tile(query, f"query: {label}", size)]
                + [image_tile(n.path, f"{n.label} {n.distance:.3f}", size) for n in hits]
            )
            titles.append(model)
    return titles, rows


def decoder_rows(engine: Engine, shown: list[str], config: DemoConfig) -> tuple[list[str], list[list[Tile]]]:
    """The shown queries, their AE and VAE reconstructions, and samples from the VAE's prior."""
    originals, ae_recons, _ = engine.reconstruct(shown, AE)
    _, vae_recons, _ = engine.reconstruct(shown, VAE)
    labels = [Path(q).parent.name for q in shown]
    samples = engine.generate(VAE, n=config.samples, seed=config.seed).candidates
    titles = ["original", f"{AE} recon", f"{VAE} recon", f"{VAE} prior"]
    rows = [
        [Tile(to_pil(im), label) for im, label in zip(originals, labels, strict=True)],
        [Tile(to_pil(im), "reconstruction") for im in ae_recons],
        [Tile(to_pil(im), "reconstruction") for im in vae_recons],
        [Tile(to_pil(c.image), f"sample {c.caption}") for c in samples],
    ]
    return titles, rows


# -- the whole demo -------------------------------------------------------------------------------


def run_demo(engine: Engine, config: DemoConfig | None = None) -> DemoOutcome:
    """Make the shapes under HOME/demo, train and index the four models, score them, draw the picture."""
    started = time.perf_counter()
    config = config or DemoConfig()
    engine.open(create=True)  # the demo may be a fresh machine's first command: it starts the library
    root = engine.home / "demo"
    data = _prepare(engine, root, config)
    _make_models(engine, data, config)
    indexed = engine.index_models(str(data), list(MODELS))
    files = sorted(str(p) for p in data.rglob("*.png"))
    # k + 1: every query is indexed, so it finds itself (first, bar exact ties) besides k others.
    results = {m: [r for r in engine.query(files, m, k=config.k + 1) if not isinstance(r, tuple)] for m in MODELS}
    scores = [score(m, results[m], config.k) for m in MODELS]
    shown = pick_queries(data, config)
    titles, rows = query_rows(results, shown, config.k, config.tile_size)
    more_titles, more_rows = decoder_rows(engine, shown, config)
    path = save_grid(rows + more_rows, root / PICTURE, config.tile_size, titles + more_titles)
    picture = DemoPicture(path, titles + more_titles, rows + more_rows)
    n = len(files)
    outcome = DemoOutcome(
        data, indexed, scores, winners(scores), (config.per_class - 1) / (n - 1), results, shown, picture
    )
    outcome.seconds = time.perf_counter() - started
    outcome.lines = report_lines(outcome, config)
    return outcome


def report_lines(outcome: DemoOutcome, config: DemoConfig) -> list[str]:
    first = outcome.indexed[0]
    best = next(s for s in outcome.scores if s.model == outcome.winners[0])
    won = f"winner: {best.model}" if len(outcome.winners) == 1 else f"tie between {', '.join(outcome.winners)}"
    return [
        f"data: {first.scanned} synthetic shapes ({len(SHAPES)} classes x {config.per_class}, "
        f"{config.size}x{config.size}, colours and backgrounds drawn independently of the shape) in {outcome.data}",
        f"indexed {first.scanned} images ({first.added} new) with {', '.join(MODELS)}",
        *(s.line() for s in outcome.scores),
        f"{won} (precision@{config.k} {best.precision:.3f}; neighbours drawn at random: {outcome.chance:.3f})",
        f"picture: {outcome.picture.path} ({outcome.seconds:.0f} s)",
    ]
